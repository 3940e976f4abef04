"""The OpenAI wire format of the HTTP API: request bodies (pydantic, unknown fields refused), their
translation into the native protocol's prompt and sampling params, and the response, chunk and error bodies.

Only what hybridrt can honour is accepted. Fields that clients send with neutral values (echo=false, ...)
pass; any other value is an `Unsupported` error (HTTP 400) rather than being silently ignored.
OpenAI's presence_penalty, frequency_penalty, logit_bias, logprobs (each generated token's and its top
tokens', in the chat and the completions forms) and response_format (structured output: a JSON schema or any JSON
object; vLLM's structured_outputs and guided_json / regex / choice / grammar likewise), and vLLM's extras (top_k,
min_p, repetition_penalty, ignore_eos, stop_token_ids, min_tokens, skip_special_tokens; for chats add_generation_prompt,
continue_final_message, chat_template_kwargs) pass through to the sampling params, whose checks are the JIT
context's.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ipc.messages import ChatOptions, FinishReason, PromptLogprobsChunk, TokenLogprob
from jit_context.quoting import quote
from jit_context.sampling_params import MAX_LOGPROBS
from launch.tool_calls import ToolCall, named_schema, required_schema

TokenId = Annotated[int, Field(ge=0)]
MAX_BATCH_CHOICES = 64  # a completions request's prompts x n (each a native request side by side)
MAX_N = 16  # completions per request (`n`): each its own native request, run side by side
# Native finish reason -> OpenAI's; "abort" has no OpenAI name and keeps vLLM's.
FINISH_REASONS = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.ABORT: "abort"}


class Unsupported(ValueError):
    """A well-formed request asking for something hybridrt does not do; `param` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Fields shared by completions and chat completions. Fields this API does not know are accepted and ignored
    (as vLLM does; the server warns once per field name): clients send their SDK's newest fields. Known fields
    with a meaning hybridrt cannot honour are refused in `check_supported`."""

    model_config = ConfigDict(extra="allow")

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})

    model: str
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[TokenId] | None = None
    min_tokens: int | None = None
    skip_special_tokens: bool | None = None
    prompt_logprobs: int | None = None  # vLLM's: each prompt token's log-probability and the N most likely there
    # Structured output: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields (one of
    # them; `structured` reads them)
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # accepted and ignored: llguidance is the one backend

    @property
    def choices(self) -> int:
        return self.n or 1

    def choice_params(self, params: dict[str, Any], index: int) -> dict[str, Any]:
        """The native params of completion `index` of n: a given seed moves on by the index (so that sampled
        choices differ and each stays reproducible), none stays none (each draws its own)."""
        if index == 0 or params.get("seed") is None:
            return params
        return {**params, "seed": (params["seed"] + index) % (2**63)}

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def check_supported(self) -> None:
        if self.n is not None and not 1 <= self.n <= MAX_N:
            raise Unsupported("n", f"n must be in [1, {MAX_N}], got {self.n}")
        if self.prompt_logprobs is not None:
            if not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
                raise Unsupported("prompt_logprobs", f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got "
                                                     f"{self.prompt_logprobs}")
            if self.stream:
                raise Unsupported("prompt_logprobs", "prompt_logprobs are not available with stream (as vLLM): a "
                                                     "completion's echo with logprobs streams them")
        self.structured()

    def structured(self) -> dict[str, Any] | None:
        """The native `structured` params (StructuredOutput's wire dict) of whichever form the request uses; None for
        none. Unsupported when it uses two, or a response_format type hybridrt does not know; the JIT context checks
        the schema, regex or grammar itself."""
        if self.response_format is None and self.structured_outputs is None and self.guided_json is None \
                and self.guided_regex is None and self.guided_choice is None and self.guided_grammar is None:
            return None  # (the usual request: twice a request on the HTTP path, ~1 us saved each)
        given: list[tuple[str, dict[str, Any]]] = []
        if self.response_format is not None and (form := _response_format(self.response_format)) is not None:
            given.append(("response_format", form))
        if self.structured_outputs is not None:
            given.append(("structured_outputs", dict(self.structured_outputs)))
        guided = {"json": self.guided_json, "regex": self.guided_regex, "choice": self.guided_choice,
                  "grammar": self.guided_grammar}
        for key, value in guided.items():
            if value is not None:
                given.append((f"guided_{key}", {key: value}))
        if len(given) > 1:
            raise Unsupported(given[1][0], f"give one structured output, not {' and '.join(n for n, _ in given)}")
        return given[0][1] if given else None

    def logprobs_count(self) -> int | None:
        """The native `logprobs`: how many top tokens each generated token lists (None: no logprobs)."""
        return None

    def sampling_params(self, max_tokens: int) -> dict[str, Any]:
        """The native params dict; None means the JIT context's default. Values are checked there."""
        params: dict[str, Any] = {
            "max_tokens": max_tokens,
            "temperature": 1.0 if self.temperature is None else self.temperature,  # OpenAI's default
            "top_p": self.top_p, "seed": self.seed, "min_p": self.min_p,
            "top_k": 0 if self.top_k == -1 else self.top_k,  # vLLM spells "off" -1, hybridrt 0
            "repetition_penalty": self.repetition_penalty, "ignore_eos": self.ignore_eos,
            "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
            "logit_bias": self.logit_bias or None,  # {"token id": bias}, as OpenAI's JSON has it
            "stop": [self.stop] if isinstance(self.stop, str) else self.stop,
            "stop_token_ids": self.stop_token_ids, "min_tokens": self.min_tokens,
            "logprobs": self.logprobs_count(), "structured": self.structured(),
            "skip_special_tokens": self.skip_special_tokens, "prompt_logprobs": self.prompt_logprobs,
        }
        return {key: value for key, value in params.items() if value is not None}


def _response_format(value: dict[str, Any]) -> dict[str, Any] | None:
    """OpenAI's response_format -> the native structured output: json_object, or json_schema's schema. Keys OpenAI
    does not define are refused (a schema beside json_object is not applied, so it must not pass silently)."""
    kind = value.get("type")
    allowed = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}.get(kind)
    if allowed is not None and set(value) - allowed:
        raise Unsupported("response_format", f"response_format of type {kind!r} takes no "
                                             f"{', '.join(sorted(map(str, set(value) - allowed)))}")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = value.get("json_schema")
        extra = sorted(map(str, set(spec) - {"name", "description", "schema", "strict"})) if isinstance(spec, dict) \
            else []
        if extra:
            raise Unsupported("response_format", f"response_format json_schema takes no {', '.join(extra)}")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise Unsupported("response_format", 'response_format {"type": "json_schema"} needs json_schema.schema, '
                                                 "an object")
        return {"json": schema}
    raise Unsupported("response_format", 'response_format type must be "text", "json_object" or "json_schema", '
                                         f"got {quote(kind)}")


class CompletionRequest(_SamplingRequest):
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        given = self.prompts()
        prompts = len(given)
        if prompts > 1 and any(not next(iter(p.values())) for p in given):  # (one alone: refused as ever, natively)
            raise Unsupported("prompt", "every prompt of a batch must be non-empty")
        if prompts * self.choices > MAX_BATCH_CHOICES:
            raise Unsupported("prompt", f"a request makes at most {MAX_BATCH_CHOICES} completions (prompts x n), "
                                        f"this one {prompts} x {self.choices}")
        if self.max_tokens == 0 and not self.echo:
            raise Unsupported("max_tokens", "max_tokens 0 is for echo (the prompt's text and, with logprobs, its "
                                            "log-probabilities, nothing generated); give max_tokens >= 1")
        if self.scores_prompt and self.prompt_logprobs not in (None, self.logprobs):
            raise Unsupported("prompt_logprobs", "with echo and logprobs the prompt's tokens list `logprobs` top "
                                                 "tokens: give prompt_logprobs the same number, or leave it out")
        if (self.scores_prompt or self.prompt_only) and self.stream and prompts * self.choices > 1:
            raise Unsupported("n" if self.choices > 1 else "prompt", "a streamed echo with logprobs or max_tokens 0 "
                                                                     "takes one prompt and one choice (n = 1)")
        if self.best_of not in (None, 1):
            raise Unsupported("best_of", "only best_of=1 is supported")
        if self.suffix is not None:
            raise Unsupported("suffix", "suffix is not supported")

    def logprobs_count(self) -> int | None:
        return self.logprobs  # the legacy form: the number of top tokens (the chosen one is listed besides)

    @property
    def scores_prompt(self) -> bool:
        """echo with logprobs: the prompt's tokens are listed with their log-probabilities before the completion's
        (OpenAI's legacy completions; what lm-evaluation-harness's loglikelihood asks, with max_tokens 0 or 1)."""
        return self.echo and self.logprobs is not None

    @property
    def prompt_only(self) -> bool:
        """max_tokens 0 with echo (vLLM's form): the prompt alone is the answer; one token is generated and dropped."""
        return self.echo and self.max_tokens == 0

    def sampling_params(self, max_tokens: int) -> dict[str, Any]:
        params = super().sampling_params(1 if self.prompt_only else max_tokens)
        if self.scores_prompt:
            params["prompt_logprobs"] = self.logprobs
        return params

    @property
    def lists_prompt(self) -> bool:
        """Whether the answer carries vLLM's `prompt_logprobs` (the request's field of that name)."""
        return self.prompt_logprobs is not None

    def prompts(self) -> list[dict[str, Any]]:
        """AsyncClient.generate's prompt argument per prompt (raw text or token ids): one, or a batch's (a list of
        strings or of token-id lists: its completions' choices then come prompt after prompt, n each)."""
        if isinstance(self.prompt, str):
            return [{"prompt": self.prompt}]
        if self.prompt and isinstance(self.prompt[0], str):
            return [{"prompt": text} for text in self.prompt]
        if self.prompt and isinstance(self.prompt[0], list):
            return [{"token_ids": list(ids)} for ids in self.prompt]
        return [{"token_ids": list(self.prompt)}]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    # (extra keys ignored: the openai SDK's helpers send back what they added, e.g. `parsed_arguments`)
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class MessageToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")  # (the SDK's stream helper adds `index`)
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # None only on an assistant message with tool_calls
    name: str | None = None  # accepted and ignored: chat templates have no place for it
    tool_calls: list[MessageToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    # What the openai SDK sends back with an assistant message it got (`messages.append(reply.message)`): accepted
    # and not shown to the template; the ones that would mean something (audio, a legacy function call) only as null.
    refusal: str | None = None
    annotations: list[Any] | None = None
    parsed: Any = None
    audio: None = None
    function_call: None = None

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls belong on an assistant message")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a tool message needs the tool_call_id it answers, and only a tool message has one")
        if self.content is None and not self.tool_calls:
            raise ValueError("content may be null only on an assistant message with tool_calls")
        return self

    def native(self) -> dict[str, Any]:
        """The native message: the system role for OpenAI's newer "developer"; tool calls with their arguments as
        objects (what chat templates render: `arguments | tojson`, as vLLM passes them); a null content as ""."""
        # (a null content, an assistant's with tool calls, is "" as vLLM renders it for string-content templates:
        # one that shows every message's content, as the default model's does, would fail on None)
        content = self.content if isinstance(self.content, str) else "" if self.content is None else \
            "".join(p.text for p in self.content)
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _loaded(c.function.arguments)}} for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def _loaded(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except (ValueError, RecursionError):
        return arguments  # as it is: the template shows it as text


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # Sent by many SDKs and frameworks with their neutral values, which pass; anything else is refused.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    # vLLM's chat extras: how the messages become the prompt
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    def check_supported(self) -> None:
        self._check_tools()  # (first: the base's structured() reads the tool choice)
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise Unsupported("top_logprobs", "top_logprobs needs logprobs: true")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise Unsupported("top_logprobs", f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}")
        if self.store:
            raise Unsupported("store", "stored completions are not supported")

    def _check_tools(self) -> None:
        if not self.tools and self.tool_choice is None:
            return
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise Unsupported("tools", "tools must have distinct function names")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise Unsupported("tool_choice", f"tool_choice names {quote(self.tool_choice.function.name)}, which is "
                                             f"not one of the tools")
        if self.tool_choice == "required" and not names:
            raise Unsupported("tool_choice", 'tool_choice "required" needs tools')

    def tool_mode(self) -> str | None:
        """How the reply may call tools (launch.tool_calls.MODES), or None: no tools, or tool_choice "none"."""
        if not self.tools or self.tool_choice == "none":
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    def tool_names(self) -> set[str]:
        return {t.function.name for t in self.tools or ()}

    def named_tool(self) -> str | None:
        return self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None

    def structured(self) -> dict[str, Any] | None:
        """As the base's, and a tool choice that holds the reply (required, a named function) as its JSON form;
        Unsupported beside another structured output."""
        form = super().structured()
        mode = self.tool_mode() if self.tools else None
        if mode not in ("required", "named"):
            return form
        if form is not None:
            raise Unsupported("tool_choice", f"tool_choice {mode!r} holds the reply to its tools' form already: "
                                             f"give no other structured output")
        tools = [t.model_dump(exclude_none=True) for t in self.tools]
        if mode == "named":
            return {"json": named_schema(next(t for t in tools if t["function"]["name"] == self.named_tool()))}
        try:
            return {"json": required_schema(tools, self.parallel_tool_calls is not False)}
        except ValueError as e:
            raise Unsupported("tools", str(e)) from None

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_options(self) -> ChatOptions | None:
        """The native protocol's chat template options (None: the defaults); Unsupported for a bad combination."""
        if self.add_generation_prompt and not self.continue_final_message and not self.chat_template_kwargs \
                and not self.tools:
            return None
        tools = [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None
        options = ChatOptions(self.add_generation_prompt, self.continue_final_message,
                              dict(self.chat_template_kwargs or {}), tools)
        try:
            options.validate()
        except ValueError as e:
            param = "chat_template_kwargs" if "kwargs" in str(e) else "tools" if "tools" in str(e) \
                else "continue_final_message"
            raise Unsupported(param, str(e)) from None
        return options


class TokenizeBody(BaseModel):
    """vLLM's `POST /tokenize`: a prompt, or chat messages with the chat template applied."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    tools: list[ToolSpec] | None = None  # with messages: counted as the chat template describes them


class DetokenizeBody(BaseModel):
    """vLLM's `POST /detokenize`."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[TokenId]


# -- response bodies ---------------------------------------------------------------------------------------


def finish_reason(native: str) -> str:
    return FINISH_REASONS[native]


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def models_body(model_name: str, max_context: int, created: int, weight_format: str | None = None) -> dict:
    model = {"id": model_name, "object": "model", "created": created, "owned_by": "hybridrt",
             "max_model_len": max_context}
    if weight_format:
        model["weight_format"] = weight_format  # e.g. "float16", "int4-g32+offset (embed_tokens: int8-g32)"
    return {"object": "list", "data": [model]}


def chat_logprobs(entries: list[TokenLogprob] | None) -> dict | None:
    """A chat choice's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""
    if entries is None:
        return None
    return {"content": [{"token": e.text, "logprob": e.logprob, "bytes": list(e.text.encode()),
                         "top_logprobs": [{"token": text, "logprob": lp, "bytes": list(text.encode())}
                                          for text, lp in zip(e.top_texts, e.top_logprobs, strict=True)]}
                        for e in entries]}


def completion_logprobs(entries: list[TokenLogprob] | None, offset: int = 0) -> dict | None:
    """A completion choice's legacy `logprobs`: tokens, token_logprobs, top_logprobs (a map per token, the chosen
    token in it too, as OpenAI and vLLM list it) and text_offset (each token's start in the text, from `offset`)."""
    if entries is None:
        return None
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.text)
    return {"tokens": [e.text for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [_top_map(e) for e in entries], "text_offset": offsets}


def _top_map(e: TokenLogprob) -> dict[str, float]:
    """A legacy top_logprobs entry: the top tokens' texts to their log-probabilities, the chosen token's too."""
    return {**dict(zip(e.top_texts, e.top_logprobs, strict=True)), e.text: e.logprob}


@dataclass
class EchoedPrompt:
    """A completion's echoed prompt's log-probabilities as they come (PromptLogprobsChunk): the first token's text (it
    has no log-probability) and each later token's entry."""

    first_text: str = ""
    entries: list[TokenLogprob] = field(default_factory=list)

    def add(self, chunk: PromptLogprobsChunk) -> None:
        if chunk.first_text is not None:
            self.first_text = chunk.first_text
        self.entries += chunk.prompt_logprobs

    def legacy(self) -> dict:
        """The prompt's part of a legacy `logprobs`: its first token listed with null log-probabilities, as OpenAI
        and vLLM list it."""
        rest = completion_logprobs(self.entries, len(self.first_text))
        return {"tokens": [self.first_text, *rest["tokens"]], "token_logprobs": [None, *rest["token_logprobs"]],
                "top_logprobs": [None, *rest["top_logprobs"]], "text_offset": [0, *rest["text_offset"]]}

    @property
    def length(self) -> int:
        """The characters its tokens' texts take (where the completion's offsets start)."""
        return len(self.first_text) + sum(len(e.text) for e in self.entries)


def vllm_prompt_logprobs(prompt: EchoedPrompt) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: null for the first token, then per token a map from token ids (the prompt's token
    first, then the most likely ones) to {logprob, rank, decoded_token}."""
    body: list[dict | None] = [None]
    for e in prompt.entries:
        entry = {str(e.token): {"logprob": e.logprob, "rank": e.rank, "decoded_token": e.text}}
        for rank, (token, text, logprob) in enumerate(zip(e.top_ids, e.top_texts, e.top_logprobs, strict=True), 1):
            entry.setdefault(str(token), {"logprob": logprob, "rank": rank, "decoded_token": text})
        body.append(entry)
    return body


def echoed_logprobs(prompt: EchoedPrompt, generated: list[TokenLogprob] | None) -> dict:
    """A completion choice's legacy `logprobs` with its echoed prompt's first, then its own tokens'."""
    body = prompt.legacy()
    if generated:
        rest = completion_logprobs(generated, prompt.length)
        for key in body:
            body[key] += rest[key]
    return body


@dataclass(frozen=True)
class Outcome:
    """One completion of a request (of its n): text, native finish reason, logprobs entries (None: not asked)."""

    text: str
    reason: str
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[ToolCall] | None = None  # a chat reply's calls (its text is then the content before them)
    tool_reason: bool = False  # finish_reason "tool_calls" (calls the model chose to make, not a named function)
    prompt: EchoedPrompt | None = None  # a completion's echoed prompt's log-probabilities (echo with logprobs)
    prompt_logprobs: list[dict | None] | None = None  # vLLM's form of them (the request's prompt_logprobs)


def merged_usage(per_prompt: list[list[dict]]) -> dict:
    """The usage of a request's completions, grouped by prompt (one prompt's n completions each): each prompt
    counted once, the completions' tokens summed."""
    # (an aborted choice's usage is empty)
    prompt = sum(max(u.get("prompt_tokens", 0) for u in usages) for usages in per_prompt)
    completion = sum(u.get("completion_tokens", 0) for usages in per_prompt for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(request_id: str, model: str, outcomes: list[Outcome], usage: dict) -> dict:
    choices = [{"index": i, "text": o.text, "finish_reason": finish_reason(o.reason),
                "logprobs": completion_logprobs(o.logprobs) if o.prompt is None else echoed_logprobs(o.prompt,
                                                                                                      o.logprobs)}
               for i, o in enumerate(outcomes)]
    for choice, o in zip(choices, outcomes):
        if o.prompt_logprobs is not None:  # (vLLM's field, only where asked)
            choice["prompt_logprobs"] = o.prompt_logprobs
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage}


def chat_body(request_id: str, model: str, outcomes: list[Outcome], usage: dict) -> dict:
    choices = [{"index": i, "message": _message(o), "logprobs": chat_logprobs(o.logprobs),
                "finish_reason": _chat_reason(o.reason, o.tool_reason)} for i, o in enumerate(outcomes)]
    body = {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage}
    if outcomes and outcomes[0].prompt_logprobs is not None:  # vLLM's, once for the response (one prompt)
        body["prompt_logprobs"] = outcomes[0].prompt_logprobs
    return body


def _message(o: Outcome) -> dict:
    if not o.tool_calls:
        return {"role": "assistant", "content": o.text}
    return {"role": "assistant", "content": o.text or None, "tool_calls": [c.body() for c in o.tool_calls]}


def _chat_reason(native: str, tool_reason: bool) -> str:
    """OpenAI's finish reason of a chat reply: "tool_calls" where it ended by making the calls it chose."""
    return "tool_calls" if tool_reason and native == FinishReason.STOP else finish_reason(native)


class ChunkMaker:
    """Builds one streamed response's chunks (same id and `created` on every chunk, as OpenAI does)."""

    def __init__(self, request_id: str, model: str, chat: bool, include_usage: bool) -> None:
        self.head = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": int(time.time()), "model": model}
        self.chat = chat
        self.include_usage = include_usage
        self.offsets: dict[int, int] = {}  # completions: where each choice's next tokens start in its text

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        body = {**self.head, "choices": choices}
        if self.include_usage:
            body["usage"] = usage
        return body

    def _choice(self, text: str | None, reason: str | None, role: bool = False,
                logprobs: list[TokenLogprob] | None = None, index: int = 0) -> dict:
        if not self.chat:
            offset = self.offsets.get(index, 0)
            self.offsets[index] = offset + sum(len(e.text) for e in logprobs or ())
            return {"index": index, "text": text or "", "logprobs": completion_logprobs(logprobs, offset),
                    "finish_reason": reason}
        delta: dict[str, str] = {"role": "assistant", "content": ""} if role else {}
        if text:
            delta["content"] = text
        return {"index": index, "delta": delta, "logprobs": chat_logprobs(logprobs), "finish_reason": reason}

    def first(self, index: int = 0) -> dict | None:
        """Chat streams open with the assistant role (one chunk per choice); completions have no opening chunk."""
        return self._chunk([self._choice(None, None, role=True, index=index)]) if self.chat else None

    def echo(self, text: str, prompt: EchoedPrompt) -> dict:
        """A completion's echoed prompt with its tokens' log-probabilities (echo with logprobs, one choice)."""
        self.offsets[0] = prompt.length
        return self._chunk([{"index": 0, "text": text, "logprobs": prompt.legacy(), "finish_reason": None}])

    def text(self, text: str, logprobs: list[TokenLogprob] | None = None, index: int = 0) -> dict:
        """A content chunk; `logprobs`: those of its tokens (and of tokens before it whose text was held back)."""
        return self._chunk([self._choice(text, None, logprobs=logprobs, index=index)])

    def final(self, native_reason: str, logprobs: list[TokenLogprob] | None = None, index: int = 0,
              tool_reason: bool = False) -> dict:
        reason = _chat_reason(native_reason, tool_reason) if self.chat else finish_reason(native_reason)
        return self._chunk([self._choice(None, reason, logprobs=logprobs, index=index)])

    def tool_calls(self, deltas: list[dict], index: int = 0) -> dict:
        """A chat chunk of tool-call deltas (launch.tool_calls.ToolReply's)."""
        return self._chunk([{"index": index, "delta": {"tool_calls": deltas}, "logprobs": None,
                             "finish_reason": None}])

    def usage(self, usage: dict) -> dict:
        return self._chunk([], usage)
