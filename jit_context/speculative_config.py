"""How a JIT context speculates (`SpeculativeConfig`) and the verify step's cost model, without torch: the launcher
builds and checks it from the command line before it imports anything heavy (the loop is jit_context/speculative.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ipc.messages import MAX_SPECULATIVE_TOKENS
from jit_context.proposers import DEFAULT_NGRAM_MAX, DEFAULT_NGRAM_MIN

METHODS = ("off", "ngram", "draft")
# The command line's default (serve, generate, chat): n-gram speculation won on the committed bench (H200,
# SmolLM2-135M: 1.9-2.2x tokens/s on input-grounded chats, 1.1-1.2x on open-ended ones, same tokens; bench/NOTES.md,
# issue 11). A SpeculativeConfig built without a method is plain decoding.
DEFAULT_METHOD = "ngram"


@dataclass(frozen=True)
class VerifyCost:
    """A verify step of k proposals costs 1 + overhead + slope * k decode steps (the host's read of the accepted
    tokens and the extra launches are most of the overhead)."""

    overhead: float
    slope: float


# Measured per device kind (bench/NOTES.md, issue 11): on an H200 a verify of k+1 tokens costs 1.06-1.08x a decode
# step on LLaMA-2-7B and 1.26x on SmolLM2-135M (k = 1..8), plus the host's read (the constant suits the small model,
# where speculation is most often on: pessimistic for large ones); on the 2-core CPU machine, SmolLM2 in float32 on
# one thread, 1.67x at k = 1 and 2.0-2.2x at k = 2..8.
VERIFY_COSTS = {"cuda": VerifyCost(0.25, 0.015), "cpu": VerifyCost(0.65, 0.1)}


@dataclass(frozen=True)
class SpeculativeConfig:
    """How a JIT context speculates; `method` "off" is plain decoding."""

    method: str = "off"
    num_tokens: int = 8  # the most proposals per verify step (adaptive k stays at or below it)
    ngram_min: int = DEFAULT_NGRAM_MIN
    ngram_max: int = DEFAULT_NGRAM_MAX
    cost: VerifyCost = VERIFY_COSTS["cuda"]  # `for_device` sets the measured one
    draft_cost: float = 0.0  # a draft decode step relative to a target step (set from the executor's Ready)
    adaptive: bool = True  # False: always num_tokens proposals (as vLLM), never a pause

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 1 <= self.num_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be in 1..{MAX_SPECULATIVE_TOKENS}, got {self.num_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"n-gram sizes need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")
        if self.cost.overhead < 0 or self.cost.slope < 0 or self.draft_cost < 0:
            raise ValueError("the verify cost model's overhead, slope and draft cost must be >= 0")

    def for_device(self, kind: str) -> SpeculativeConfig:
        """With the verify cost measured on this kind of device ("cuda" or "cpu")."""
        return dataclasses.replace(self, cost=VERIFY_COSTS.get(kind, VERIFY_COSTS["cuda"]))

    @property
    def enabled(self) -> bool:
        return self.method != "off"

    def argv(self) -> list[str]:
        """As the JIT context process's flags (the inverse of `launch.options.speculative_config`)."""
        return ["--speculative", self.method, "--num-speculative-tokens", str(self.num_tokens),
                "--ngram-min", str(self.ngram_min), "--ngram-max", str(self.ngram_max),
                *([] if self.adaptive else ["--no-adaptive-k"])]


DRAFT_COST_FLOOR = 0.05  # a draft step costs at least this much of a target step (launch-bound when tiny)


def with_draft_cost(config: SpeculativeConfig | None, target_params: int, draft_params: int) -> SpeculativeConfig:
    """The config with the draft's step cost in its model (draft_params / target_params, at least the floor);
    ValueError when it asks for a draft the executor does not have, or has a draft it does not use."""
    config = config or SpeculativeConfig()
    if config.method != "draft":
        if draft_params:
            raise ValueError("a draft model is loaded but --speculative is not draft")
        return config
    if not draft_params:
        raise ValueError("--speculative draft needs a draft model (--draft-model)")
    return dataclasses.replace(config, draft_cost=max(DRAFT_COST_FLOOR, draft_params / max(target_params, 1)))
