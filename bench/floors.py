"""Speed floors of this card, measured in the same run: HBM read bandwidth (a large reduction) and matmul rate
(a large GEMM in the model's dtype); and the floors they imply for this model:

    decode floor(c)  = (weight bytes read per token + KV bytes per token * c) / bandwidth
    prefill floor(n) = max(weight bytes / bandwidth, 2 * matmul params * n / matmul rate)

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
    """{bandwidth_bytes_per_s, matmul_flops_per_s, how}: run in its own process, alone on the card."""
    return measure_device(spec.device, spec.dtype)


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


def floors(measured: dict, cost: ModelCost, spec: BenchSpec) -> dict:
    bw, rate = measured["bandwidth_bytes_per_s"], measured["matmul_flops_per_s"]
    contexts = sorted({*spec.contexts, decode_context(spec)})
    return {
        "bandwidth_gb_s": sig(bw / 1e9), "matmul_tflop_s": sig(rate / 1e12), "how": measured["how"],
        "decode_context": decode_context(spec),  # the decode workload's mean context
        "decode_ms": {str(c): sig(decode_floor_ms(cost, bw, c)) for c in contexts},
        "prefill_ms": {str(n): sig(prefill_floor_ms(cost, bw, rate, n)) for n in spec.prompt_lens},
    }
