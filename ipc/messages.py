"""Owns the message types that cross a process boundary: one frozen dataclass per kind, each with a wire tag.

Every field is msgpack-friendly (None, bool, int, float, str, bytes, lists and str-keyed dicts of those) or a
record (`TensorSpec`, `StepBufferSpecs`, `EventHandles`). `validate()` checks field types and values with
`ValueError`; the codec calls it on every frame from an untrusted peer (clients, and the handshake of the
control channel), so such a message is either well-formed or never exists (ProtocolError "bad_fields").
Frames between the two processes after the versioned handshake are only decoded structurally: both sides
are built from this file, and a full check costs ~5x the msgpack encode and decode (bench.probes.codec_cost:
4 against 0.8 us for a Decode on the CPU machine; 2.6 structurally).

Tag scheme: a small int per kind, never reused or renumbered within a protocol version.
  1-9   session lifecycle and replies (both channels);
  10-19 executor step control (JIT context <-> graph executor);
  20-29 client-facing (client <-> JIT context).
`Handshake` is the one message whose fields never change, so peers of different versions can still read it
and refuse each other with a clear version mismatch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

# Versions: 16: ScorePrompt, StepDone.logprobs, PromptLogprobsChunk (prompt log-probabilities); 15: ChatOptions.tools,
# TokenizeRequest.tools, tool_calls / tool messages; 14: LogprobsChunk (TokenLogprob);
# 13: a Reset may come on the doorbell, step numbers increase across requests; 12: Decode.argmax/own_input and the
# token_ring buffer; 11: Ready.captures_pending; 10: Started.spin_ms; 9: DecodeBatch carries several prompt chunks; 8:
# GenerateRequest.warm_up; 7: DecodeBatch's prompt chunk (the mixed step); 6: KV slots (Ready.max_num_seqs,
# Prefill.slot, DecodeBatch, the batch_logits buffer); 5: Verify.tokens/accept, StepDone.accepted, GenerateRequest.chat;
# 4: Ready.doorbell; 3: Verify and the verify_logits buffer; 2: typed Ready buffers/events/tokenizer_path
PROTOCOL_VERSION = 16
MAX_ID_CHARS = 256
MAX_SPECULATIVE_TOKENS = 8  # proposals a Verify step carries at most (its k + 1 tokens fill the verify buffers)
MAX_LOGPROBS = 20  # the most likely tokens a token (generated or of the prompt) may list with its own (OpenAI's limit)
MAX_SCORED_ROWS = 1024  # prompt rows a ScorePrompt step scores at most (its StepDone stays far below a frame)
MAX_NUM_SEQS = 64  # KV slots an executor may hold (sequences decoded together in one DecodeBatch step)
MAX_CHUNK_TOKENS = 256  # prompt tokens a DecodeBatch may carry besides its decode rows (its chunks, all together)
_MAX_NESTING = 32  # free-form dicts (facts, params, usage) nest this deep at most


def _check_plain(value: Any, where: str, depth: int = 0) -> None:
    """Free-form values (facts, params) must stay plain msgpack data: no objects that a peer can't rebuild."""
    if depth > _MAX_NESTING:
        raise ValueError(f"{where}: nested deeper than {_MAX_NESTING}")
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            check_type(key, str, f"{where} key")
            _check_plain(item, f"{where}.{key}", depth + 1)
        return
    raise ValueError(f"{where}: {type(value).__name__} is not plain msgpack data")


# Item types whose exact-type check is the whole check (bool is not an int here: `type(True) is not int`).
_PLAIN_ITEMS: Mapping[Any, type] = {int: int, str: str}


def check_type(value: Any, hint: Any, where: str) -> None:
    """Raise ValueError unless `value` matches the annotation `hint` (the small subset the messages use)."""
    if fits(hint)(value):  # the usual case, without walking the annotation again
        return
    _explain(value, hint, where)
    raise ValueError(f"{where}: expected {hint}, got {type(value).__name__}")  # (`_explain` raises first)


def _is_plain(value: Any, depth: int = 0) -> bool:
    """`_check_plain` as a predicate."""
    if depth > _MAX_NESTING:
        return False
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and _is_plain(item, depth + 1) for key, item in value.items())
    return False


@functools.cache
def fits(hint: Any) -> Callable[[Any], bool]:
    """A predicate that holds exactly when `check_type(value, hint)` passes, built once per annotation: validating
    a client's GenerateRequest walked its annotations with typing.get_origin/get_args on every frame (~18 us of
    its ~25 us decode on the CPU machine)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if len(args) == 2 and type(None) in args:  # X | None, most optional fields
            other = fits(args[0] if args[1] is type(None) else args[1])
            return lambda value: value is None or other(value)
        arms = tuple(fits(arm) for arm in args)
        return lambda value: any(arm(value) for arm in arms)
    kind = origin or hint
    if kind is int:
        shallow: Callable[[Any], bool] = lambda value: isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        shallow = lambda value: isinstance(value, (int, float)) and not isinstance(value, bool)  # noqa: E731
    else:
        shallow = lambda value: isinstance(value, kind)  # noqa: E731
    if hint is dict or hint is list:
        return lambda value: shallow(value) and _is_plain(value)
    if kind is list or kind is tuple:
        plain, item = _PLAIN_ITEMS.get(args[0]), fits(args[0])
        return lambda value: shallow(value) and (
            plain is not None and all(type(x) is plain for x in value) or all(item(x) for x in value))
    if kind is dict:
        key, item = fits(args[0]), fits(args[1])
        return lambda value: shallow(value) and all(key(k) and item(x) for k, x in value.items())
    return shallow


def _explain(value: Any, hint: Any, where: str) -> None:
    """check_type's walk, which names what is wrong and where (run once `fits` has said something is)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        for arm in args:
            try:
                return check_type(value, arm, where)
            except ValueError:
                pass
        raise ValueError(f"{where}: expected {hint}, got {type(value).__name__}")
    kind = origin or hint
    if kind is int or kind is float:  # bool is an int to Python, never to the protocol
        ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ValueError(f"{where}: expected {kind.__name__}, got {type(value).__name__}")
    if hint is dict or hint is list:
        _check_plain(value, where)
    elif kind is list or kind is tuple:  # list[X] and tuple[X, ...]
        plain = _PLAIN_ITEMS.get(args[0])
        if plain is not None and all(type(item) is plain for item in value):
            return  # token ids: one pass in C instead of a call per id (~4 us per 100 ids, not ~300)
        for i, item in enumerate(value):
            check_type(item, args[0], f"{where}[{i}]")
    elif kind is dict:
        for key, item in value.items():
            check_type(key, args[0], f"{where} key")
            check_type(item, args[1], f"{where}[{key!r}]")


@functools.cache
def field_types(cls: type) -> Mapping[str, Any]:
    """Field name -> resolved annotation, in declaration order (the codec uses it to rebuild nested specs)."""
    hints = typing.get_type_hints(cls)
    return types.MappingProxyType({f.name: hints[f.name] for f in dataclasses.fields(cls)})


@functools.cache
def _field_checks(cls: type) -> tuple[tuple[str, Any, Callable[[Any], bool]], ...]:
    """(name, annotation, its `fits` predicate) for each field of a record class."""
    return tuple((name, hint, fits(hint)) for name, hint in field_types(cls).items())


def _check_non_negative(where: str, *values: int) -> None:
    for value in values:
        if value < 0:
            raise ValueError(f"{where}: must be >= 0, got {value}")


class Record:
    """`validate()` type-checks every field (records recursively), then runs the class's own value checks."""

    def validate(self) -> None:
        for name, hint, holds in _field_checks(type(self)):
            value = getattr(self, name)
            if not holds(value):
                check_type(value, hint, f"{type(self).__name__}.{name}")  # raises, naming what is wrong
            if isinstance(value, Record):
                value.validate()
        request_id = getattr(self, "request_id", None)
        if request_id is not None and not 0 < len(request_id) <= MAX_ID_CHARS:
            raise ValueError(f"{type(self).__name__}.request_id must be 1..{MAX_ID_CHARS} characters")
        self._validate()

    def _validate(self) -> None:
        """Value checks beyond types; each class overrides as needed."""


@dataclass(frozen=True)
class TensorSpec(Record):
    """Where a shared tensor lives (shm segment name or CUDA IPC handle) and its dtype, shape and offset."""

    SHM: ClassVar[str] = "shm"
    CUDA_IPC: ClassVar[str] = "cuda_ipc"

    name: str
    dtype: str  # "float32", "bfloat16", ... (shared_tensor.TORCH_DTYPES maps it)
    shape: tuple[int, ...]
    kind: str
    handle: bytes | str  # shm: segment name (str); cuda_ipc: cudaIpcMemHandle bytes
    offset_bytes: int = 0  # of the first element within the segment / storage
    device: int | None = None  # cuda_ipc: CUDA device index
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.shape, list):  # msgpack has no tuples
            object.__setattr__(self, "shape", tuple(self.shape))

    def _validate(self) -> None:
        if not self.name or not self.dtype:
            raise ValueError("TensorSpec.name and .dtype must be non-empty")
        _check_non_negative("TensorSpec.shape", *self.shape)
        _check_non_negative("TensorSpec.offset_bytes", self.offset_bytes)
        wanted = {self.SHM: str, self.CUDA_IPC: bytes}.get(self.kind)
        if wanted is None:
            raise ValueError(f"TensorSpec.kind must be {self.SHM!r} or {self.CUDA_IPC!r}, got {self.kind!r}")
        if not isinstance(self.handle, wanted) or not self.handle:
            raise ValueError(f"TensorSpec.handle for kind {self.kind!r} must be non-empty {wanted.__name__}")
        if self.kind == self.CUDA_IPC and (self.device is None or self.device < 0):
            raise ValueError("TensorSpec.device must be a CUDA device index for kind 'cuda_ipc'")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class StepBufferSpecs(Record):
    """The executor's step buffers as exported in `Ready`; `ipc.step_buffers.StepBuffers` is their one
    description (shapes, dtypes, who writes what) and opens them."""

    input_ids: TensorSpec
    next_token: TensorSpec
    logits: TensorSpec
    batch_logits: TensorSpec
    verify_logits: TensorSpec
    token_ring: TensorSpec


@dataclass(frozen=True)
class EventHandles(Record):
    """cudaIpcEventHandle bytes of the two events that order the steps on the GPU (`ipc.events.StepEvents`)."""

    executor: bytes
    jit: bytes


# Names the chat template renderer passes itself, or that transformers' apply_chat_template takes as its own
# arguments: a request's template kwargs may not set them (so both tokenizer paths treat them alike).
RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "add_generation_prompt", "continue_final_message", "chat_template",
                                      "tokenize", "tools", "documents", "return_dict", "padding", "truncation",
                                      "max_length", "return_tensors", "return_assistant_tokens_mask",
                                      "sanitize_control_tokens", "tokenizer_kwargs"})


@dataclass(frozen=True)
class ChatOptions(Record):
    """How chat messages become a prompt (vLLM's chat request extras): `add_generation_prompt` ends it with the
    assistant turn's opening; `continue_final_message` instead leaves the last (assistant) message open, so that
    the reply continues it; `template_kwargs` are extra variables for the chat template (e.g. enable_thinking);
    `tools` the tools it describes to the model."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    template_kwargs: dict = field(default_factory=dict)
    tools: list | None = None  # OpenAI's `tools` entries, for the template to describe (its `tools` variable)

    def _validate(self) -> None:
        if self.tools is not None and not all(isinstance(t, dict) for t in self.tools):
            raise ValueError("chat tools must be a list of dicts (OpenAI's tools entries)")
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("continue_final_message needs add_generation_prompt false (the reply continues the last "
                             "message instead of opening a new turn)")
        reserved = sorted(str(k) for k in self.template_kwargs if k in RESERVED_TEMPLATE_KWARGS)
        if reserved:
            raise ValueError(f"chat template kwargs may not set {', '.join(reserved)}")
        bad = sorted(repr(k) for k in self.template_kwargs if not isinstance(k, str))
        if bad:
            raise ValueError(f"chat template kwargs need string names, got {', '.join(bad)}")


class FinishReason:
    """The closed set of reasons a `Finished` carries; the HTTP layer maps them onto OpenAI's."""

    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context is full
    ABORT = "abort"  # cancelled by its client, its client went away (vLLM's name)
    ALL = (STOP, LENGTH, ABORT)


class Message(Record):
    """Base of every message kind; subclasses are frozen dataclasses with a unique class-level `TAG`."""

    TAG: ClassVar[int]


# -- session lifecycle and replies (1-9) -----------------------------------------------------------------


@dataclass(frozen=True)
class Handshake(Message):
    """First message on a channel, each way; its fields never change across protocol versions."""

    TAG: ClassVar[int] = 1
    protocol_version: int
    role: str  # "executor", "jit_context", "client"
    pid: int


@dataclass(frozen=True)
class Ready(Message):
    """The executor's weights are on the device; `buffers` are its static step buffers, exported once, and
    `events` (GPU only) the IPC events that order steps and sampling. The answer to the JIT context's Handshake, sent
    once, or twice when the executor answers while it still captures graphs (`captures_pending`). `facts` is
    informational only (load time, graphs, memory: what `status` shows); nothing the protocol needs rides in it."""

    TAG: ClassVar[int] = 2
    protocol_version: int
    model_name: str
    vocab_size: int
    max_context: int
    dtype: str
    device: str
    buffers: StepBufferSpecs
    eos_token_ids: list[int]
    events: EventHandles | None = None
    tokenizer_path: str | None = None  # a folder or file the tokenizer loads from; None: the model has none
    facts: dict = field(default_factory=dict)
    draft_model: str | None = None  # the executor's draft model for speculative decoding, if it has one
    draft_params: int = 0  # its parameter count (the JIT context's cost model compares it with the target's)
    doorbell: str | None = None  # the step doorbell's file (ipc/doorbell.py), if the executor watches one
    max_num_seqs: int = 1  # KV slots: sequences the executor holds at once (Prefill.slot, DecodeBatch)
    # The executor still captures its start-up graphs: the JIT context may open the buffers and set itself up, but
    # sends no step until a second Ready (the same buffers, captures_pending False) says they are done.
    captures_pending: bool = False

    def _validate(self) -> None:
        if self.vocab_size <= 0 or self.max_context <= 0:
            raise ValueError("Ready.vocab_size and .max_context must be > 0")
        if not 1 <= self.max_num_seqs <= MAX_NUM_SEQS:
            raise ValueError(f"Ready.max_num_seqs must be in 1..{MAX_NUM_SEQS}, got {self.max_num_seqs}")
        _check_non_negative("Ready.eos_token_ids", *self.eos_token_ids)
        _check_non_negative("Ready.draft_params", self.draft_params)


@dataclass(frozen=True)
class Status(Message):
    TAG: ClassVar[int] = 4
    api_key: str | None = field(default=None, repr=False)  # the server's --api-key, if any (`AUTHENTICATED`)


@dataclass(frozen=True)
class StatusReply(Message):
    TAG: ClassVar[int] = 5
    facts: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Ok(Message):
    TAG: ClassVar[int] = 6
    request_id: str | None = None


@dataclass(frozen=True)
class Error(Message):
    """Reply to anything that failed; `code` is a ProtocolError code or a subsystem's own short code."""

    TAG: ClassVar[int] = 7
    code: str
    message: str
    request_id: str | None = None


# -- executor step control (10-19) -----------------------------------------------------------------------
# A step's `step` numbers increase over the JIT context's life (RemoteExecutor counts them, never from 1 again): the
# executor drops a command numbered at or below the last step it ran, a copy from the other path (ipc/doorbell.py).


@dataclass(frozen=True)
class Prefill(Message):
    """Run prompt positions [start_pos, start_pos + num_tokens) of KV slot `slot`; their ids are at the same
    positions of the slot's row of the shared input-ids buffer (zero-copy). A long prompt may come as several
    Prefills, start_pos advancing. The last position's logits land in `logits`."""

    TAG: ClassVar[int] = 10
    request_id: str
    step: int
    num_tokens: int
    start_pos: int
    slot: int = 0

    def _validate(self) -> None:
        _check_non_negative("Prefill.step/start_pos/slot", self.step, self.start_pos, self.slot)
        if self.num_tokens < 1:
            raise ValueError(f"Prefill.num_tokens must be >= 1, got {self.num_tokens}")


@dataclass(frozen=True)
class Decode(Message):
    """One decode step: the input token sits in the shared buffer, to be written at KV position `position`.
    `argmax`: the executor then takes the greedy token of the step's logits itself (a plain greedy request), writes
    it into next_token (the next step's input) and files it at token_ring[position % TOKEN_RING] for the JIT context
    to read. `own_input`: the input token is the one the executor's previous step wrote that way, so the step does
    not wait for the JIT context's GPU work (its IPC event): no cross-process hand-over between two such steps."""

    TAG: ClassVar[int] = 11
    request_id: str
    step: int
    position: int
    argmax: bool = False
    own_input: bool = False

    def _validate(self) -> None:
        _check_non_negative("Decode.step/position", self.step, self.position)


@dataclass(frozen=True)
class PromptChunk:
    """Prompt positions [start_pos, start_pos + num_tokens) of KV slot `slot`, run in the same step as a DecodeBatch's
    decode rows (its ids in the slot's row of input_ids, as for a Prefill); its last position's logits land in
    `StepBuffers.chunk_logits(i)` for the step's i-th chunk (`logits` for the first)."""

    num_tokens: int
    start_pos: int
    slot: int


@dataclass(frozen=True)
class DecodeBatch(Message):
    """One decode step of several sequences: row b consumes next_token[slots[b]] at KV position positions[b] of
    slot slots[b], and its logits land in row b of `batch_logits`. Slots are distinct. The same step may also run
    prompt chunks of other slots (chunk i: chunk_tokens[i] positions from chunk_starts[i] of slot chunk_slots[i]):
    one pass over the weights for all, so prompts arriving while others decode cost them one step of their chunks'
    length, not a decode step plus a prefill each."""

    TAG: ClassVar[int] = 16
    request_id: str
    step: int
    slots: list[int]
    positions: list[int]
    chunk_tokens: list[int] = field(default_factory=list)
    chunk_starts: list[int] = field(default_factory=list)
    chunk_slots: list[int] = field(default_factory=list)

    def _validate(self) -> None:
        _check_non_negative("DecodeBatch.step", self.step)
        _check_non_negative("DecodeBatch.slots/positions/chunk_starts/chunk_slots", *self.slots, *self.positions,
                            *self.chunk_starts, *self.chunk_slots)
        if not 1 <= len(self.slots) <= MAX_NUM_SEQS or len(self.positions) != len(self.slots):
            raise ValueError(f"DecodeBatch needs 1..{MAX_NUM_SEQS} slots and one position per slot, got "
                             f"{len(self.slots)} slots and {len(self.positions)} positions")
        if not len(self.chunk_tokens) == len(self.chunk_starts) == len(self.chunk_slots):
            raise ValueError("DecodeBatch needs a start and a slot for each prompt chunk")
        every = self.slots + self.chunk_slots
        if len(set(every)) != len(every):
            raise ValueError(f"DecodeBatch's slots and chunk slots must be distinct, got {self.slots} and "
                             f"{self.chunk_slots}")
        if any(n < 1 for n in self.chunk_tokens) or sum(self.chunk_tokens) > MAX_CHUNK_TOKENS:
            raise ValueError(f"DecodeBatch's prompt chunks need >= 1 token each and {MAX_CHUNK_TOKENS} in all, got "
                             f"{self.chunk_tokens}")

    @property
    def chunks(self) -> list[PromptChunk]:
        return [PromptChunk(*c) for c in zip(self.chunk_tokens, self.chunk_starts, self.chunk_slots)]


@dataclass(frozen=True)
class Verify(Message):
    """A speculative verify step: the tokens at KV positions [position, position + num_tokens) sit at the same
    indices of the shared input-ids buffer (the last accepted token, then the proposals); the logits after each
    land in rows [0, num_tokens) of the verify-logits buffer. With `draft_start`, the executor's draft model first
    writes the num_tokens - 1 proposals itself (after catching up on positions [draft_start, position]). With
    `tokens` (n-gram proposals), the executor writes those ids there itself first.

    `accept`: a greedy request's acceptance runs in the executor right after the step (the longest prefix of the
    proposals equal to the target's argmax, and the argmax after it, also written to next_token), and StepDone
    carries the result: the executor answers once the step has *run*, and the JIT context launches no GPU work
    of its own between two verify steps (bench/NOTES.md, issue 11)."""

    TAG: ClassVar[int] = 15
    request_id: str
    step: int
    position: int
    num_tokens: int
    draft_start: int | None = None
    tokens: list[int] | None = None
    accept: bool = False

    def _validate(self) -> None:
        _check_non_negative("Verify.step/position", self.step, self.position)
        if self.draft_start is not None and not 0 <= self.draft_start <= self.position:
            raise ValueError(f"Verify.draft_start must be in [0, position], got {self.draft_start}")
        if self.num_tokens < 1:
            raise ValueError(f"Verify.num_tokens must be >= 1, got {self.num_tokens}")
        if self.tokens is not None:
            if self.draft_start is not None:
                raise ValueError("Verify.tokens and draft_start exclude each other (who writes the proposals?)")
            if len(self.tokens) != self.num_tokens:
                raise ValueError(f"Verify.tokens must hold num_tokens ({self.num_tokens}) ids, got {len(self.tokens)}")
            _check_non_negative("Verify.tokens", *self.tokens)


@dataclass(frozen=True)
class ScorePrompt(Message):
    """A Prefill (positions [start_pos, start_pos + num_tokens) of slot `slot`, the last one's logits into `logits`)
    that also scores its first `scored` rows: row i's log-probability of the prompt id at position start_pos + i + 1
    (the next one, from the slot's row of input_ids) under the model's raw logits, and its `logprobs` most likely
    tokens' (`SamplingParams.prompt_logprobs`). The executor answers once the step has run, with the values in
    StepDone.logprobs. Never rung on the doorbell (the answer's values do not fit it); `scored` <= MAX_SCORED_ROWS keeps
    the answer well inside a frame."""

    TAG: ClassVar[int] = 17
    request_id: str
    step: int
    num_tokens: int
    start_pos: int
    slot: int
    logprobs: int
    scored: int

    def _validate(self) -> None:
        _check_non_negative("ScorePrompt.step/start_pos/slot/logprobs", self.step, self.start_pos, self.slot,
                            self.logprobs)
        if self.num_tokens < 1:
            raise ValueError(f"ScorePrompt.num_tokens must be >= 1, got {self.num_tokens}")
        if not 0 <= self.scored <= min(self.num_tokens, MAX_SCORED_ROWS):
            raise ValueError(f"ScorePrompt.scored must be in [0, min(num_tokens, {MAX_SCORED_ROWS})], got "
                             f"{self.scored} of {self.num_tokens} tokens")
        if self.logprobs > MAX_LOGPROBS:
            raise ValueError(f"ScorePrompt.logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")


@dataclass(frozen=True)
class StepDone(Message):
    """The executor enqueued `step`: its logits are (or, ordered by an IPC event, will be) in their buffer. For a
    Verify with `accept`, the step has run and `accepted` is its result: the target's argmax per row [k + 1], then
    the number of proposals kept (the first kept + 1 tokens are the output). For a ScorePrompt, the step has run and
    `logprobs` holds each scored row's values, row after row: the next id's log-probability, its rank (1 + the tokens
    more likely), the k most likely tokens' log-probabilities (most likely first), then their ids (2 + 2k a row)."""

    TAG: ClassVar[int] = 12
    request_id: str
    step: int
    accepted: list[int] | None = None
    logprobs: list[float] | None = None


@dataclass(frozen=True)
class Reset(Message):
    TAG: ClassVar[int] = 13
    request_id: str


# -- client-facing (20-29) -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerateRequest(Message):
    """A client's request; exactly one of prompt (raw text), messages (chat) or token_ids is given."""

    TAG: ClassVar[int] = 20
    request_id: str
    prompt: str | None = None
    messages: list[dict] | None = None
    token_ids: list[int] | None = None
    params: dict = field(default_factory=dict)  # sampling and stop parameters, checked by the JIT context
    api_key: str | None = field(default=None, repr=False)  # the server's --api-key, if any (`AUTHENTICATED`)
    chat: ChatOptions | None = None  # with messages only; None: the defaults
    # a launcher's start-up request through its own HTTP path: served as any other, not logged or counted in metrics
    warm_up: bool = False

    def _validate(self) -> None:
        given = [f for f in ("prompt", "messages", "token_ids") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError(f"GenerateRequest needs exactly one of prompt, messages, token_ids; got {given}")
        if self.chat is not None and self.messages is None:
            raise ValueError("GenerateRequest.chat (chat template options) applies to messages only")
        if self.token_ids is not None:
            _check_non_negative("GenerateRequest.token_ids", *self.token_ids)


@dataclass(frozen=True)
class TokenLogprob(Record):
    """A generated token's log-probability under the model's distribution (its raw logits, before any penalty,
    bias or temperature, as vLLM reports them), and the most likely tokens' (`SamplingParams.logprobs` of them,
    most likely first). `text`: the token decoded alone."""

    token: int
    text: str
    logprob: float
    top_ids: list[int] = field(default_factory=list)
    top_texts: list[str] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)
    rank: int | None = None  # (a prompt token's) 1 + the tokens more likely there; None where not computed

    def _validate(self) -> None:
        if not len(self.top_ids) == len(self.top_texts) == len(self.top_logprobs):
            raise ValueError("TokenLogprob's top_ids, top_texts and top_logprobs must be as long")


@dataclass(frozen=True)
class TokenChunk(Message):
    TAG: ClassVar[int] = 21
    request_id: str
    text: str
    token_ids: list[int]


@dataclass(frozen=True)
class LogprobsChunk(TokenChunk):
    """A TokenChunk of a request that asked for logprobs (`SamplingParams.logprobs`): one entry per token of token_ids
    whose text is in the reply (a token that ends it, EOS or a stop token id, has none). A kind of its own, so that
    a plain chunk carries no field more (its encode and decode are the token path's), and only here, not again in
    Finished: a long reply's entries would pass the frame limit."""

    TAG: ClassVar[int] = 29
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class PromptLogprobsChunk(TokenChunk):
    """The prompt's log-probabilities (`SamplingParams.prompt_logprobs`), before the request's first token: the
    entries of prompt positions [start, start + len(prompt_logprobs)), each the prompt token's log-probability given
    the tokens before it (position 0 has none: the first chunk starts at 1). A long prompt comes in several chunks.
    A TokenChunk with no text and no token ids, so that a reader of the token stream passes over it; not a
    LogprobsChunk (its entries are not the reply's)."""

    TAG: ClassVar[int] = 30
    start: int = 1
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    first_text: str | None = None  # (the chunk at start 1) the prompt's first token decoded alone: it has no entry

    def _validate(self) -> None:
        if self.text or self.token_ids:
            raise ValueError("PromptLogprobsChunk carries no text and no token ids")
        if self.start < 1:
            raise ValueError(f"PromptLogprobsChunk.start must be >= 1 (position 0 has no log-probability), got "
                             f"{self.start}")


@dataclass(frozen=True)
class Finished(Message):
    TAG: ClassVar[int] = 22
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str  # one of FinishReason.ALL (a failed request gets an `Error` instead)
    usage: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    def _validate(self) -> None:
        if self.finish_reason not in FinishReason.ALL:
            raise ValueError(f"Finished.finish_reason must be one of {FinishReason.ALL}, got {self.finish_reason!r}")


@dataclass(frozen=True)
class CancelRequest(Message):
    TAG: ClassVar[int] = 23
    request_id: str
    api_key: str | None = field(default=None, repr=False)  # the server's --api-key, if any (`AUTHENTICATED`)


@dataclass(frozen=True)
class TokenizeRequest(Message):
    """Text or chat messages -> token ids, as a generation would see them; answered at once (never queued)."""

    TAG: ClassVar[int] = 24
    request_id: str
    prompt: str | None = None
    messages: list[dict] | None = None
    add_generation_prompt: bool = True  # chat: end with the assistant turn's opening
    api_key: str | None = field(default=None, repr=False)  # the server's --api-key, if any (`AUTHENTICATED`)
    tools: list | None = None  # chat: the tools the template describes (ChatOptions.tools)

    def _validate(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("TokenizeRequest needs exactly one of prompt, messages")
        if self.tools is not None and (self.messages is None or not all(isinstance(t, dict) for t in self.tools)):
            raise ValueError("TokenizeRequest.tools: a list of dicts, with messages only")


@dataclass(frozen=True)
class TokenizeReply(Message):
    TAG: ClassVar[int] = 25
    request_id: str
    token_ids: list[int]
    max_context: int


@dataclass(frozen=True)
class DetokenizeRequest(Message):
    TAG: ClassVar[int] = 26
    request_id: str
    token_ids: list[int]
    api_key: str | None = field(default=None, repr=False)  # the server's --api-key, if any (`AUTHENTICATED`)

    def _validate(self) -> None:
        _check_non_negative("DetokenizeRequest.token_ids", *self.token_ids)


@dataclass(frozen=True)
class DetokenizeReply(Message):
    TAG: ClassVar[int] = 27
    request_id: str
    text: str


@dataclass(frozen=True)
class Started(Message):
    """The request leaves the queue for the executor; the first message of its answer. For a request that waited
    behind another it is sent before the prefill, so that a client gone meanwhile is found (its identity no longer
    routes) before its prompt is prefilled; for one that found the server idle, right after the prefill is sent
    (off the way to the executor). Clients skip it."""

    TAG: ClassVar[int] = 28
    request_id: str
    queue_ms: float
    # how long the client may spin for each of this request's next messages before it sleeps (`ipc.reply_spin`):
    # > 0 only from a server on a GPU with cores to spare, whose answers come within that
    spin_ms: float = 0.0


ALL_MESSAGES: tuple[type[Message], ...] = (
    Handshake, Ready, Status, StatusReply, Ok, Error,
    Prefill, Decode, StepDone, Reset, Verify, DecodeBatch, ScorePrompt,
    GenerateRequest, TokenChunk, LogprobsChunk, PromptLogprobsChunk, Finished, CancelRequest,
    TokenizeRequest, TokenizeReply, DetokenizeRequest, DetokenizeReply, Started,
)  # fmt: skip


def _index_by_tag(classes: tuple[type[Message], ...]) -> Mapping[int, type[Message]]:
    by_tag: dict[int, type[Message]] = {}
    for cls in classes:
        tag = cls.__dict__.get("TAG")
        if not isinstance(tag, int) or isinstance(tag, bool):
            raise TypeError(f"{cls.__name__} must define its own int TAG")
        if tag in by_tag:
            raise TypeError(f"{cls.__name__} and {by_tag[tag].__name__} share tag {tag}")
        by_tag[tag] = cls
    return types.MappingProxyType(by_tag)


MESSAGE_TYPES: Mapping[int, type[Message]] = _index_by_tag(ALL_MESSAGES)
# Retired tags, never to be reused: 3 (Shutdown) and 14 (Abort), protocol version 1.
# What a client sends that a server with an API key refuses without it (a native client's only requests).
AUTHENTICATED: frozenset[type[Message]] = frozenset(
    {Status, GenerateRequest, CancelRequest, TokenizeRequest, DetokenizeRequest})
SESSION_MESSAGES: frozenset[type[Message]] = frozenset({Handshake, Ready})  # always validated in full
