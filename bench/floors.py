"""Speed floors of this card, measured in the same run: HBM read bandwidth (a large reduction) and matmul rate
(a large GEMM in the model's dtype); and the floors they imply for this model:

    decode floor(c)  = (weight bytes read per token + KV bytes per token * c) / bandwidth
    prefill floor(n) = max(weight bytes / bandwidth, 2 * matmul params * n / matmul rate)

With tensor parallelism on GPUs (`--tensor-parallel N`) the byte and matmul terms are one rank's (each GPU reads its
part at the same time; `ModelCost.of(ranks=N)`), plus the measured latency of one token's all-reduce between the
ranks (`bench.allreduce`) times the step's collectives: 2 per layer and the logits' gather (issue 15's N-GPU floor).

On a CPU the same, with host timers and smaller sizes (a smoke path, not a figure to quote). The probes in
bench/probes/ take their floors, timers and floor formulas from here too.
"""

from __future__ import annotations

import statistics
import time

from bench.model_info import ModelCost
from bench.spec import BenchSpec
from bench.stats import sig

GPU_REDUCE_BYTES = 4 * 1024**3  # far past L2, so the reduction streams from HBM
GPU_GEMM = 8192
CPU_REDUCE_BYTES = 256 * 1024**2
CPU_GEMM = 1024
WARMUP, REPEATS = 3, 10


def time_gpu(fn, device, repeats: int = REPEATS) -> float:
    """Median seconds of fn() between CUDA events, after WARMUP untimed calls."""
    import torch

    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(begin.elapsed_time(end) / 1e3)
    return statistics.median(times)


def time_cpu(fn) -> float:
    fn()
    times = []
    for _ in range(max(3, REPEATS // 2)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _bandwidth(device: str, nbytes: int, timer) -> float:
    import torch

    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    return nbytes / timer(lambda: x.sum())


def _matmul_rate(device: str, n: int, dtype, timer) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timer(lambda: a @ b)


def measure(spec: BenchSpec) -> dict:
    """{bandwidth_bytes_per_s, matmul_flops_per_s, how}, and with tensor parallelism {allreduce}: run in its own
    process, alone on the card(s)."""
    measured = measure_device(spec.device, spec.dtype)
    if spec.tensor_parallel > 1:
        from bench.allreduce import measure_allreduce
        from graph_executor.loading.config import ModelConfig

        hidden = ModelConfig.from_hf_dict(spec.model_config).hidden_size
        how = spec.tp_allreduce if spec.device.startswith("cuda") else "nccl"  # (the CPU's ranks use gloo)
        measured["allreduce"] = measure_allreduce(spec.device, spec.tensor_parallel, hidden, spec.dtype,
                                                  how=how).to_dict()
    return measured


def measure_device(device: str, dtype: str) -> dict:
    """`measure` for a device name ("cuda", "cuda:N", "cpu") and a torch dtype name, without a BenchSpec."""
    import torch

    gpu = device.startswith("cuda")
    reduce_bytes, n = (GPU_REDUCE_BYTES, GPU_GEMM) if gpu else (CPU_REDUCE_BYTES, CPU_GEMM)
    timer = (lambda fn: time_gpu(fn, device)) if gpu else time_cpu
    bandwidth = _bandwidth(device, reduce_bytes, timer)  # its 4 GiB are freed before the GEMM
    rate = _matmul_rate(device, n, getattr(torch, dtype), timer)
    how = {"reduction": f"sum over {reduce_bytes / 1024**3:g} GiB float32",
           "gemm": f"{n}x{n}x{n} {dtype}", "timer": "CUDA events" if gpu else "perf_counter",
           "statistic": f"median of {REPEATS if gpu else max(3, REPEATS // 2)}"}
    if gpu:
        how["device_name"] = torch.cuda.get_device_name(device)
    return {"bandwidth_bytes_per_s": bandwidth, "matmul_flops_per_s": rate, "how": how}


def decode_floor_ms(cost: ModelCost, bandwidth: float, context: int) -> float:
    return (cost.decode_weight_bytes + cost.kv_bytes_per_token * context) / bandwidth * 1e3


def prefill_floor_ms(cost: ModelCost, bandwidth: float, rate: float, tokens: int) -> float:
    return max(cost.decode_weight_bytes / bandwidth, 2 * cost.matmul_params * tokens / rate) * 1e3


def decode_context(spec: BenchSpec) -> int:
    """The mean context of the decode workload's steps."""
    return spec.decode_prompt_len + spec.decode_tokens // 2


def collectives_per_step(layers: int) -> int:
    """A tensor-parallel step's collectives on its critical path: the all-reduces after o_proj and down_proj of every
    layer, and the logits' gather (counted as one more)."""
    return 2 * layers + 1


def floors(measured: dict, cost: ModelCost, spec: BenchSpec) -> dict:
    """`cost`: the whole model's; with a measured all-reduce (tensor parallelism on GPUs) the floors are one rank's
    bytes and matmuls plus the step's collectives."""
    bw, rate = measured["bandwidth_bytes_per_s"], measured["matmul_flops_per_s"]
    contexts = sorted({*spec.contexts, decode_context(spec)})
    extra_ms, tp = 0.0, {}
    if "allreduce" in measured:
        from bench.model_info import weight_plan
        from graph_executor.loading.config import ModelConfig

        cfg = ModelConfig.from_hf_dict(spec.model_config)
        ranks = measured["allreduce"]["ranks"]
        if spec.on_gpu:  # on the CPU every rank reads through the same memory: the whole model's bytes
            cost = ModelCost.of(cfg, spec.dtype, weight_plan(spec), ranks=ranks)
        count = collectives_per_step(cfg.num_layers)
        extra_ms = measured["allreduce"]["seconds"] * count * 1e3
        tp = {"tensor_parallel": {"ranks": ranks, "rank_decode_weight_bytes": cost.decode_weight_bytes,
                                  "allreduce_us": sig(measured["allreduce"]["seconds"] * 1e6),
                                  "collectives_per_step": count, "collectives_ms": sig(extra_ms),
                                  "how": measured["allreduce"]["how"]}}
    return {
        "bandwidth_gb_s": sig(bw / 1e9), "matmul_tflop_s": sig(rate / 1e12), "how": measured["how"],
        "decode_context": decode_context(spec),  # the decode workload's mean context
        "decode_ms": {str(c): sig(decode_floor_ms(cost, bw, c) + extra_ms) for c in contexts},
        "prefill_ms": {str(n): sig(prefill_floor_ms(cost, bw, rate, n) + extra_ms) for n in spec.prompt_lens},
        **tp,
    }
