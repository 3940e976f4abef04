"""A reply held to its structured output (`jit_context.structured_output`), token by token: llguidance's matcher
over the model's vocabulary, and the mask of the tokens it allows next.

`Grammars` is built once per tokenizer (llguidance's view of the vocabulary: ~0.3 s for a 49k-token vocabulary on
the CPU machine, so at the first request that asks for structured output, then kept); each such request gets a
`Constraint`: its matcher and the mask of its next draw, one bit per token in int32 words [ceil(V / 32)], bit t % 32
of word t // 32 set when token t may come next (llguidance's layout). The host fills it after reading each token
(tens of us; a few ms the first time a grammar meets a new lexer state), while the device runs the next step; the
sampler copies it up and applies it (`Sampler.accept`). The tokens past the tokenizer's vocabulary (a model's padded
rows) are never allowed; the end-of-sequence tokens only where the grammar may end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from jit_context.sampling_params import SamplingParams
from jit_context.structured_output import StructuredOutput


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
            raise ValueError(f"structured output: {self._matcher.get_error()}")

    def advance(self, token_id: int) -> None:
        """Token token_id was drawn: move the matcher past it and compute the next mask. ValueError if the grammar
        refuses it (only a draw that ignored the mask would: a bug)."""
        if not self._matcher.consume_token(token_id):
            raise ValueError(f"structured output: the grammar refused token {token_id}: {self._matcher.get_error()}")
        self._fill()  # (a whole match leaves the end-of-sequence tokens only)

    @property
    def accepting(self) -> bool:
        """Whether the reply so far is a whole match (the grammar may end here)."""
        return self._matcher.is_accepting()


class Grammars:
    """llguidance's view of one tokenizer's vocabulary, and the requests' matchers over it."""

    def __init__(self, tokenizer_json: Callable[[], str], vocab_size: int, eos_token_ids: Iterable[int]) -> None:
        """`tokenizer_json`: gives the tokenizers library's JSON of the tokenizer (`Tokenizer.backend_json`), called
        at the first use; vocab_size: the model's logits (may exceed the tokenizer's); eos_token_ids: the tokens
        that end a reply."""
        self._json = tokenizer_json
        self.vocab_size = vocab_size
        self._eos = sorted(set(eos_token_ids))
        self._tokenizer = None  # llguidance.LLTokenizer, built at first use

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from llguidance import LLTokenizer

            self._tokenizer = LLTokenizer(self._json(), n_vocab=self.vocab_size, eos_token=self._eos or None)
        return self._tokenizer

    def constraint(self, spec: StructuredOutput, pin: bool) -> Constraint:
        """A new request's matcher for spec and its first mask. ValueError for a bad spec."""
        from llguidance import LLMatcher

        return Constraint(LLMatcher(self.tokenizer, spec.checked_grammar(), log_level=0), self.vocab_size, pin)


def make_constraint(grammars: Grammars | None, params: SamplingParams, device: torch.device) -> Constraint | None:
    """The Constraint of a request's params.structured on `device`'s sampler (None without one). ValueError for a
    bad spec, or without `grammars` (no tokenizer)."""
    if params.structured is None:
        return None
    if grammars is None:
        raise ValueError("structured output needs the model's tokenizer (a dummy model takes --tokenizer PATH)")
    return grammars.constraint(params.structured, pin=torch.device(device).type == "cuda")
