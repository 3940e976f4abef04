"""Triton kernels against float64 torch references on fresh random inputs, outputs poisoned before each run.

On a machine without a GPU they run under TRITON_INTERPRET=1 (set here before the kernels are imported).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from graph_executor.kernels.decode_attention import DecodeAttention  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def reference_decode(q, k, v, pos: int, window: int | None) -> torch.Tensor:
    """q [h, hd], k/v [kvh, C, hd] -> [h, hd] in float64."""
    h, hd = q.shape
    group = h // k.shape[0]
    start = 0 if window is None else max(0, pos + 1 - window)
    kk = k[:, start:pos + 1].double().repeat_interleave(group, 0)  # [h, L, hd]
    vv = v[:, start:pos + 1].double().repeat_interleave(group, 0)
    scores = torch.einsum("hd,hld->hl", q.double(), kk) / hd ** 0.5
    return torch.einsum("hl,hld->hd", scores.softmax(-1), vv)


CASES = [  # heads, kv_heads, head_dim, cache length, positions, window, dtype
    (4, 4, 64, 512, [0, 1, 63, 64, 300, 511], None, torch.float32),
    (8, 2, 64, 1024, [5, 257, 700, 1023], None, torch.float16),
    (4, 1, 128, 600, [0, 599], None, torch.bfloat16),
    (4, 2, 64, 512, [10, 200, 511], 100, torch.float16),
]


@pytest.mark.parametrize("heads,kv_heads,hd,cache,positions,window,dtype", CASES)
def test_decode_attention_matches_reference(heads, kv_heads, hd, cache, positions, window, dtype) -> None:
    gen = torch.Generator(device="cpu").manual_seed(heads * 1000 + cache)
    attn = DecodeAttention(heads, kv_heads, hd, cache, DEVICE, sliding_window=window)
    # The cache as the model lays it out: one layer's K and V are strided views of [2, kv_heads, C, hd].
    kv = torch.randn(2, kv_heads, cache, hd, generator=gen).to(DEVICE, dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for pos in positions:
        q = torch.randn(heads, hd, generator=gen).to(DEVICE, dtype)
        out = torch.full((heads, hd), float("nan"), device=DEVICE, dtype=dtype)
        attn(q, kv[0], kv[1], torch.tensor([pos], device=DEVICE), out)
        ref = reference_decode(q.cpu(), kv[0].cpu(), kv[1].cpu(), pos, window)
        assert torch.isfinite(out).all()
        err = (out.cpu().double() - ref).norm() / ref.norm()
        assert err < tol, f"pos {pos}: relative error {err:.2e}"
