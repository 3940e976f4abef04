"""Per-request sampling parameters: one immutable, validated dataclass and its wire (dict) form."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ipc.messages import MAX_LOGPROBS
from jit_context.quoting import QUOTE_CHARS, quote  # noqa: F401 (QUOTE_CHARS: re-exported)
from jit_context.structured_output import StructuredOutput

MAX_STOP_STRINGS = 16
# Sampling runs in float32 on the device: every parameter must stay finite there and keep the logits finite
# when they are divided or multiplied by it (logits are O(1e2); float32 holds up to 3.4e38).
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-5, 1e5  # besides 0, greedy
MIN_PENALTY, MAX_PENALTY = 1e-5, 1e5
MAX_ADDITIVE_PENALTY = 2.0  # presence and frequency penalties: OpenAI's range, [-2, 2]
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for one token's bias, [-100, 100]
MAX_BIASED_TOKENS = 1024
MAX_SEED = 2**63 - 1


def _check_int(name: str, value: Any, minimum: int, allowed: str) -> None:
    # bool is a subclass of int; `max_tokens=True` is a client bug, not a request for one token.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int {allowed}, got {quote(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be {allowed}, got {value}")


def _check_float(name: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {quote(value)}")
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return float(value)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request and when to stop; immutable once built."""

    max_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # divides the logits of tokens in the prompt or the reply so far (1 = off)
    # OpenAI's and vLLM's additive penalties over the reply's tokens so far (0 = off): presence subtracts once for
    # each token that occurred, frequency once per occurrence
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), sorted by token id
    seed: int | None = None  # None: a fresh random seed per request
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS and stop_token_ids can't be drawn, nor stop strings end the reply, before this many
    # each generated token's log-probability and those of this many most likely tokens (ipc.messages.TokenLogprob);
    # None: none (0: the token's own only)
    logprobs: int | None = None
    # each prompt token's log-probability given the tokens before it (the first has none) and those of this many most
    # likely tokens there (vLLM's prompt_logprobs; the completions API's echo with logprobs). None: not computed (the
    # prefill then runs as a plain one, and may reuse the KV cache's prefix)
    prompt_logprobs: int | None = None
    # the reply held to a JSON schema, a regex, a grammar, ... (a token mask each draw: jit_context.grammar_mask)
    structured: StructuredOutput | None = None
    # the reply's text leaves special tokens out (vLLM's default); an end-of-sequence or stop token is never in it
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, 1, ">= 1")
        _check_int("min_tokens", self.min_tokens, 0, ">= 0")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        self._check_floats()
        _check_int("top_k", self.top_k, 0, ">= 0 (0 = off)")
        if self.seed is not None:
            _check_int("seed", self.seed, 0, f"in [0, {MAX_SEED}] or None")
            if self.seed > MAX_SEED:
                raise ValueError(f"seed must be in [0, {MAX_SEED}] or None, got {quote(self.seed)}")
        self._check_stops()
        self._check_logit_bias()
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {quote(getattr(self, name))}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, 0, f"in [0, {MAX_LOGPROBS}] or None")
                if value > MAX_LOGPROBS:
                    raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}] or None, got {value}")
        if self.structured is not None:
            if not isinstance(self.structured, StructuredOutput):
                raise ValueError(f"structured must be a StructuredOutput or None, got {quote(self.structured)}")
            if self.min_tokens:
                # the grammar may allow only the end of the reply where min_tokens forbids it: nothing to draw
                raise ValueError("min_tokens can't be combined with structured output")
            if self.ignore_eos:
                # a whole match allows the end-of-sequence tokens only: the reply would draw them until max_tokens
                raise ValueError("ignore_eos can't be combined with structured output")

    def _check_floats(self) -> None:
        temperature = _check_float("temperature", self.temperature)
        if temperature != 0.0 and not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], "
                             f"got {temperature:g}")
        top_p = _check_float("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        min_p = _check_float("min_p", self.min_p)
        if not 0.0 <= min_p < 1.0:
            raise ValueError(f"min_p must be in [0, 1), got {min_p}")
        penalty = _check_float("repetition_penalty", self.repetition_penalty)
        if not MIN_PENALTY <= penalty <= MAX_PENALTY:
            raise ValueError(f"repetition_penalty must be in [{MIN_PENALTY:g}, {MAX_PENALTY:g}] (1 = off), "
                             f"got {penalty:g}")
        additive = {}
        for name in ("presence_penalty", "frequency_penalty"):
            additive[name] = _check_float(name, getattr(self, name))
            if not -MAX_ADDITIVE_PENALTY <= additive[name] <= MAX_ADDITIVE_PENALTY:
                raise ValueError(f"{name} must be in [-{MAX_ADDITIVE_PENALTY:g}, {MAX_ADDITIVE_PENALTY:g}] (0 = off), "
                                 f"got {additive[name]:g}")
        # JSON clients send `0` for 0.0; store floats so equality and to_dict() don't depend on it.
        for name, value in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p),
                            ("repetition_penalty", penalty), *additive.items()):
            object.__setattr__(self, name, value)

    def _check_stops(self) -> None:
        if not isinstance(self.stop, tuple):
            raise ValueError(f"stop must be a tuple of strings, got {type(self.stop).__name__}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop must hold at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must hold non-empty strings, got {quote(s)}")
        if not isinstance(self.stop_token_ids, tuple):
            raise ValueError(f"stop_token_ids must be a tuple of ints, got {type(self.stop_token_ids).__name__}")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, 0, "entries >= 0")

    def _check_logit_bias(self) -> None:
        if not isinstance(self.logit_bias, tuple):
            raise ValueError(f"logit_bias must be a tuple of (token id, bias) pairs, "
                             f"got {type(self.logit_bias).__name__}")
        if len(self.logit_bias) > MAX_BIASED_TOKENS:
            raise ValueError(f"logit_bias may hold at most {MAX_BIASED_TOKENS} tokens, got {len(self.logit_bias)}")
        pairs = []
        for pair in self.logit_bias:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"logit_bias must hold (token id, bias) pairs, got {quote(pair)}")
            _check_int("logit_bias token ids", pair[0], 0, ">= 0")
            bias = _check_float("logit_bias", pair[1])
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                                 f"got {bias:g} for token {pair[0]}")
            pairs.append((pair[0], bias))
        pairs.sort()
        if any(a[0] == b[0] for a, b in zip(pairs, pairs[1:])):
            raise ValueError("logit_bias names a token twice")
        object.__setattr__(self, "logit_bias", tuple(pairs))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def check_vocabulary(self, vocab_size: int) -> None:
        """ValueError unless every token that logit_bias names is in a vocabulary of vocab_size tokens."""
        bad = [t for t, _ in self.logit_bias if t >= vocab_size]
        if bad:
            raise ValueError(f"logit_bias token ids must be in [0, {vocab_size}) (the vocabulary): {bad[:4]}")

    @property
    def counts_tokens(self) -> bool:
        """Whether the presence or frequency penalty is on (the sampler then counts the reply's tokens)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @classmethod
    def from_dict(cls, d: dict) -> SamplingParams:
        """Build from a wire dict: unknown keys are an error, lists stand for tuples, `stop` may be one string,
        `logit_bias` a list of [token id, bias] pairs or a map from token ids (ints or decimal strings, as OpenAI's
        JSON has them) to biases, `structured` StructuredOutput's wire dict."""
        if not isinstance(d, dict):
            raise ValueError(f"sampling params must be a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise ValueError(f"unknown sampling params: {quote(', '.join(unknown))}")
        kwargs = dict(d)
        if isinstance(kwargs.get("stop"), str):
            kwargs["stop"] = (kwargs["stop"],)
        for name in ("stop", "stop_token_ids"):
            if isinstance(kwargs.get(name), list):
                kwargs[name] = tuple(kwargs[name])
        if "logit_bias" in kwargs:
            kwargs["logit_bias"] = _bias_pairs(kwargs["logit_bias"])
        if kwargs.get("structured") is not None:
            kwargs["structured"] = StructuredOutput.from_dict(kwargs["structured"])
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """Wire form for msgpack: plain types only, lists for the tuple fields."""
        d = dataclasses.asdict(self)
        d["stop"] = list(self.stop)
        d["stop_token_ids"] = list(self.stop_token_ids)
        d["logit_bias"] = [list(pair) for pair in self.logit_bias]
        d["structured"] = None if self.structured is None else self.structured.to_dict()
        return d


def _bias_pairs(value: Any) -> Any:
    """A wire logit_bias -> (token id, bias) pairs; what is not one of its forms goes on to the checks as it is."""
    if isinstance(value, dict):
        pairs = []
        for key, bias in value.items():
            token = key
            if isinstance(key, str):
                if not key.isdigit() or not key.isascii():
                    raise ValueError(f"logit_bias keys must be token ids, got {quote(key)}")
                token = int(key)
            pairs.append((token, bias))
        return tuple(pairs)
    if isinstance(value, list):
        return tuple(tuple(pair) if isinstance(pair, list) else pair for pair in value)
    return value
