"""The one way to build the request side over an executor: tokenizer (with an optional replacement chat
template), the EOS set, the `Generator`, and the one rule from a prompt (text, chat messages or token ids) to
prompt ids. The JIT context process builds it over its `RemoteExecutor`, `hybridrt generate` without a server
over an in-process runner.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ipc.errors import HybridrtError
from ipc.messages import ChatOptions
from jit_context.generator import CPU_PREFILL_CHUNK, ExecutorPort, Generator
from jit_context.grammar_mask import Grammars
from jit_context.sampling_params import SamplingParams
from jit_context.speculative_config import SpeculativeConfig
from jit_context.tokenizer import Tokenizer


@dataclass(frozen=True)
class PromptInput:
    """Exactly one of: text, chat messages, or token ids. `use_chat_template`: wrap text as one user turn in
    the tokenizer's chat template (where it has one); a native `GenerateRequest.prompt` is raw text."""

    prompt: str | None = None
    messages: list[dict] | None = None
    token_ids: list[int] | None = None
    use_chat_template: bool = True
    chat: ChatOptions | None = None  # how messages become the prompt (None: the defaults)

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.prompt, self.messages, self.token_ids)]
        if sum(given) != 1:
            raise ValueError("give exactly one of prompt, messages or token_ids")
        if self.chat is not None and self.messages is None:
            raise ValueError("chat template options apply to messages only")


@dataclass(frozen=True)
class RequestSide:
    model_name: str
    vocab_size: int
    tokenizer: Tokenizer | None
    eos_token_ids: frozenset[int]  # the model's and the tokenizer's end-of-turn tokens
    generator: Generator
    grammars: Grammars | None = None  # structured output's view of the tokenizer (None without one)

    def prompt_ids(self, inp: PromptInput) -> list[int]:
        """ValueError for what the user got wrong (empty prompt, ids out of the vocabulary, no tokenizer)."""
        if inp.token_ids is not None:
            self.check_token_ids(inp.token_ids)
            return list(inp.token_ids)
        if self.tokenizer is None:
            raise ValueError(f"model {self.model_name} has no tokenizer; pass --tokenizer PATH or token ids")
        if inp.messages is not None:
            chat = inp.chat or ChatOptions()
            return self.tokenizer.apply_chat_template(inp.messages, chat.add_generation_prompt,
                                                      chat.continue_final_message, chat.template_kwargs, chat.tools)
        if inp.prompt == "":
            raise ValueError("the prompt is empty")
        if inp.use_chat_template and self.tokenizer.has_chat_template:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": inp.prompt}])
        return self.tokenizer.encode(inp.prompt)

    def check_structured(self, params: SamplingParams) -> None:
        """ValueError naming what is wrong with params.structured (a bad schema, regex or grammar, a special token
        the vocabulary lacks; no tokenizer). The first one builds llguidance's view of the vocabulary (~0.2 s) unless
        a GPU server's start has (`Grammars.prepare_in_background`)."""
        if params.structured is None:
            return
        if self.grammars is None:
            raise ValueError(f"structured output needs a tokenizer; model {self.model_name} has none "
                             f"(pass --tokenizer PATH)")
        self.grammars.check(params.structured)

    def check_token_ids(self, token_ids: Iterable[int]) -> None:
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}) (the vocabulary): {bad[:4]}")


def build_request_side(port: ExecutorPort, model_name: str, vocab_size: int, model_eos_ids: Iterable[int],
                       tokenizer_path: str | Path | None, chat_template: str | None = None,
                       speculation: SpeculativeConfig | None = None,
                       preloaded: Tokenizer | None = None, prefix_reuse: bool = False) -> RequestSide:
    """HybridrtError (one line for the user) when a chat template is given without a tokenizer or is invalid.
    `preloaded`: the tokenizer of `tokenizer_path`, already loaded (the JIT context loads it early).
    `prefix_reuse`: unless a draft model speculates (its own KV cache is not tracked), a prompt that starts with what
    the KV cache holds prefills only the rest (`Generator`; on a GPU an extend step, `GraphRunner.prefill`)."""
    if preloaded is not None:
        tokenizer = preloaded
    else:
        tokenizer = Tokenizer.from_path(Path(tokenizer_path)) if tokenizer_path else None
    if chat_template is not None:
        if tokenizer is None:
            raise HybridrtError(f"model {model_name} has no tokenizer to use a chat template with")
        try:
            tokenizer.use_chat_template(chat_template)
        except ValueError as e:
            raise HybridrtError(str(e)) from None
    if tokenizer is not None:
        tokenizer.warm_up()
    eos = frozenset(model_eos_ids) | (tokenizer.eos_token_ids if tokenizer else frozenset())
    on_cpu = port.buffers.logits.device.type == "cpu"
    drafting = speculation is not None and speculation.method == "draft"
    grammars = None if tokenizer is None else Grammars(tokenizer.backend_json, vocab_size, eos)
    generator = Generator(port, tokenizer, eos, prefill_chunk=CPU_PREFILL_CHUNK if on_cpu else None,
                          speculation=speculation, prefix_reuse=prefix_reuse and not drafting, grammars=grammars)
    return RequestSide(model_name, vocab_size, tokenizer, eos, generator, grammars)
