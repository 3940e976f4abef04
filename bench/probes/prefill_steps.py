"""Whole prefill steps (`FusedPrefill.run` as CUDA graphs) of dummy models, timed in alternating rounds in one
process: what the prefill probes (fp8_prefill.py, dequantize_rows.py) share. GPU only."""

from __future__ import annotations

import torch

from bench.probes.step_variants import alternating_rounds
from bench.probes.verify_plan import graphed
from graph_executor.fused_prefill import FusedPrefill
from graph_executor.loading.loader import LoadConfig, load_model
from graph_executor.model import LlamaModel


def dummy_models(preset: str, formats: list[str | None], max_tokens: int) -> dict[str | None, LlamaModel]:
    """dummy:`preset` in float16 on the GPU, once per weight format (None: fp16; else `--quantize`'s name), each
    with room for a max_tokens prompt."""
    return {q: load_model(LoadConfig(model=f"dummy:{preset}", device="cuda", dtype="float16",
                                     max_context=max_tokens + 16, progress=False, quantize=q)).model
            for q in formats}


def prefill_rounds(models: dict[str | None, LlamaModel], tokens: int, variants: list[tuple[str | None, dict]],
                   rounds: int) -> tuple[list[float], list[torch.Tensor]]:
    """One prefill step of `tokens` random ids per variant (a key of `models`, and FusedPrefill's keyword
    arguments), each captured as a graph and timed once a round for `rounds` rounds: per variant the median ms
    and its last-position logits [vocab] (float32)."""
    device = torch.device("cuda")
    ids = torch.randint(0, next(iter(models.values())).config.vocab_size, (tokens,), device=device)
    positions = torch.arange(tokens, device=device)
    index = torch.tensor([tokens - 1], device=device)
    graphs, outs, steps = [], [], []  # the steps own the buffers their graphs read and write: keep them
    for quantize, options in variants:
        step = FusedPrefill(models[quantize], tokens, **options)
        out = torch.empty(models[quantize].config.vocab_size, dtype=torch.float32, device=device)
        graphs.append(graphed(lambda s=step, o=out: s.run(ids, positions, index, o)))
        outs.append(out)
        steps.append(step)
    return alternating_rounds(graphs, outs, rounds, device)
