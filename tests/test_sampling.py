"""SamplingParams validation and wire form; Sampler semantics (greedy, filters, distribution, seeds, penalty)."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
import torch

from jit_context.sampler import Sampler
from jit_context.sampling_params import SamplingParams

CPU = torch.device("cpu")

# ---------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize(
    "field, bad",
    [
        ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", True), ("max_tokens", 1.5), ("max_tokens", "8"),
        ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf), ("temperature", True),
        ("temperature", "1"),
        ("top_k", -1), ("top_k", True), ("top_k", 2.0),
        ("top_p", 0.0), ("top_p", 1.01), ("top_p", math.nan), ("top_p", -0.5),
        ("min_p", -0.1), ("min_p", 1.0), ("min_p", math.nan),
        ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.nan),
        ("repetition_penalty", math.inf),
        ("seed", -1), ("seed", True), ("seed", 1.5),
        ("stop", ("",)), ("stop", ("a",) * 17), ("stop", (1,)), ("stop", "abc"), ("stop", ["a"]),
        ("stop_token_ids", (-1,)), ("stop_token_ids", (True,)), ("stop_token_ids", ("2",)), ("stop_token_ids", [2]),
        ("ignore_eos", 1), ("ignore_eos", "yes"),
        ("min_tokens", -1), ("min_tokens", 1.0), ("min_tokens", 257),  # 257 > the default max_tokens
    ],
)
def test_params_reject_bad_field(field, bad):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: bad})


def test_params_defaults_and_greedy():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.min_p) == (256, 1.0, 0, 1.0, 0.0)
    assert not p.greedy
    assert SamplingParams(temperature=0).greedy
    assert isinstance(SamplingParams(temperature=0).temperature, float)  # JSON `0` stored as 0.0
    assert SamplingParams(top_k=1, top_p=1.0, min_p=0.0, seed=0, stop=("x",) * 16).top_k == 1


def test_params_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="bogus.*top_q|top_q.*bogus"):
        SamplingParams.from_dict({"temperature": 0.5, "top_q": 0.9, "bogus": 1})
    with pytest.raises(ValueError, match="dict"):
        SamplingParams.from_dict([("temperature", 0.5)])


def test_params_from_dict_accepts_lists_and_single_stop_string():
    p = SamplingParams.from_dict({"stop": "\n\n", "stop_token_ids": [7, 9], "seed": 3})
    assert p.stop == ("\n\n",) and p.stop_token_ids == (7, 9) and p.seed == 3
    assert SamplingParams.from_dict({"stop": ["a", "b"]}).stop == ("a", "b")
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.from_dict({"top_p": 2})


def test_params_dict_round_trip_through_msgpack():
    p = SamplingParams(max_tokens=9, temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                       seed=123, stop=("###", "\n"), stop_token_ids=(5,), ignore_eos=True)
    d = p.to_dict()
    assert isinstance(d["stop"], list) and isinstance(d["stop_token_ids"], list)
    assert SamplingParams.from_dict(d) == p
    assert SamplingParams.from_dict(msgpack.unpackb(msgpack.packb(d))) == p
    assert SamplingParams.from_dict(SamplingParams().to_dict()) == SamplingParams()


# ---------------------------------------------------------------- Sampler helpers


def make_sampler(vocab_size: int, prompt_ids=(), **params) -> Sampler:
    sampler = Sampler(vocab_size, CPU)
    sampler.start_request(SamplingParams(**params), list(prompt_ids))
    return sampler


def draw_counts(sampler: Sampler, logits: torch.Tensor, n: int) -> np.ndarray:
    out = torch.empty(1, dtype=torch.int64)
    counts = np.zeros(logits.shape[0], dtype=np.int64)
    for _ in range(n):
        counts[int(sampler.sample(logits, out=out))] += 1
    return counts


def reference_allowed(logits, temperature, top_k=0, top_p=1.0, min_p=0.0):
    """Independent float64 version of the kept set: (bool mask [V], renormalised probs [V])."""
    x = np.asarray(logits, dtype=np.float64) / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep_sorted = np.ones(len(p), dtype=bool)
    if top_k:
        keep_sorted[top_k:] = False
    ps = np.where(keep_sorted, p[order], 0.0)
    ps /= ps.sum()
    before = np.cumsum(ps) - ps
    if top_p < 1.0:
        keep_sorted &= before < top_p
    keep_sorted &= p[order] >= min_p * p.max()
    keep_sorted[0] = True
    allowed = np.zeros(len(p), dtype=bool)
    allowed[order] = keep_sorted
    q = np.where(allowed, p, 0.0)
    return allowed, q / q.sum()


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    assert expected.min() >= 5, "chi-square needs >= 5 expected draws per cell"
    return float(((counts - expected) ** 2 / expected).sum())


# ---------------------------------------------------------------- Sampler


def test_greedy_is_argmax_for_every_dtype():
    gen = torch.Generator().manual_seed(0)
    # Filters and penalty-free settings must not matter under temperature 0.
    sampler = make_sampler(1000, temperature=0.0, top_k=3, top_p=0.5, min_p=0.3, seed=1)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for _ in range(20):
            logits = (torch.randn(1000, generator=gen) * 3).to(dtype)
            token = sampler.sample(logits)
            assert token.shape == (1,) and token.dtype == torch.int64
            assert int(token) == int(torch.argmax(logits.float()))


def test_sample_writes_into_out_and_checks_shape():
    sampler = make_sampler(16, temperature=0.0)
    out = torch.full((1,), -1, dtype=torch.int64)
    logits = torch.arange(16, dtype=torch.float32)
    assert sampler.sample(logits, out=out) is out and int(out) == 15
    with pytest.raises(ValueError, match="logits"):
        sampler.sample(torch.zeros(1, 16))
    with pytest.raises(ValueError, match="prompt_ids"):
        sampler.start_request(SamplingParams(), [3, 16])


def test_sample_never_reads_tensor_values_on_host(monkeypatch):
    sampler = make_sampler(64, temperature=0.8, top_k=10, top_p=0.9, min_p=0.05, repetition_penalty=1.3,
                           prompt_ids=[1, 2, 3], seed=0)
    logits = torch.randn(64)

    def forbidden(*args, **kwargs):
        raise AssertionError("host read of a tensor value inside the sampling step")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    token = sampler.sample(logits)
    sampler.observe(token)
    monkeypatch.undo()
    assert 0 <= int(token) < 64


@pytest.mark.parametrize(
    "filters",
    [{"top_k": 10}, {"top_p": 0.5}, {"min_p": 0.3}, {"top_k": 16, "top_p": 0.7, "min_p": 0.1}],
    ids=["top_k", "top_p", "min_p", "combined"],
)
def test_filters_never_emit_outside_allowed_set(filters):
    # A flat-ish distribution: each filter keeps 6-11 of 64 tokens, none of them within 1e-3 of a cut.
    logits = torch.randn(64, generator=torch.Generator().manual_seed(7))
    allowed, probs = reference_allowed(logits.numpy(), 1.0, **filters)
    sampler = make_sampler(64, temperature=1.0, seed=11, **filters)
    counts = draw_counts(sampler, logits, 10_000)
    emitted = counts > 0
    assert not (emitted & ~allowed).any(), f"emitted outside the allowed set: {np.flatnonzero(emitted & ~allowed)}"
    # Every allowed token is expected >= 500 times, so all of them must show up.
    assert probs[allowed].min() * 10_000 > 500 and (emitted == allowed).all()


def test_distribution_matches_softmax_chi_square():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 0.8])
    _, probs = reference_allowed(logits.numpy(), 1.0)
    counts = draw_counts(make_sampler(8, temperature=1.0, seed=1234), logits, 20_000)
    # 0.999 quantile of chi-square with 7 degrees of freedom (V - 1).
    assert chi_square(counts, probs) < 24.32


def test_truncated_distribution_is_renormalised_chi_square():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 0.8])
    allowed, probs = reference_allowed(logits.numpy(), 1.5, top_k=4)
    counts = draw_counts(make_sampler(8, temperature=1.5, top_k=4, seed=99), logits, 5_000)
    assert (counts[~allowed] == 0).all()
    # 0.999 quantile of chi-square with 3 degrees of freedom (4 kept tokens - 1).
    assert chi_square(counts[allowed], probs[allowed]) < 16.27


def test_same_seed_same_sequence_different_seed_differs():
    logits = torch.zeros(1000)

    def sequence(seed):
        sampler = make_sampler(1000, temperature=1.0, seed=seed)
        return [int(sampler.sample(logits)) for _ in range(32)]

    assert sequence(5) == sequence(5)
    assert sequence(5) != sequence(6)
    unseeded = make_sampler(1000)
    assert unseeded.seed is not None and unseeded.seed >= 0
    first = [int(unseeded.sample(logits)) for _ in range(32)]
    unseeded.start_request(SamplingParams(), [])
    assert [int(unseeded.sample(logits)) for _ in range(32)] != first


def test_repetition_penalty_changes_argmax():
    logits = torch.tensor([2.0, 1.5, -0.5, -0.2, 0.0])
    # Seen positive logit 2.0 -> 1.0: token 1 (1.5) wins.
    assert int(make_sampler(5, prompt_ids=[0], temperature=0.0, repetition_penalty=2.0).sample(logits)) == 1
    # Penalty 1.0 is off.
    assert int(make_sampler(5, prompt_ids=[0], temperature=0.0, repetition_penalty=1.0).sample(logits)) == 0
    # A negative logit is multiplied (pushed down), never divided towards 0.
    neg = torch.tensor([-1.0, -0.6, -0.5])
    assert int(make_sampler(3, prompt_ids=[2], temperature=0.0, repetition_penalty=1.5).sample(neg)) == 1
    # A penalty < 1 rewards seen tokens.
    assert int(make_sampler(5, prompt_ids=[1], temperature=0.0, repetition_penalty=0.5).sample(logits)) == 1


def test_observe_marks_generated_tokens_and_new_request_resets():
    logits = torch.tensor([2.0, 1.5, 1.0])
    sampler = make_sampler(3, temperature=0.0, repetition_penalty=4.0)
    first = sampler.sample(logits)
    sampler.observe(first)
    second = sampler.sample(logits)
    sampler.observe(second)
    assert (int(first), int(second), int(sampler.sample(logits))) == (0, 1, 2)
    sampler.start_request(SamplingParams(temperature=0.0, repetition_penalty=4.0), [])
    assert int(sampler.sample(logits)) == 0


def test_min_tokens_holds_the_end_tokens_off_for_that_many_draws():
    """The first min_tokens draws can't pick an end token (EOS, stop_token_ids), greedy or sampled; later ones can."""
    logits = torch.zeros(8)
    logits[2], logits[5], logits[3] = 9.0, 8.0, 7.0  # 2 (EOS) best, then 5 (a stop token id), then 3
    for temperature in (0.0, 0.05):
        sampler = Sampler(8, CPU)
        sampler.start_request(SamplingParams(temperature=temperature, min_tokens=2, seed=1), [1], end_ids={2, 5})
        assert sampler.banning
        assert [sampler.sample(logits).item() for _ in range(3)] == [3, 3, 2]
        assert not sampler.banning
        sampler.start_request(SamplingParams(temperature=temperature, min_tokens=2), [1])  # nothing to hold off
        assert not sampler.banning and sampler.sample(logits).item() == 2
