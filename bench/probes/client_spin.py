"""What the native client's spinning wait (`ipc.reply_spin`) saves (issue 12: client TTFT <= the executor's + 0.3 ms).

One server; requests alternate between four clients: over ZeroMQ and over the local stream (`ipc.local_stream`), each
one that sleeps in its poll (`spin_ms=0`) and one that spins as long as the server says (the default:
`Started.spin_ms`, 0 from a server on the CPU; `--force-spin-ms` sets it instead), so all see the same machine
state. Per request: the client's TTFT (generate() called -> first
token in hand) and the JIT context's own (request received -> first token on its host, `Finished.timings`); their
difference is the two hops to and from the client plus the client's own work, split by the JIT context's arrival
stamp (`Finished.timings["received_at_s"]`, CLOCK_MONOTONIC like this process's perf_counter) into the request's way
in (the client's work, the hop, the JIT context's wake-up, decode and checks; split again where the JIT context's
wait for clients returned with it, `polled_at_s`) and the first token's way out (from
the JIT context's stamp after its send returned: over the local stream a spinning client may hold the token first,
so this part can read a few us below zero). Also the client's token gaps against
the JIT context's, P50 and P99: the hop each token pays once more, and the jitter of waking up (issue 12's client
P99 <= 1.03x P50). A second table splits a token's way: the JIT context's own work on it (known on its host -> its
TokenChunk sent, `Finished.timings["sent_times_ms"]`), the gaps between sends, and the hop's variable delay (each
token's arrival at the client minus its send, less the smallest such difference in its request: the hop's
constant part cancels, so no clock offset is needed).

Requests follow each other as soon as the last one's Finished is in (a client that sends its next at once meets
whatever the server still does after a request), or `--gap-ms` apart.

    python -m bench.probes.client_spin --model M [--device cuda] [--requests 40] [--tokens 32] [--gap-ms 0]
"""

from __future__ import annotations

import argparse
import time

from bench.stats import gaps_ms, percentile
from graph_executor.loading.load_config import LoadConfig
from jit_context.speculative_config import SpeculativeConfig
from launch.client import Client
from launch.supervisor import ServerConfig, Supervisor


def one(client: Client, ids: list[int], tokens: int) -> tuple[float, float, list[float], list[float], list[float],
                                                             list[float], list[float], float, float, float]:
    """(client TTFT, JIT TTFT, client token gaps, JIT token gaps, JIT work per token, JIT send gaps, hop delay
    variation per token, the request's way in (generate() called -> the JIT context has it queued), the first
    token's way out (its TokenChunk sent -> in the client's hand), the way in's first part (generate() called -> the
    JIT context's wait for clients returned with it: the client's work, the hop, the wake-up)), ms."""
    params = {"max_tokens": tokens, "temperature": 0.0, "ignore_eos": True}
    start = time.perf_counter()
    stamps = []
    for msg in client.generate(token_ids=ids, params=params):
        stamps.append(time.perf_counter())
        timings = getattr(msg, "timings", None)
    stamps = stamps[:-1]  # the Finished message
    client_gaps = [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:], strict=False)]
    known, sent = timings["token_times_ms"], timings["sent_times_ms"]
    arrived = [(t - start) * 1e3 for t in stamps]  # one TokenChunk per token: the stamps align with `sent`
    delays = [a - s for a, s in zip(arrived, sent, strict=True)]
    hop = [d - min(delays) for d in delays]
    way_in = (timings["received_at_s"] - start) * 1e3  # one clock (CLOCK_MONOTONIC) for both processes
    to_poll = (timings["polled_at_s"] - start) * 1e3  # until the JIT context's wait for clients returned with it
    return ((stamps[0] - start) * 1e3, timings["ttft_ms"], client_gaps, gaps_ms(known),
            [s - k for k, s in zip(known, sent, strict=True)], gaps_ms(sent), hop, way_in,
            arrived[0] - way_in - sent[0], to_poll)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=40, help="requests per mode (after 4 warm-ups)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per request")
    ap.add_argument("--prompt-len", type=int, default=10)
    ap.add_argument("--force-spin-ms", type=float, default=None,
                    help="the spinning client's own window instead of the server's (e.g. to measure it on the CPU)")
    ap.add_argument("--gap-ms", type=float, default=0.0,
                    help="idle time before each request (0: each starts as the last one's Finished arrives)")
    ap.add_argument("--doorbell", default="auto", choices=("auto", "on", "off"),
                    help="the server's step doorbell (auto: on a GPU only; on: to see its way on the CPU)")
    ap.add_argument("--idle-spin-ms", type=float, default=0.0,
                    help="the JIT context's idle spin window (ServerConfig.jit_idle_spin_ms)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    load = LoadConfig(model=args.model, device=args.device, max_context=1024, progress=False)
    sup = Supervisor(ServerConfig(load, speculation=SpeculativeConfig("off"), doorbell=args.doorbell,
                                  jit_idle_spin_ms=args.idle_spin_ms))
    sup.start()
    sup.wait_ready()
    ids = list(range(1000, 1000 + args.prompt_len))
    # (transport, spin window): the ZeroMQ DEALER and the local stream (ipc.local_stream), each sleeping and spinning
    modes = [(local, spin) for local in (False, True) for spin in (0.0, args.force_spin_ms)]
    clients = [Client(sup.address, spin_ms=spin, local=local) for local, spin in modes]
    rows: list[list] = [[] for _ in modes]
    try:
        for client in clients:
            while client.status()["executor"]["graphs"].get("pending"):
                time.sleep(0.2)
            for _ in range(4):
                one(client, ids, args.tokens)
        for _ in range(args.requests):
            for got, client in zip(rows, clients, strict=True):
                time.sleep(args.gap_ms / 1e3)
                got.append(one(client, ids, args.tokens))
    finally:
        for client in clients:
            client.close()
        sup.stop()

    def name(client: Client, spin: float | None) -> str:
        how = "sleeps" if spin == 0 else f"spins ({client.spin.window_s * 1e3:g} ms)"
        return f"{'local stream' if client.local_path else 'ZeroMQ'}, {how}"

    print(f"| client | client TTFT | JIT TTFT | client - JIT | request's way in (to the JIT's wake + its read, checks) "
          f"| first token's way out | client gap P50 / P99 | JIT gap P50 / P99 |  ({args.requests} requests each, "
          f"alternating, {args.prompt_len}-token prompt, {args.tokens} tokens, {args.gap_ms:g} ms idle before each; "
          f"TTFT and ways: medians; gaps: over every token of every request; ms)")
    print("|---|---|---|---|---|---|---|---|")
    for (_, spin), client, got in zip(modes, clients, rows, strict=True):
        client_gaps = [g for r in got for g in r[2]]
        jit_gaps = [g for r in got for g in r[3]]
        print(f"| {name(client, spin)} | {percentile([r[0] for r in got], 50):.3f} | "
              f"{percentile([r[1] for r in got], 50):.3f} | {percentile([r[0] - r[1] for r in got], 50):.3f} | "
              f"{percentile([r[7] for r in got], 50):.3f} ({percentile([r[9] for r in got], 50):.3f} + "
              f"{percentile([r[7] - r[9] for r in got], 50):.3f}) | {percentile([r[8] for r in got], 50):.3f} | "
              f"{percentile(client_gaps, 50):.3f} / {percentile(client_gaps, 99):.3f} | "
              f"{percentile(jit_gaps, 50):.3f} / {percentile(jit_gaps, 99):.3f} |")
    print("\n| client | JIT work per token P50 / P99 | JIT send gap P50 / P99 | hop delay variation P50 / P99 / "
          "max |  (ms, over every token)")
    print("|---|---|---|---|")
    for (_, spin), client, got in zip(modes, clients, rows, strict=True):
        work, sends, hop = ([g for r in got for g in r[i]] for i in (4, 5, 6))
        print(f"| {name(client, spin)} | {percentile(work, 50):.3f} / {percentile(work, 99):.3f} | "
              f"{percentile(sends, 50):.3f} / {percentile(sends, 99):.3f} | {percentile(hop, 50):.3f} / "
              f"{percentile(hop, 99):.3f} / {max(hop):.3f} |")


if __name__ == "__main__":
    main()
