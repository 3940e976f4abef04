"""results.md: the figures of one run as Markdown tables (the same numbers as results.json)."""

from __future__ import annotations

from bench.stats import measured

GiB = 1024**3


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("-" if v is None else str(v) for v in row) + " |" for row in rows]
    return lines + [""]


def _ms(summary: dict | None, key: str, spread: str | None = None) -> str | None:
    if not summary or key not in summary:
        return None
    return f"{summary[key]:.2f}" + (f" ({summary[spread]:.2f})" if spread else "")


def _engines_with(results: dict, workload: str) -> list[str]:
    """Engines that measured `workload` (one that recorded a skip did not)."""
    return [n for n, r in results["engines"].items() if measured(r, workload)]


def _code_id(git: dict) -> str:
    """The commit, and always the sources' digest: the GPU machine's copy of the tree may carry a `.git` of an older
    commit than its files (the digest is what identifies them; `bench.envinfo.source_digest` at a commit matches)."""
    digest = git.get("source_sha256")
    sources = f"sources sha256 {digest[:12]}" if digest else None
    if git["commit"]:
        commit = git["commit"][:12] + (" (dirty)" if git["dirty"] else "")
        return f"{commit} ({sources})" if sources else commit
    return f"- ({sources})" if sources else "-"


def header(results: dict) -> list[str]:
    env, spec, model = results["env"], results["spec"], results["model"]
    git = env["git"]
    facts = (f"{results['created']}; driver {env['driver'] or '-'}, torch {env['torch']} "
             f"(CUDA {env['cuda'] or '-'}), transformers {env['transformers']}, commit "
             f"{_code_id(git)}; "
             f"{model['params'] / 1e9:.3g} B params, weights {model.get('weight_format') or spec['dtype']} "
             f"({model.get('bits_per_weight', 8 * model['dtype_bytes']):.3g} bits per weight read), "
             f"{model['decode_weight_bytes'] / 1e9:.3g} GB read per decoded token, "
             f"{model['kv_bytes_per_token'] / 1e6:.3g} MB KV per token of context; batch 1, greedy, "
             f"EOS ignored, random prompt ids (seed {spec['seed']}), max context {spec['max_context']}.")
    quantize = f", --quantize {spec['quantize']}" if spec.get("quantize") else ""
    return [f"# hybridrt bench: {spec['model']} ({spec['dtype']}{quantize}) on {env['card']}", "", facts, ""]


def floors_section(results: dict) -> list[str]:
    f = results.get("floors")
    if not f:
        return []
    if "bandwidth_gb_s" not in f:
        return ["## Floors", "", f"not measured: {f.get('status')}: {f.get('error')}", ""]
    decode = ", ".join(f"{c}: {v:.3f}" for c, v in f["decode_ms"].items())
    rates = (f"HBM read bandwidth {f['bandwidth_gb_s']} GB/s ({f['how']['reduction']}), matmul "
             f"{f['matmul_tflop_s']} TFLOP/s ({f['how']['gemm']}), {f['how']['statistic']}.")
    lines = ["## Floors", "", rates, ""]
    if tp := f.get("tensor_parallel"):
        lines += [f"Tensor parallel over {tp['ranks']} ranks: one rank's weights read per token "
                  f"{tp['rank_decode_weight_bytes'] / 1e9:.3f} GB; one token's all-reduce {tp['allreduce_us']} us "
                  f"({tp['how']}) x {tp['collectives_per_step']} collectives per step = {tp['collectives_ms']} ms, "
                  "added to every floor.", ""]
    return lines + [f"Decode floor (ms) by context: {decode}.", ""]


def ttft_section(results: dict) -> list[str]:
    names = _engines_with(results, "ttft")
    if not names:
        return []
    floor = (results.get("floors") or {}).get("prefill_ms", {})
    lens = results["spec"]["prompt_lens"]
    rows = [[n, floor.get(str(n))] + [_ms(results["engines"][e]["ttft"].get(str(n)), "median_ms", "p99_ms")
                                      for e in names] for n in lens]
    lines = ([f"## TTFT (ms): median (P99) of {results['spec']['repeats']}, back to back", ""]
             + _table(["prompt tokens", "floor"] + names, rows))
    pauses = {v["after_pause"]["pause_s"] for e in names for v in results["engines"][e]["ttft"].values()
              if "after_pause" in v}
    paused = [e for e in names if any("after_pause" in v for v in results["engines"][e]["ttft"].values())]
    if paused:
        rows = [[n, floor.get(str(n))] + [_ms(results["engines"][e]["ttft"].get(str(n), {}).get("after_pause"),
                                              "median_ms", "p99_ms") for e in paused] for n in lens]
        idle = " / ".join(f"{p * 1e3:.0f}" for p in sorted(pauses))
        lines += [f"## TTFT (ms) after {idle} ms of idle: median (P99) of {results['spec']['repeats']} (a chat user's "
                  "request; the ratios use the back-to-back figures)",
                  ""] + _table(["prompt tokens", "floor"] + paused, rows)
    return lines


def decode_section(results: dict) -> list[str]:
    names = _engines_with(results, "decode")
    if not names:
        return []
    vs_floor = results["ratios"]["vs_floor"]
    rows = []
    for e in names:
        d = results["engines"][e]["decode"]
        rows.append([e, *(f"{d[k]:.2f}" for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms")), d["tokens_per_s"],
                     vs_floor.get(e, {}).get("decode_p50")])
    spec = results["spec"]
    title = (f"## Decode: per-token latency (ms) over {spec['decode_tokens']} tokens after a "
             f"{spec['decode_prompt_len']}-token prompt")
    return [title, ""] + _table(["engine", "P50", "P90", "P99", "max", "tokens/s", "P50 / floor"], rows)


def context_section(results: dict) -> list[str]:
    names = _engines_with(results, "context")
    if not names:
        return []
    floor = (results.get("floors") or {}).get("decode_ms", {})
    rows = [[c, floor.get(str(c))] + [_ms(results["engines"][e]["context"].get(str(c)), "p50_ms", "p99_ms")
                                      for e in names] for c in results["spec"]["contexts"]]
    return ([f"## Per-token latency (ms) vs context: P50 (P99) of {results['spec']['context_steps']} steps", ""]
            + _table(["context", "floor"] + names, rows))


def ratio_section(results: dict) -> list[str]:
    cols = {f"{e} / floor": r for e, r in results["ratios"]["vs_floor"].items()}
    cols.update(results["ratios"]["vs_peer"])
    if not cols:
        return []
    metrics = [("ttft", f"TTFT {n}", str(n)) for n in results["spec"]["prompt_lens"]]
    metrics += [("decode_p50", "decode P50", None)]
    metrics += [("context_p50", f"P50 at context {c}", str(c)) for c in results["spec"]["contexts"]]
    rows = [[label] + [(r.get(key, {}) or {}).get(sub) if sub else r.get(key) for r in cols.values()]
            for key, label, sub in metrics]
    return ["## Ratios (below 1: the left one is faster)", ""] + _table(["figure"] + list(cols), rows)


def _graphs(startup: dict) -> str | None:
    captured = (startup.get("graphs") or {}).get("captured") or {}
    done = f", all done at {startup['graphs_captured']} s" if "graphs_captured" in startup else ""
    return f"{len(captured)} in {sum(captured.values()):.2f} s{done}" if captured else None


def _one_line(text: str | None, limit: int = 200) -> str | None:
    """A table cell: no newlines or pipes."""
    return " ".join(text.replace("|", "/").split())[:limit] if text else None


def _gib(value: int | None) -> str | None:
    return f"{value / GiB:.2f}" if value else None


def status_section(results: dict) -> list[str]:
    rows = []
    for e, r in results["engines"].items():
        s, m = r.get("startup", {}), r.get("memory", {})
        rows.append([e, r["status"], r["wall_s"], s.get("weights_ready"), s.get("ready"), _graphs(s),
                     s.get("warm"), _gib(m.get("peak_allocated_bytes", m.get("peak_rss_bytes"))),
                     _gib(m.get("weights_resident_bytes")), _gib(m.get("weight_bytes")),
                     _gib(m.get("graph_pool_bytes")), _one_line(r.get("error"))])
    head = ["engine", "status", "wall s", "weights ready s", "ready s", "graphs captured", "warm s", "peak GiB",
            "weights resident GiB", "weights as stored GiB", "graph pool GiB", "error"]
    return (["## Engines: status, startup (s since spawn), memory (GPU: peak allocated; CPU: peak RSS)", ""]
            + _table(head, rows) + _hf_setup(results))


def _hf_setup(results: dict) -> list[str]:
    """One line per HF peer: how its attention ran (a peer's figure depends on it: bench/engines/hf.py)."""
    lines = []
    for e, r in results["engines"].items():
        facts = r.get("facts") or {}
        if "attn_implementation" not in facts:
            continue
        cudnn = facts.get("sdpa_cudnn")
        backend = "" if cudnn is None else (", SDPA's cuDNN backend on" if cudnn else
                                            ", SDPA's cuDNN backend off (it builds a plan per sequence length)")
        lines.append(f"- {e}: transformers {facts.get('transformers')}, attention {facts['attn_implementation']}"
                     f"{backend}")
    return lines + [""] if lines else []


def overhead_section(results: dict) -> list[str]:
    o = results.get("overhead")
    if not o:
        return []
    if "note" in o:
        return ["## Two-process overhead", "", o["note"], ""]
    rows = [[f"TTFT {n}", v] for n, v in o.get("ttft", {}).items()]
    rows += [["decode P50", o.get("decode_p50")]]
    rows += [[f"P50 at context {c}", v] for c, v in o.get("context_p50", {}).items()]
    return ["## Two-process overhead (ms, hybridrt minus hybridrt-executor)", ""] + _table(["figure", "ms"], rows)


def speculative_section(results: dict) -> list[str]:
    names = _engines_with(results, "speculative")
    if not names:
        return []
    rows = []
    for e in names:
        s = results["engines"][e]["speculative"]
        rows.append([e, s["method"], *(x for kind in ("grounded", "open")
                                       for x in (s[kind]["tokens_per_s"], s[kind]["tokens"], s[kind]["acceptance_rate"]))])
    head = ["engine", "speculative", "grounded tokens/s", "grounded tokens", "grounded acceptance", "open tokens/s",
            "open tokens", "open acceptance"]
    spec = results["spec"]
    return ([f"## Speculative workload: chat prompts, greedy, up to {spec.get('spec_tokens')} tokens each "
             "(tokens/s over the decode part, summed over prompts)", ""] + _table(head, rows))


def chat_section(results: dict) -> list[str]:
    """Chat TTFT per engine (text through the server's template and tokenizer), and the HTTP API's cost over the
    native client when both ran."""
    names = _engines_with(results, "chat")
    if not names:
        return []
    kinds = ("short", "long")
    rows = []
    for e in names:
        chat = results["engines"][e]["chat"]
        for suffix, label in (("", e), ("_http_client", f"{e} (http.client)")):
            if all(k + suffix in chat for k in kinds):
                rows.append([label, *(f"{chat[k + suffix][m]:.2f}" for k in kinds for m in ("median_ms", "p99_ms"))])
    head = ["engine", "short chat median ms", "P99", "long chat median ms", "P99"]
    lines = ["## Chat TTFT: text through the server's chat template and tokenizer, one token generated", "",
             *_table(head, rows)]
    if {"hybridrt", "hybridrt-http"} <= set(names):
        native, http = results["engines"]["hybridrt"]["chat"], results["engines"]["hybridrt-http"]["chat"]

        def over(key: str, kind: str) -> str:
            return f"{http[key]['median_ms'] - native[kind]['median_ms']:+.2f} ms"

        lines += ["HTTP API - native client (median): " + ", ".join(
            f"{k} {over(k, k)}" + (f" (httpx; {over(k + '_http_client', k)} through http.client)"
                                   if k + "_http_client" in http else "") for k in kinds)]
    return [*lines, ""]


def concurrency_section(results: dict) -> list[str]:
    """Several streams on one server (the concurrency workload): per-stream latency against one stream, aggregate
    throughput, and a request arriving while the others decode."""
    lines = []
    for e in _engines_with(results, "concurrency"):
        c = results["engines"][e]["concurrency"]
        n, a = c["streams"], c["arrival"]
        rows = [["1 (alone)", f"{c['single']['p50_ms']:.3f}", f"{c['single']['p99_ms']:.3f}", "1.000",
                 f"{c['single_tokens_per_s']:.1f}"]]
        rows += [[f"{n} together: stream {i}", f"{s['p50_ms']:.3f}", f"{s['p99_ms']:.3f}",
                  f"{s['p50_ms'] / c['single']['p50_ms']:.3f}", ""] for i, s in enumerate(c["per_stream"])]
        rows += [[f"{n} together: all", "", "", f"worst {c['worst_p50_ratio']:.3f}",
                  f"{c['aggregate_tokens_per_s']:.1f} ({c['aggregate_vs_single']:.2f}x)"]]
        if "decode_phase_tokens_per_s" in c:
            rows += [[f"{n} together: all, once all decode", "", "", "",
                      f"{c['decode_phase_tokens_per_s']:.1f} ({c['decode_phase_vs_single']:.2f}x)"]]
        lines += [f"## Concurrency ({e}, --max-num-seqs {n}, {c['tokens_per_stream']} tokens per stream)", "",
                  *_table(["streams", "P50 ms/token", "P99", "P50 / alone", "tokens/s"], rows),
                  f"A {a['prompt_tokens']}-token prompt arriving while {a['running']} other stream"
                  f"{'s decode' if a['running'] > 1 else ' decodes'}: TTFT "
                  f"{a['busy_ttft']['median_ms']:.2f} ms against {a['idle_ttft']['median_ms']:.2f} idle "
                  f"({a['ttft_ratio']:.2f}x); the running streams' worst token gap meanwhile {a['worst_gap_ms']:.2f} "
                  f"ms against their P50 {a['running_p50_ms']:.2f} ({a['worst_gap_ratio']:.2f}x)", ""]
    return lines


def turns_section(results: dict) -> list[str]:
    """A chat's second turn against a fresh short prompt (the turns workload)."""
    lines = []
    for e in _engines_with(results, "turns"):
        t = results["engines"][e]["turns"]
        lines += [f"## Second turn of a chat ({e}, prefix reuse {'on' if t['prefix_reuse'] else 'off'})", "",
                  f"TTFT of a {t['second_turn_tokens']}-token second turn {t['second_turn_ttft']['median_ms']:.2f} ms "
                  f"(prompt tokens reused: {t['cached_prompt_tokens']}) against {t['short_ttft']['median_ms']:.2f} "
                  f"ms for a fresh {t['short_tokens']}-token prompt: {t['ratio']:.2f}x", ""]
    return lines


def verify_section(results: dict) -> list[str]:
    names = _engines_with(results, "verify")
    if not names:
        return []
    v = results["engines"][names[0]]["verify"]
    draft = v.get("draft_model")
    rows = [[k, f"{r['verify_ms']:.3f}", f"{r['vs_decode']:.3f}", r["break_even_acceptance"],
             *([f"{r['with_draft_ms']:.3f}", f"{r['with_draft_vs_decode']:.3f}", r["with_draft_break_even"]]
               if draft else [])] for k, r in v["k"].items()]
    head = ["k", "verify ms", "verify / decode", "break-even acceptance rate"]
    head += [f"draft {draft} + verify ms", "/ decode", "break-even"] if draft else []
    return ([f"## Verify step of k + 1 tokens vs a decode step ({names[0]}, graph replays at context "
             f"{v['context']}; decode {v['decode_ms']:.3f} ms)", ""] + _table(head, rows))


def _server_ttfts(values: list | None) -> str:
    if not values or any(v is None for v in values):
        return ""
    return f" (the JIT context's own TTFT: {', '.join(f'{v:.2f}' for v in values)} ms)"


def startup_section(results: dict) -> list[str]:
    """Each process's start-up phases (seconds, in order) and the first requests' TTFT after ready against steady
    state, where an engine reports them (the hybridrt server)."""
    lines = []
    for e, r in results["engines"].items():
        s = r.get("startup") or {}
        for process, facts in (s.get("phases") or {}).items():
            phases = (facts or {}).get("phases_s") or {}
            if phases:
                ready = facts.get("ready_since_spawn_s")
                lines.append(f"- {e}, {process}: " + ", ".join(f"{name} {sec:.2f}" for name, sec in phases.items())
                             + (f"; ready {ready:.2f} s after spawn" if ready is not None else ""))
        first = s.get("first_requests")
        if first:
            lines.append(f"- {e}, the first {len(first['ttft_ms'])} requests after ready ({first['prompt_tokens']}-"
                         f"token prompts): TTFT {', '.join(f'{t:.2f}' for t in first['ttft_ms'])} ms against "
                         f"{first['steady_ttft_ms']:.2f} steady: worst {first['worst_ratio']:.2f}x"
                         + _server_ttfts(first.get("server_ttft_ms")))
            if first.get("after_idle_ttft_ms") is not None:
                # The first request after ready also comes after a pause: this is its like-for-like reference.
                lines.append(f"- {e}, a request after {first['after_idle_s']:.0f} s idle: TTFT "
                             f"{first['after_idle_ttft_ms']:.2f} ms (the JIT context's own: "
                             f"{first.get('after_idle_server_ttft_ms') or float('nan'):.2f}); the first request "
                             f"after ready {first['ttft_ms'][0] / first['after_idle_ttft_ms']:.2f}x it")
    return ["## Start-up phases (s) and the first requests after ready", "", *lines, ""] if lines else []


def markdown(results: dict) -> str:
    sections = [header, floors_section, ttft_section, decode_section, context_section, ratio_section,
                speculative_section, verify_section, chat_section, concurrency_section, turns_section, overhead_section, status_section, startup_section]
    return "\n".join(line for section in sections for line in section(results))


def speculative_table(runs: dict[str, dict]) -> str:
    """One line per engine and --speculative method: tokens/s of each prompt kind, its ratio to the same
    engine's run without speculation, acceptance, and how many prompts gave the same tokens as that run."""
    base = runs.get("off", {})
    rows = []
    for method, results in runs.items():
        for name, r in results["engines"].items():
            s = r.get("speculative")
            if not s or "skipped" in s:
                continue
            b = (base.get("engines", {}).get(name) or {}).get("speculative") or {}
            cells = [method, name]
            for kind in ("grounded", "open"):
                rate, ref = s[kind]["tokens_per_s"], (b.get(kind) or {}).get("tokens_per_s")
                same = sum(p["token_ids"] == q["token_ids"] for p, q in zip(s[kind]["prompts"],
                                                                             (b.get(kind) or {}).get("prompts", [])))
                cells += [rate, f"{rate / ref:.2f}" if rate and ref else None, s[kind]["acceptance_rate"],
                          f"{same}/{len(s[kind]['prompts'])}" if b else None]
            rows.append(cells)
    header = ["speculative", "engine", "grounded tokens/s", "vs off", "acceptance", "same tokens as off",
              "open tokens/s", "vs off", "acceptance", "same tokens as off"]
    return "\n".join(["# hybridrt bench: speculative decoding side by side", "", *_table(header, rows)])


def tensor_parallel_table(runs: dict[str, dict]) -> str:
    """One line per rank count of a `--tensor-parallel` axis and hybridrt engine: the decode floor at the decode
    workload's context, decode P50, its ratio to the floor and to the first rank count's P50 (issue 15's target: two
    ranks <= 0.62x one), TTFT per prompt length."""
    rows = []
    first = next(iter(runs.values()), {})
    prompts = [str(n) for n in sorted(first.get("spec", {}).get("prompt_lens", []))] \
        if "ttft" in first.get("spec", {}).get("workloads", ()) else []
    base: dict[str, float] = {}
    for label, results in runs.items():
        floors = results.get("floors") or {}
        floor = (floors.get("decode_ms") or {}).get(str(floors.get("decode_context")))
        for name in ("hybridrt", "hybridrt-http"):
            decode = results["engines"].get(name, {}).get("decode")
            if not decode:
                continue
            p50 = decode["p50_ms"]
            base.setdefault(name, p50)
            ttft = results["engines"][name].get("ttft", {})
            rows.append([results["spec"].get("tensor_parallel", 1), name, f"{floor:.3f}" if floor else None,
                         f"{p50:.3f}", f"{p50 / floor:.2f}" if floor else None, f"{p50 / base[name]:.3f}",
                         *(f"{ttft[n]['median_ms']:.2f}" if n in ttft else None for n in prompts)])
    header = ["ranks", "engine", "decode floor ms", "decode P50 ms", "P50 / floor", "P50 / first row's",
              *(f"TTFT {n} ms" for n in prompts)]
    return "\n".join(["# hybridrt bench: tensor parallelism side by side", "", *_table(header, rows)])


def formats_table(runs: dict[str, dict]) -> str:
    """One line per weight format of a `--quantize` axis: bits per weight read, the decode floor at the
    decode workload's context, P50 of each hybridrt engine and its ratio to that floor, TTFT at the shortest
    and longest prompt."""
    rows = []
    first = next(iter(runs.values()), {})
    prompts = sorted(first.get("spec", {}).get("prompt_lens", []))
    ends = [str(n) for n in prompts[:1] + prompts[-1:]] if "ttft" in first.get("spec", {}).get("workloads", ()) else []
    for label, results in runs.items():
        model, floors = results["model"], results.get("floors") or {}
        context = floors.get("decode_context")
        floor = (floors.get("decode_ms") or {}).get(str(context))
        for name in ("hybridrt-executor", "hybridrt"):
            decode = results["engines"].get(name, {}).get("decode")
            if not decode:
                continue
            ttft = results["engines"][name].get("ttft", {})
            p50 = decode["p50_ms"]
            rows.append([label, model.get("weight_format", "-"), f"{model.get('bits_per_weight', 0):.2f}",
                         f"{model['weight_bytes'] / 1e9:.2f}", name, f"{floor:.3f}" if floor else None,
                         f"{p50:.3f}", f"{p50 / floor:.2f}" if floor else None,
                         *(f"{ttft[n]['median_ms']:.2f}" if n in ttft else None for n in ends)])
    header = ["format", "weights", "bits/weight read", "weight GB", "engine", "decode floor ms", "decode P50 ms",
              "P50 / floor", *(f"TTFT {n} ms" for n in ends)]
    return "\n".join(["# hybridrt bench: weight formats side by side", "", *_table(header, rows)])
