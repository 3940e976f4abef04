"""Probe: one speculative verify cycle as the host sees it (launch, run, result on the host), in one process, with
the greedy acceptance in the JIT context (`jit_context.acceptance.accept` after the step: the old path) against
the acceptance in the executor (`Verify.accept`: the ids sent with the step, the acceptance inside the verify
graph), plus the parts alone. Median microseconds per cycle over interleaved rounds.

    python -m bench.probes.accept_probe [--model dummy:smollm2-135m] [--tokens 9] [--cycles 300]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from graph_executor.graphs import GraphRunner
from graph_executor.loading.loader import LoadConfig, load_model
from jit_context.acceptance import accept
from jit_context.sampler import Sampler
from jit_context.sampling_params import SamplingParams


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dummy:smollm2-135m")
    ap.add_argument("--tokens", type=int, default=9, help="verify token count (k + 1)")
    ap.add_argument("--position", type=int, default=200)
    ap.add_argument("--cycles", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    loaded = load_model(LoadConfig(model=args.model, device="cuda", dtype="float16", max_context=1024,
                                   progress=False))
    runner = GraphRunner(loaded.model)
    runner.capture_all()
    b, n, pos = runner.buffers, args.tokens, args.position
    vocab = loaded.model.config.vocab_size
    ids = torch.randint(0, vocab, (n,)).tolist()
    sampler = Sampler(vocab, torch.device("cuda"))
    sampler.start_request(SamplingParams(temperature=0.0), ids)
    staging = torch.zeros(n, dtype=torch.int64, pin_memory=True)
    host = torch.zeros(n + 1, dtype=torch.int64, pin_memory=True)
    done = torch.cuda.Event()

    def old() -> list[int]:
        staging.copy_(torch.tensor(ids, dtype=torch.int64))
        b.input_ids[pos:pos + n].copy_(staging, non_blocking=True)
        runner.verify(pos, n)
        result = accept(sampler, b.verify_logits[:n], b.input_ids[pos + 1:pos + n])
        torch.index_select(result, 0, result[n:], out=b.next_token)
        host.copy_(result, non_blocking=True)
        done.record()
        done.synchronize()
        return host.tolist()

    def new() -> list[int]:
        runner.verify(pos, n, tokens=ids, accept=True)
        return runner.wait_accepted()

    def verify_only() -> None:
        runner.verify(pos, n)
        done.record()
        done.synchronize()

    def accept_eager() -> None:
        result = accept(sampler, b.verify_logits[:n], b.input_ids[pos + 1:pos + n])
        torch.index_select(result, 0, result[n:], out=b.next_token)
        host.copy_(result, non_blocking=True)
        done.record()
        done.synchronize()

    cases = {"old (accept in the JIT)": old, "new (Verify.accept)": new, "verify graph + sync": verify_only,
             "JIT accept + sync": accept_eager}
    assert old() == new(), "the two paths disagree"
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            for _ in range(20):
                fn()
            start = time.perf_counter()
            for _ in range(args.cycles):
                fn()
            times[name].append((time.perf_counter() - start) / args.cycles * 1e6)
    print(f"{loaded.name} on {torch.cuda.get_device_name()}, verify of {n} tokens at position {pos}")
    print("| cycle | us (median of rounds) | min |")
    print("|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.1f} | {min(ts):.1f} |")


if __name__ == "__main__":
    main()
