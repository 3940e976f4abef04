"""The cost of the two-process split on CPU: tokens/s of the same greedy generation in-process vs through
`serve` (graph executor + JIT context + native client), interleaved in one run; and serve start-to-ready.

    python -m bench.probes.cpu_split [--tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.stats import gaps_ms, tokens_per_s
from graph_executor.loading.loader import LoadConfig
from jit_context.sampling_params import SamplingParams
from launch.client import Client
from launch.local import LocalEngine, PromptInput
from launch.supervisor import ServerConfig, Supervisor

MESSAGES = [{"role": "user", "content": "Explain in a few sentences how a CPU cache works."}]


def decode_rate(token_times_ms: list[float]) -> float:
    return tokens_per_s(gaps_ms(token_times_ms))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    load = LoadConfig(device="cpu", dtype="float32", progress=False)
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    engine = LocalEngine(load)
    ids = engine.prompt_ids(PromptInput(messages=MESSAGES))
    start = time.perf_counter()
    supervisor = Supervisor(ServerConfig(load))
    supervisor.start()
    supervisor.wait_ready()
    ready_s = time.perf_counter() - start
    local, remote = [], []
    try:
        with Client(supervisor.address) as client:
            for _ in range(args.repeats + 1):  # the first round warms both up and is dropped
                *_, result = engine.generator.generate(ids, params)
                local.append(decode_rate(result.token_times_ms))
                *_, fin = client.generate(token_ids=ids, params=params)
                remote.append(decode_rate(fin.timings["token_times_ms"]))
    finally:
        supervisor.stop()
    lo, re = statistics.median(local[1:]), statistics.median(remote[1:])
    print(f"SmolLM2-135M-Instruct fp32, CPU ({torch.get_num_threads()} threads), prompt {len(ids)} tokens, "
          f"{args.tokens} tokens greedy, median of {args.repeats}")
    print("| path | decode tokens/s |")
    print("|---|---|")
    print(f"| in-process | {lo:.1f} |")
    print(f"| two processes (serve + client) | {re:.1f} |")
    print(f"split cost: {100 * (1 - re / lo):.1f}% of tokens/s; serve start to ready: {ready_s:.1f} s")


if __name__ == "__main__":
    main()
