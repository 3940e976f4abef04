"""Where the executor's TTFT goes past its prefill graph (issue 12): the bench's hybridrt-executor TTFT at 300
tokens was 8.5 ms while the 304-row graph had replayed in 7.0 ms when timed at its capture (thirty-seventh
session; the answer, from the second table: the card's recent load, not the rows' data). One
in-process engine (every graph captured), per prompt length the median of:

  ttft        the generator's first token (what the bench reports);
  host        ids written, `runner.prefill(n)`, synchronize, timed on the host;
  replay      `runner.prefill(n)` between CUDA events, back to back;
  after idle  the same, each after a host sleep of --idle-ms (the GPU idle before it, as between requests);
  scratch     the bucket's graph as timed at capture (inputs aimed at the scratch row), its rows reading slot 0's
              ids as they are (the prompt's, zeros past it), then all zeros (one token a row).

Then a second table, each figure measured alternately with the others (round-robin, --idle-ms before each, so
that the card's clocks and power history are alike for all): the bucket's graph on the real prompt (positions
0..n-1), and aimed at the scratch row (every position the last) with slot 0's ids random, then all zeros.

    python -m bench.probes.ttft_gap --model dummy:llama-2-7b [--lens 100,200,300,500] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.workloads import prompt_ids
from graph_executor.graphs import median_event_ms
from graph_executor.loading.loader import LoadConfig
from jit_context.sampling_params import SamplingParams
from launch.local import LocalEngine


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dummy:llama-2-7b", help="model (dummy:<preset> or a path)")
    parser.add_argument("--dtype", default="float16", help="activation / weight dtype")
    parser.add_argument("--lens", default="100,200,300,500", help="prompt lengths, comma-separated")
    parser.add_argument("--repeats", type=int, default=7, help="samples per figure (median)")
    parser.add_argument("--idle-ms", type=float, default=5.0, help="host sleep before each 'after idle' sample")
    args = parser.parse_args(argv)
    engine = LocalEngine(LoadConfig(model=args.model, device="cuda", dtype=args.dtype, max_context=768,
                                    progress=False))
    runner, generator = engine.runner, engine.generator
    vocab = engine.loaded.model.config.vocab_size
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    print(f"{torch.cuda.get_device_name()}: {args.model}, cuBLASLt graphs {runner.stats.cublaslt}")
    print("| tokens | bucket | ttft ms | host ms | replay ms | after idle ms | capture-time ms | scratch ms "
          "| scratch, zero ids ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in (int(x) for x in args.lens.split(",")):
        ids = prompt_ids(n, vocab, 0)
        list(generator.generate(ids, params))  # untimed: this length's first run
        ttft = [list(generator.generate(ids, params))[-1].token_times_ms[0] for _ in range(args.repeats)]
        host = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            generator.write_ids(ids, 0)
            runner.prefill(n)
            torch.cuda.synchronize()
            host.append((time.perf_counter() - start) * 1e3)
        replay = median_event_ms(lambda: runner.prefill(n), args.repeats)
        idle = []
        for _ in range(args.repeats):
            time.sleep(args.idle_ms / 1e3)
            idle.append(median_event_ms(lambda: runner.prefill(n), 1))
        bucket = runner._cheapest("prefill", n)
        captured = runner.bucket_ms["prefill"].get(bucket)
        graph = runner.graphs[f"prefill_{bucket}"]
        scratch = runner._replay_ms(graph)[0]
        ids = runner.buffers.slot_ids(0)[:bucket]
        kept = ids.clone()
        ids.zero_()
        zeros = runner._replay_ms(graph)[0]
        ids.copy_(kept)
        print(f"| {n} | {bucket} | {statistics.median(ttft):.3f} | {statistics.median(host):.3f} | {replay:.3f} | "
              f"{statistics.median(idle):.3f} | {captured if captured is None else round(captured, 3)} | "
              f"{scratch:.3f} | {zeros:.3f} |")

    print("\n| tokens | bucket | real prompt ms | scratch, random ids ms | scratch, zero ids ms |")
    print("|---|---|---|---|---|")
    for n in (int(x) for x in args.lens.split(",")):
        bucket = runner._cheapest("prefill", n)
        graph = runner.graphs[f"prefill_{bucket}"]
        prompt = torch.tensor(prompt_ids(n, vocab, 0))
        noise = torch.randint(0, vocab, (bucket,), generator=torch.Generator().manual_seed(1))
        ids = runner.buffers.slot_ids(0)[:bucket]

        def real() -> float:
            ids[:n].copy_(prompt)
            return median_event_ms(lambda: runner.prefill(n), 1)

        def scratch(zeros: bool) -> float:
            if zeros:
                ids.zero_()
            else:
                ids.copy_(noise)
            return _aimed(runner, graph)

        series: dict[str, list[float]] = {"real": [], "random": [], "zeros": []}
        for _ in range(3 * args.repeats):
            for key, fn in (("real", real), ("random", lambda: scratch(False)), ("zeros", lambda: scratch(True))):
                time.sleep(args.idle_ms / 1e3)
                series[key].append(fn())
        print(f"| {n} | {bucket} | " + " | ".join(f"{statistics.median(v):.3f}" for v in series.values()) + " |")


def _aimed(runner, graph) -> float:
    """One replay of graph with the inputs aimed at the scratch row (as the capture-time timing runs it)."""
    runner._aim_at_scratch_row()
    ms = median_event_ms(graph.replay, 1)
    torch.arange(runner.static.arange.shape[0], out=runner.static.arange)
    return ms


if __name__ == "__main__":
    main()
