"""Prefill attention over the cache at device positions (`kernels/extend_attention.py`) against a float64 reference:
fresh random inputs, grouped-query heads, sliding windows, starts past 0, padding rows clamped to the last cache
position, and row counts across the tile boundary. Under the Triton interpreter in float32 without a GPU, float16 on
one."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from graph_executor.kernels.extend_attention import ExtendWorkspace, extend_attention  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.float32
TOL = dict(rtol=1e-2, atol=1e-2) if DTYPE == torch.float16 else dict(rtol=1e-5, atol=1e-5)


def reference(q, k, v, positions, window):
    """q [T, H, hd], k/v [KVH, C, hd] -> [T, H, hd] float64, one query at a time."""
    t, heads, hd = q.shape
    group = heads // k.shape[0]
    out = torch.zeros(t, heads, hd, dtype=torch.float64)
    keys = torch.arange(k.shape[1])
    for i, p in enumerate(positions.tolist()):
        visible = (keys <= p) & (keys > p - (window or 1 << 30))
        for h in range(heads):
            kk, vv = k[h // group, visible].double(), v[h // group, visible].double()
            w = torch.softmax(kk @ q[i, h].double() * hd ** -0.5, dim=0)
            out[i, h] = w @ vv
    return out


@pytest.mark.parametrize("t,start,heads,kv_heads,window,context", [
    (1, 0, 4, 4, None, 32), (12, 0, 4, 2, None, 32), (20, 37, 4, 4, None, 96), (70, 5, 4, 1, None, 128),
    (9, 50, 6, 2, 8, 64), (33, 100, 2, 2, 40, 160), (16, 90, 4, 2, None, 100)])
@pytest.mark.parametrize("split", [None, 64], ids=["one-pass", "key-splits"])
def test_extend_attention_matches_float64(t, start, heads, kv_heads, window, context, split):
    gen = torch.Generator().manual_seed(t * 131 + start)
    hd = 16

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(DTYPE)

    qkv = rnd(t, (heads + 2) * hd)  # q as a strided view of a wider row, as the prefill step holds it
    q = qkv[:, :heads * hd].view(t, heads, hd)
    k, v = rnd(kv_heads, context, hd), rnd(kv_heads, context, hd)
    positions = (torch.arange(t) + start).clamp(max=context - 1)  # padding rows past the cache end: its last row
    out = torch.full((t, heads, hd), float("nan"), dtype=DTYPE)
    workspace = ExtendWorkspace.allocate(heads, hd, context, DEVICE, split) if split else None  # 64 keys a split
    got = extend_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), positions.to(DEVICE), out.to(DEVICE), window,
                           workspace=workspace)
    torch.testing.assert_close(got.double().cpu(), reference(q, k, v, positions, window), **TOL)


def test_the_slot_read_from_the_device_picks_its_caches():
    gen = torch.Generator().manual_seed(9)
    caches = torch.randn(3, 2, 2, 40, 16, generator=gen).to(DTYPE)  # [slots, K/V, kv heads, C, hd]
    q = torch.randn(7, 4, 16, generator=gen).to(DTYPE)
    positions = torch.arange(7) + 20
    dev = caches.to(DEVICE)
    out = torch.full((7, 4, 16), float("nan"), dtype=DTYPE, device=DEVICE)
    extend_attention(q.to(DEVICE), dev[0, 0], dev[0, 1], positions.to(DEVICE), out, None,
                     slot=torch.tensor([2], device=DEVICE), slot_stride=dev.stride(0))
    torch.testing.assert_close(out.double().cpu(), reference(q, caches[2, 0], caches[2, 1], positions, None), **TOL)


def test_the_split_sizes_follow_the_context():
    small = ExtendWorkspace.allocate(4, 16, 1000, DEVICE)
    assert (small.split, small.num_splits) == (256, 4)
    big = ExtendWorkspace.allocate(4, 16, 32768, DEVICE)
    assert (big.split, big.num_splits) == (2048, 16)
    with pytest.raises(ValueError, match="multiple of 64"):
        ExtendWorkspace.allocate(4, 16, 1000, DEVICE, split=100)


def test_bad_shapes_are_one_line_errors():
    q = torch.zeros(3, 4, 16, device=DEVICE, dtype=DTYPE)
    cache = torch.zeros(3, 8, 16, device=DEVICE, dtype=DTYPE)  # 4 heads over 3 KV heads
    with pytest.raises(ValueError, match="extend attention"):
        extend_attention(q, cache, cache, torch.zeros(3, dtype=torch.int64, device=DEVICE), torch.empty_like(q))
