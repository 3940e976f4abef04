"""The QKV GEMV with RoPE and the KV append in its epilogue (`kernels/gemv_rope.py`) against a float64 reference of
the two steps it replaces: RMSNorm, the projection (+ bias, x row scale), rotate-half RoPE of query and key heads,
values as they are; every element of q_out and of the caches checked (only the position's row of the chosen slot may
change). On a machine without a GPU it runs under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from graph_executor.kernels.gemv import GemvConfig  # noqa: E402
from graph_executor.kernels.gemv_rope import fits, rmsnorm_gemv_rope  # noqa: E402
from graph_executor.loading.config import ModelConfig  # noqa: E402
from graph_executor.rope import rope_tables  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EPS = 1e-5


def reference(w, x, nw, bias, scale, rope, pos, heads, kv_heads, hd):
    """q [heads, hd], k [kv_heads, hd], v [kv_heads, hd] in float64."""
    xd = x.double()
    h = xd * torch.rsqrt(xd.pow(2).mean() + EPS) * nw.double()
    out = w.double() @ h
    if scale is not None:
        out = out * scale.double()
    if bias is not None:
        out = out + bias.double()
    q, k, v = out.split([heads * hd, kv_heads * hd, kv_heads * hd])
    cos, sin = rope[pos, 0].double().cpu(), rope[pos, 1].double().cpu()

    def rotate(t):  # [n, hd]
        half = hd // 2
        return t * cos + torch.cat([-t[:, half:], t[:, :half]], dim=-1) * sin

    return rotate(q.view(heads, hd)), rotate(k.view(kv_heads, hd)), v.view(kv_heads, hd)


CASES = [  # heads, kv_heads, hd, K, bias, row scale, dtype, config, slot
    (4, 4, 64, 200, False, False, torch.float32, GemvConfig(16, 128, 4, 1), None),  # MHA, K ragged
    (8, 2, 32, 96, True, False, torch.float16, GemvConfig(16, 64, 4, 1), None),  # GQA + bias (Qwen2)
    (4, 2, 64, 128, False, True, torch.float16, GemvConfig(8, 128, 4, 1), 1),  # a row scale (FP8 rows), slot 1
    (2, 1, 16, 64, True, False, torch.float32, GemvConfig(2, 32, 4, 1), 2),  # one pair per program, slot 2
]


@pytest.mark.parametrize("heads,kv_heads,hd,k,has_bias,has_scale,dtype,cfg,slot", CASES)
def test_qkv_gemv_with_rope_and_kv_append_equals_the_reference(heads, kv_heads, hd, k, has_bias, has_scale, dtype,
                                                                 cfg, slot) -> None:
    gen = torch.Generator().manual_seed(heads * 100 + k)
    n, slots, context, pos = (heads + 2 * kv_heads) * hd, 3, 24, 13
    w = torch.randn(n, k, generator=gen) * k ** -0.5
    x, nw = torch.randn(k, generator=gen), 1 + 0.1 * torch.randn(k, generator=gen)
    bias = 0.1 * torch.randn(n, generator=gen) if has_bias else None
    scale = 0.5 + torch.rand(n, generator=gen) if has_scale else None
    config = ModelConfig("llama", 10, k, k, 1, heads, kv_heads, hd, context, rope_theta=10000.0)
    rope = rope_tables(config, context, DEVICE)
    caches = torch.randn(slots, 2, kv_heads, context, hd, generator=gen).to(DEVICE, dtype)  # [S, 2, kvh, C, hd]
    before = caches.clone()
    q_out = torch.full((heads, hd), float("nan"), device=DEVICE, dtype=dtype)
    dev = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    rmsnorm_gemv_rope(dev(w), dev(x), dev(nw), EPS, torch.tensor([pos], device=DEVICE), rope, q_out,
                      caches[0, 0], caches[0, 1], heads, kv_heads, hd, bias=dev(bias), cfg=cfg,
                      row_scale=None if scale is None else scale.to(DEVICE),
                      slot=None if slot is None else torch.tensor([slot], device=DEVICE),
                      slot_stride=caches.stride(0))
    q, k_ref, v = reference(dev(w).cpu(), dev(x).cpu(), dev(nw).cpu(), None if bias is None else dev(bias).cpu(),
                            scale, rope, pos, heads, kv_heads, hd)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    s = slot or 0
    torch.testing.assert_close(q_out.cpu().double(), q, rtol=tol, atol=tol)
    torch.testing.assert_close(caches[s, 0, :, pos].cpu().double(), k_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(caches[s, 1, :, pos].cpu().double(), v, rtol=tol, atol=tol)
    changed = (caches != before).any(dim=-1)  # [S, 2, kvh, C]
    changed[s, :, :, pos] = False
    assert not changed.any(), "only the position's row of the slot's caches may change"


def test_configs_whose_programs_split_a_rotation_pair_are_refused() -> None:
    assert fits(128, GemvConfig(16, 256)) and fits(64, GemvConfig(2, 256)) and not fits(64, GemvConfig(3, 256))
    assert not fits(16, GemvConfig(32, 64))  # 16 pairs per program, 8 per head
    with pytest.raises(ValueError, match="block_n / 2 dividing hd / 2"):
        rmsnorm_gemv_rope(torch.zeros(3 * 16, 8), torch.zeros(8), torch.ones(8), EPS, torch.zeros(1, dtype=torch.int64),
                          torch.zeros(4, 2, 16), torch.zeros(1, 16), torch.zeros(1, 4, 16), torch.zeros(1, 4, 16),
                          1, 1, 16, cfg=GemvConfig(32, 64))
