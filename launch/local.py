"""A single-process engine: executor (model + runner) and JIT context (tokenizer + generator) in one process.

`hybridrt generate` uses it when no server is given; the two-process runtime splits exactly these parts, and
both build the request side with `jit_context.request_side.build_request_side`.
"""

from __future__ import annotations

from graph_executor.draft import DraftingRunner, DraftProposer, check_draft
from graph_executor.loading import cache
from graph_executor.loading.loader import LoadConfig, LoadedModel, draft_config, load_model
from graph_executor.runner import ModelRunner
from jit_context.request_side import PromptInput, RequestSide, build_request_side
from jit_context.speculative_config import SpeculativeConfig, with_draft_cost

__all__ = ["LocalEngine", "PromptInput"]


class LocalEngine:
    def __init__(self, load: LoadConfig, tokenizer_path: str | None = None, graphs: bool = True,
                 chat_template: str | None = None, speculation: SpeculativeConfig | None = None,
                 draft_model: str | None = None, prefix_reuse: bool = False) -> None:
        cache.use_for_triton()  # before any kernel compiles: once per machine
        self.loaded: LoadedModel = load_model(load)
        model = self.loaded.model
        self.draft: LoadedModel | None = None
        if draft_model is not None:
            self.draft = load_model(draft_config(draft_model, self.loaded, load.device, load.seed, load.progress))
            check_draft(self.draft, self.loaded)
        if model.embed_tokens.device.type == "cuda" and graphs:
            from graph_executor.graphs import GraphRunner  # needs Triton: GPU path only

            self.runner = GraphRunner(model)
            self.runner.capture_all()
        else:
            self.runner = ModelRunner(model)
        proposer = None
        if self.draft is not None:
            proposer = DraftProposer(self.draft.model, self.runner.buffers.input_ids, graphs)
            if proposer.graphs is not None:
                proposer.graphs.capture_all()
        speculation = with_draft_cost(speculation, model.config.num_params(),
                                      self.draft.model.config.num_params() if self.draft else 0)
        self.port = DraftingRunner(self.runner, proposer)  # what the generator drives
        self.side: RequestSide = build_request_side(
            self.port, self.loaded.name, model.config.vocab_size, model.config.eos_token_ids,
            tokenizer_path or self.loaded.tokenizer_path, chat_template, speculation, prefix_reuse=prefix_reuse)
        self.tokenizer = self.side.tokenizer
        self.generator = self.side.generator

    def prompt_ids(self, inp: PromptInput) -> list[int]:
        return self.side.prompt_ids(inp)
