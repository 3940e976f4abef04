"""A single-process engine: executor (model + runner) and JIT context (tokenizer + generator) in one process.

`hybridrt generate` uses it when no server is given; the two-process runtime splits exactly these parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from graph_executor.loader import LoadConfig, LoadedModel, load_model
from graph_executor.runner import ModelRunner
from ipc.errors import HybridrtError
from jit_context.generator import Generator
from jit_context.tokenizer import Tokenizer


@dataclass(frozen=True)
class PromptInput:
    """Exactly one of: plain text, chat messages, or token ids."""

    prompt: str | None = None
    messages: list[dict] | None = None
    token_ids: list[int] | None = None
    use_chat_template: bool = True

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.prompt, self.messages, self.token_ids)]
        if sum(given) != 1:
            raise ValueError("give exactly one of prompt, messages or token_ids")


class LocalEngine:
    def __init__(self, load: LoadConfig, tokenizer_path: str | None = None, graphs: bool = True,
                 chat_template: str | None = None) -> None:
        self.loaded: LoadedModel = load_model(load)
        on_gpu = self.loaded.model.embed_tokens.device.type == "cuda"
        if on_gpu and graphs:
            from graph_executor.graphs import GraphRunner  # needs Triton: GPU path only

            self.runner = GraphRunner(self.loaded.model)
            self.runner.capture_all()
        else:
            self.runner = ModelRunner(self.loaded.model)
        path = tokenizer_path or self.loaded.tokenizer_path
        self.tokenizer = Tokenizer.from_path(Path(path)) if path else None
        if chat_template is not None:
            if self.tokenizer is None:
                raise HybridrtError(f"model {self.loaded.name} has no tokenizer to use a chat template with")
            self.tokenizer.use_chat_template(chat_template)
        eos = set(self.loaded.model.config.eos_token_ids)
        if self.tokenizer:
            eos |= self.tokenizer.eos_token_ids
        self.generator = Generator(self.runner, self.tokenizer, frozenset(eos))

    def prompt_ids(self, inp: PromptInput) -> list[int]:
        if inp.token_ids is not None:
            return list(inp.token_ids)
        if self.tokenizer is None:
            raise HybridrtError(f"model {self.loaded.name} has no tokenizer; pass --tokenizer PATH or token ids")
        if inp.messages is not None:
            return self.tokenizer.apply_chat_template(inp.messages)
        if inp.prompt == "":
            raise ValueError("the prompt is empty")
        if inp.use_chat_template and self.tokenizer.has_chat_template:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": inp.prompt}])
        return self.tokenizer.encode(inp.prompt)
