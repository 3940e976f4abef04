"""A reply held to its structured output (`jit_context.structured_output`), token by token: llguidance's matcher
over the model's vocabulary, and the mask of the tokens it allows next.

`Grammars` is built once per tokenizer (llguidance's view of the vocabulary: ~0.3 s for a 49k-token vocabulary on
the CPU machine, so at the first request that asks for structured output, then kept); each such request gets a
`Constraint`: its matcher and the mask of its next draw, one bit per token in int32 words [ceil(V / 32)], bit t % 32
of word t // 32 set when token t may come next (llguidance's layout). The host fills it after reading each token
(tens of us; a few ms the first time a grammar meets a new lexer state), while the device runs the next step; the
sampler copies it up and applies it (`Sampler.accept`). The tokens past the tokenizer's vocabulary (a model's padded
rows) are never allowed; the end-of-sequence tokens only where the grammar may end.

A client usually sends one schema again and again, so `Grammars` keeps the last CACHED forms' checked grammars and a
pristine matcher of each with its first mask computed (the lexer states it built): a later request's matcher is a
copy of it (~0.01 ms on the CPU machine, against ~0.5-1.5 ms to check, build and fill the first mask of a regex or a
small schema; on the H200's host the first mask made a regex request's TTFT 5.9 ms against 1.3).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable

import torch

from jit_context.sampling_params import SamplingParams
from jit_context.structured_output import StructuredOutput, one_line

CACHED = 32  # forms whose checked grammar and pristine matcher `Grammars` keeps (least recently used dropped)


def mask_words(vocab_size: int) -> int:
    """int32 words of a mask over vocab_size tokens."""
    return (vocab_size + 31) // 32


class Constraint:
    """One request's matcher and the mask of the tokens it allows next (`words`, host int32 [W], pinned on a GPU
    so that its copy up is a plain DMA)."""

    def __init__(self, matcher, vocab_size: int, pin: bool) -> None:
        self._matcher = matcher
        self.words = torch.zeros(mask_words(vocab_size), dtype=torch.int32, pin_memory=pin)  # [W] host
        self._fill()

    def _fill(self) -> None:
        self._matcher.unsafe_compute_mask_ptr(self.words.data_ptr(), self.words.numel() * 4)
        if self._matcher.is_error():
            raise ValueError(f"structured output: {one_line(self._matcher.get_error())}")

    def advance(self, token_id: int) -> None:
        """Token token_id was drawn: move the matcher past it and compute the next mask. ValueError if the matcher
        fails: one of its limits (a grammar too ambiguous for the reply so far), or a token it refuses (only a draw
        that ignored the mask would bring one: a bug)."""
        if not self._matcher.consume_token(token_id):
            raise ValueError(f"structured output: the matcher stopped at token {token_id}: "
                             f"{one_line(self._matcher.get_error())}")
        self._fill()  # (a whole match leaves the end-of-sequence tokens only)

    @property
    def accepting(self) -> bool:
        """Whether the reply so far is a whole match (the grammar may end here)."""
        return self._matcher.is_accepting()


class Grammars:
    """llguidance's view of one tokenizer's vocabulary, and the requests' matchers over it."""

    def __init__(self, tokenizer_json: Callable[[], str], vocab_size: int, eos_token_ids: Iterable[int],
                 limits: dict[str, int] | None = None) -> None:
        """`tokenizer_json`: gives the tokenizers library's JSON of the tokenizer (`Tokenizer.backend_json`), called
        at the first use; vocab_size: the model's logits (may exceed the tokenizer's); eos_token_ids: the tokens
        that end a reply; `limits`: llguidance's parser limits (`LLParserLimits`' arguments) other than its
        defaults, which bound the host time of one token's mask (its lexer ~15 ms, its parser ~2.5 ms)."""
        self._json = tokenizer_json
        self.vocab_size = vocab_size
        self._eos = sorted(set(eos_token_ids))
        self._limits = dict(limits or {})
        self._tokenizer = None  # llguidance.LLTokenizer, built at first use (or by `prepare_in_background`)
        self._building = threading.Lock()  # one build: a request waits for the background one rather than repeat it
        # The last CACHED forms: their checked grammar text, and a matcher that never consumes a token (its first
        # mask computed), copied for each request. A lock: arrival checks and request starts may run on two threads.
        self._grammar: OrderedDict[StructuredOutput, str] = OrderedDict()
        self._pristine: OrderedDict[StructuredOutput, object] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def tokenizer(self):
        with self._building:
            if self._tokenizer is None:
                from llguidance import LLTokenizer

                self._tokenizer = LLTokenizer(self._json(), n_vocab=self.vocab_size, eos_token=self._eos or None)
            return self._tokenizer

    @property
    def prepared(self) -> bool:
        """Whether llguidance's view of the vocabulary is built."""
        return self._tokenizer is not None

    def prepare_in_background(self) -> threading.Thread:
        """Build llguidance's view of the vocabulary on a daemon thread (the server's start: ~0.2 s for SmolLM2's on
        the CPU machine, which the first structured request would otherwise pay in its TTFT, holding the serving
        loop). A failure there is left to that request, which builds it again and reports it."""

        def build() -> None:
            try:
                self.tokenizer
            except Exception:  # (reported by the first request that needs it)
                pass

        thread = threading.Thread(target=build, name="grammar-vocabulary", daemon=True)
        thread.start()
        return thread

    def _parser_limits(self):
        from llguidance import LLParserLimits

        return LLParserLimits(**self._limits, verbose_errors=False)  # (no dump of the parser's state)

    def check(self, spec: StructuredOutput) -> str:
        """llguidance's grammar of spec, checked against this vocabulary too (special tokens the grammar names,
        token ranges); ValueError naming what is wrong (a bad spec is not kept: it is checked again each time). The
        first call builds llguidance's view of the vocabulary (~0.2 s for SmolLM2's on the CPU machine) unless
        `prepare_in_background` has."""
        grammar = self._cached(self._grammar, spec)
        if grammar is None:
            grammar = spec.checked_grammar(self.tokenizer, self._parser_limits())
            self._keep(self._grammar, spec, grammar)
        return grammar

    def constraint(self, spec: StructuredOutput, pin: bool) -> Constraint:
        """A new request's matcher for spec and its first mask. ValueError for a bad spec."""
        pristine = self._cached(self._pristine, spec)
        if pristine is None:
            from llguidance import LLMatcher

            pristine = LLMatcher(self.tokenizer, self.check(spec), log_level=0, limits=self._parser_limits())
            # its first mask, once: the lexer states that takes are then in every copy
            Constraint(pristine, self.vocab_size, pin=False)
            self._keep(self._pristine, spec, pristine)
        return Constraint(pristine.deep_copy(), self.vocab_size, pin)

    @property
    def cached(self) -> int:
        """How many forms have a pristine matcher kept (at most CACHED)."""
        return len(self._pristine)

    def kept(self, spec: StructuredOutput) -> bool:
        """Whether spec's pristine matcher is kept (without counting as a use)."""
        with self._lock:
            return spec in self._pristine

    def _cached(self, cache: OrderedDict, spec: StructuredOutput):
        with self._lock:
            value = cache.get(spec)
            if value is not None:
                cache.move_to_end(spec)
            return value

    def _keep(self, cache: OrderedDict, spec: StructuredOutput, value) -> None:
        with self._lock:
            cache[spec] = value
            while len(cache) > CACHED:
                cache.popitem(last=False)


def make_constraint(grammars: Grammars | None, params: SamplingParams, device: torch.device) -> Constraint | None:
    """The Constraint of a request's params.structured on `device`'s sampler (None without one). ValueError for a
    bad spec, or without `grammars` (no tokenizer)."""
    if params.structured is None:
        return None
    if grammars is None:
        raise ValueError("structured output needs the model's tokenizer (a dummy model takes --tokenizer PATH)")
    return grammars.constraint(params.structured, pin=torch.device(device).type == "cuda")
