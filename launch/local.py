"""A single-process engine: executor (model + runner) and JIT context (tokenizer + generator) in one process.

`hybridrt generate` uses it when no server is given; the two-process runtime splits exactly these parts, and
both build the request side with `jit_context.request_side.build_request_side`.
"""

from __future__ import annotations

from graph_executor.loading.loader import LoadConfig, LoadedModel, load_model
from graph_executor.runner import ModelRunner
from jit_context.request_side import PromptInput, RequestSide, build_request_side
from jit_context.speculative import SpeculativeConfig

__all__ = ["LocalEngine", "PromptInput"]


class LocalEngine:
    def __init__(self, load: LoadConfig, tokenizer_path: str | None = None, graphs: bool = True,
                 chat_template: str | None = None, speculation: SpeculativeConfig | None = None) -> None:
        self.loaded: LoadedModel = load_model(load)
        model = self.loaded.model
        if model.embed_tokens.device.type == "cuda" and graphs:
            from graph_executor.graphs import GraphRunner  # needs Triton: GPU path only

            self.runner = GraphRunner(model)
            self.runner.capture_all()
        else:
            self.runner = ModelRunner(model)
        self.side: RequestSide = build_request_side(
            self.runner, self.loaded.name, model.config.vocab_size, model.config.eos_token_ids,
            tokenizer_path or self.loaded.tokenizer_path, chat_template, speculation)
        self.tokenizer = self.side.tokenizer
        self.generator = self.side.generator

    def prompt_ids(self, inp: PromptInput) -> list[int]:
        return self.side.prompt_ids(inp)
