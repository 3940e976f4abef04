"""SamplingParams validation and wire form; Sampler semantics (greedy, filters, distribution, seeds, penalty)."""

from __future__ import annotations

import math
from dataclasses import fields

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
        ("presence_penalty", 2.01), ("presence_penalty", -2.5), ("presence_penalty", math.nan),
        ("presence_penalty", True), ("frequency_penalty", 3.0), ("frequency_penalty", math.inf),
        ("frequency_penalty", "0.5"),
        ("logit_bias", ((1, 101.0),)), ("logit_bias", ((1, -100.5),)), ("logit_bias", ((-1, 1.0),)),
        ("logit_bias", ((1, math.nan),)), ("logit_bias", ((True, 1.0),)), ("logit_bias", ((1, 1.0), (1, 2.0))),
        ("logit_bias", ((1, 1.0, 2.0),)), ("logit_bias", {1: 1.0}),
        ("logit_bias", tuple((i, 1.0) for i in range(1025))),
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
                       presence_penalty=-0.5, frequency_penalty=1.5, logit_bias=((9, -100.0), (2, 3.5)),
                       seed=123, stop=("###", "\n"), stop_token_ids=(5,), ignore_eos=True)
    assert p.logit_bias == ((2, 3.5), (9, -100.0))  # sorted by token id
    d = p.to_dict()
    assert isinstance(d["stop"], list) and isinstance(d["stop_token_ids"], list)
    assert d["logit_bias"] == [[2, 3.5], [9, -100.0]]
    assert SamplingParams.from_dict(d) == p
    assert SamplingParams.from_dict(msgpack.unpackb(msgpack.packb(d))) == p
    assert SamplingParams.from_dict(SamplingParams().to_dict()) == SamplingParams()


def test_params_logit_bias_from_openai_s_map_of_token_id_strings():
    """OpenAI's JSON keys the biases by token-id strings; integers as bias values are stored as floats; a key that
    is not a token id is one clear error; the vocabulary is checked where it is known."""
    p = SamplingParams.from_dict({"logit_bias": {"50256": -100, "7": 2}, "presence_penalty": 1, "frequency_penalty": 0})
    assert p.logit_bias == ((7, 2.0), (50256, -100.0)) and p.presence_penalty == 1.0 and p.counts_tokens
    assert not SamplingParams(frequency_penalty=0.0, presence_penalty=0.0).counts_tokens
    assert SamplingParams(frequency_penalty=-2.0).counts_tokens
    for key in ("a", "-3", "1.5", " 3", "\u0663"):  # the last: an Arabic-Indic digit, isdigit() but not a token id
        with pytest.raises(ValueError, match="logit_bias keys must be token ids"):
            SamplingParams.from_dict({"logit_bias": {key: 1.0}})
    p.check_vocabulary(50257)
    with pytest.raises(ValueError, match=r"logit_bias token ids must be in \[0, 50000\).*\[50256\]"):
        p.check_vocabulary(50000)


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


def reference_processed(logits: torch.Tensor, prompt: list[int], reply: list[int], repetition: float, presence: float,
                        frequency: float, bias: dict[int, float]) -> torch.Tensor:
    """float64 logits after the logit bias, the repetition penalty over prompt + reply, then the frequency and
    presence penalties over the reply (vLLM's order and rules), written out per token."""
    x = logits.double().tolist()
    for t, b in bias.items():
        x[t] += b
    for t in set(prompt) | set(reply):
        x[t] = x[t] / repetition if x[t] > 0 else x[t] * repetition
    for t in set(reply):
        x[t] -= frequency * reply.count(t) + presence
    return torch.tensor(x, dtype=torch.float64)


@pytest.mark.parametrize("repetition,presence,frequency,bias", [
    (1.0, 0.8, 0.0, {}), (1.0, 0.0, 0.6, {}), (1.0, -1.0, 0.4, {}), (1.0, 0.0, 0.0, {3: 2.5, 11: -4.0}),
    (1.4, 0.5, 0.3, {0: 1.0, 29: -100.0}),
])
def test_penalties_and_bias_give_the_float64_reference_s_greedy_tokens(repetition, presence, frequency, bias):
    """Fresh random logits each step: the greedy token is the argmax of the float64 reference over the prompt and the
    tokens drawn so far, and the sampled path's penalized logits (filtered_probs over penalized_rows with no
    proposals) match it within float32 rounding; a new request starts with no counts."""
    vocab, prompt = 30, [1, 2, 3]
    gen = torch.Generator().manual_seed(7)
    params = SamplingParams(temperature=0.0, repetition_penalty=repetition, presence_penalty=presence,
                            frequency_penalty=frequency, logit_bias=tuple(bias.items()))
    sampler = make_sampler(vocab, prompt, **{f.name: getattr(params, f.name) for f in fields(params)})
    assert not sampler.plain_greedy
    reply: list[int] = []
    for step in range(40):
        logits = torch.randn(vocab, generator=gen) * 2
        want = reference_processed(logits, prompt, reply, repetition, presence, frequency, bias)
        rows = sampler.penalized_rows(logits.view(1, -1), torch.empty(0, dtype=torch.int64))
        assert torch.allclose(rows[0].double(), want, rtol=1e-6, atol=1e-5), step
        token = sampler.sample(logits)
        assert int(token) == int(torch.argmax(want)), step
        sampler.observe(token)
        reply.append(int(token))
    if presence or frequency:
        assert len(set(reply)) > 1  # the penalties moved the argmax off a repeat at least once
    sampler.start_request(SamplingParams(temperature=0.0), prompt)  # no penalty, no bias: the raw argmax
    logits = torch.randn(vocab, generator=gen)
    assert sampler.plain_greedy and int(sampler.sample(logits)) == int(torch.argmax(logits))


def test_a_logit_bias_of_100_makes_a_token_the_greedy_choice_and_minus_100_bans_it():
    logits = torch.tensor([5.0, 1.0, -3.0, 4.0])
    assert int(make_sampler(4, temperature=0.0, logit_bias=((2, 100.0),)).sample(logits)) == 2
    assert int(make_sampler(4, temperature=0.0, logit_bias=((0, -100.0),)).sample(logits)) == 3
    counts = draw_counts(make_sampler(4, temperature=1.0, seed=1, logit_bias=((0, -100.0), (3, -100.0))), logits, 400)
    assert counts[0] == counts[3] == 0 and counts[1] > 0


@pytest.mark.cuda
def test_on_a_gpu_penalties_bias_and_logprobs_draw_as_on_the_cpu():
    """The device tensors' writes (the logit bias's index_put_ from the host, the counts' index_add_) and the
    draws on a GPU: the same greedy tokens and log-probabilities as the CPU sampler's over the same logits."""
    vocab = 300
    params = SamplingParams(temperature=0.0, repetition_penalty=1.2, presence_penalty=0.4, frequency_penalty=0.3,
                            logit_bias=((5, 3.0), (299, -100.0)), logprobs=4)
    samplers = {d: Sampler(vocab, torch.device(d)) for d in ("cpu", "cuda")}
    for s in samplers.values():
        s.start_request(params, [1, 2, 3])
    gen = torch.Generator().manual_seed(4)
    for step in range(20):
        logits = torch.randn(vocab, generator=gen) * 2
        tokens = {d: s.sample(logits.to(d)) for d, s in samplers.items()}
        assert int(tokens["cpu"]) == int(tokens["cuda"]), step
        assert torch.allclose(samplers["cpu"].last_logprobs, samplers["cuda"].last_logprobs.cpu(), atol=1e-5)
        for d, s in samplers.items():
            s.observe(tokens[d])


def test_observe_ids_counts_every_occurrence_for_the_frequency_penalty():
    """Accepted proposals (observe_ids, speculation) count as draws do: twice the same token, twice the penalty."""
    logits = torch.tensor([3.0, 2.5, 0.0])
    sampler = make_sampler(3, temperature=0.0, frequency_penalty=0.3)
    sampler.observe_ids([0])
    assert int(sampler.sample(logits)) == 0  # 2.7 against 2.5
    sampler.observe_ids([0])
    assert int(sampler.sample(logits)) == 1  # 2.4 against 2.5


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_the_start_up_warm_up_runs_every_sampling_path_including_the_api_extras(device):
    """sampler.warm_up's paths (greedy, penalties, filters, the OpenAI penalties, logit bias and logprobs through
    the token reader's extra values) run over a vocabulary and leave the executor's logits as they were."""
    from jit_context import sampler as sampling

    logits = torch.randn(70, device=device)  # [V]
    before = logits.clone()
    # three draws a path; logprobs=2 reads back 1 + 2 x 2 values a token, logprobs=0 one
    assert sampling.run_every_path(logits) == [0] * 9 + [5] * 3 + [1] * 3
    sampling.warm_up(logits)  # a no-op on the CPU; on a GPU the same paths, then a synchronize
    assert torch.equal(logits, before)
