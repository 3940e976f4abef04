"""Probe: where the persistent decode step's time goes (graph_executor/persistent_decoder.py). Every program stamps its
SM's clock at each phase's start and end (`PersistentDecoder.stamps`); per phase kind, the mean over programs and
layers of the phase's own time (start to end) and of the wait after it (end to the next phase's start: the barrier,
plus the next phase's first weights where they are loaded there), in cycles and as shares of the layer.

    python -m bench.probes.persistent_phases [--model smollm2-135m] [--contexts 300,2000]
"""

from __future__ import annotations

import argparse

import torch

from bench.floors import time_gpu
from bench.probes.verify_plan import graphed
from graph_executor.kernels.persistent_step import STAMP_SLOTS
from graph_executor.loading.loader import LoadConfig, load_model
from graph_executor.persistent_decoder import PersistentDecoder

PHASES = ("qkv", "attention", "o", "gate_up", "down")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="a dummy preset")
    ap.add_argument("--contexts", default="300,2000")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    model = load_model(LoadConfig(model=f"dummy:{args.model}", device="cuda", dtype="float16", max_context=4096,
                                  progress=False)).model
    decoder = PersistentDecoder(model)
    layers = len(model.layers)
    decoder.stamps = torch.zeros(decoder.programs, int(STAMP_SLOTS), dtype=torch.int64, device=device)
    token = torch.full((1,), 7, dtype=torch.int64, device=device)
    logits = torch.empty(model.config.vocab_size, dtype=torch.float32, device=device)
    print(f"persistent decode step, dummy:{args.model} on {torch.cuda.get_device_name()}, {decoder.programs} programs")
    for context in (int(c) for c in args.contexts.split(",")):
        position = torch.full((1,), context, dtype=torch.int64, device=device)
        graph = graphed(lambda: decoder.step(token, position, logits))
        ms = time_gpu(graph.replay, device) * 1e3
        graph.replay()
        torch.cuda.synchronize()
        st = decoder.stamps[:, :10 * layers].view(decoder.programs, layers, 5, 2).double()  # [P, L, phase, start/end]
        own = (st[..., 1] - st[..., 0])  # [P, L, 5]
        nxt = torch.empty_like(own)  # each phase's next phase's start
        nxt[:, :, :4] = st[:, :, 1:, 0]
        nxt[:, :-1, 4] = st[:, 1:, 0, 0]
        nxt[:, -1, 4] = st[:, -1, 4, 1]  # the last layer's down: its wait is not stamped (0)
        wait = nxt - st[..., 1]
        layer_cycles = float((st[:, -1, 0, 0] - st[:, 0, 0, 0]).mean()) / max(layers - 1, 1)
        print(f"\ncontext {context}: step {ms:.3f} ms (graph replay, with the lm_head), a layer {layer_cycles:.0f} "
              "cycles (program mean)")
        print("| phase | own (cycles, mean) | own max over programs | wait after (cycles, mean) | share of a layer |")
        print("|---|---|---|---|---|")
        for i, name in enumerate(PHASES):
            o, w = own[:, :, i], wait[:, :-1, i] if i == 4 else wait[:, :, i]
            print(f"| {name} | {float(o.mean()):.0f} | {float(o.max(0).values.mean()):.0f} | {float(w.mean()):.0f} | "
                  f"{float(o.mean() + w.mean()) / layer_cycles:.2f} |")


if __name__ == "__main__":
    main()
