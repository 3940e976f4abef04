"""Speculative decoding (issue 11): the n-gram proposer, adaptive k, acceptance on the device (greedy: the same
tokens as plain decoding; sampled: the same distribution, by a chi-square test), the verify step against the
model's own decode steps, and whole requests with speculation on and off: the same tokens, with max_tokens, stop
tokens, EOS and the end of the context cutting exactly where plain decoding cuts."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # the fused verify step's Triton kernels run under the interpreter here
    os.environ.setdefault("TRITON_INTERPRET", "1")

from graph_executor.runner import ModelRunner
from ipc.errors import HybridrtError
from jit_context.acceptance import accept
from jit_context.generator import GenerationResult, Generator
from jit_context.proposers import NgramProposer
from jit_context.sampler import Sampler
from jit_context.sampling_params import SamplingParams
from jit_context.speculative import AdaptiveK
from jit_context.speculative_config import SpeculativeConfig, with_draft_cost
from tests.test_decode_ahead import RecordingPort
from tests.test_robustness import tiny_runner

PROMPTS = json.loads((Path(__file__).resolve().parents[1] / "bench/data/spec_prompts.json").read_text())
CPU = torch.device("cpu")


# -- the n-gram proposer ---------------------------------------------------------------------------------


def test_ngram_proposes_what_followed_the_longest_most_recent_match_with_k_tokens_after_it() -> None:
    p = NgramProposer(2, 3)
    p.reset([1, 2, 3, 4, 9, 2, 3, 5, 7, 2, 3])
    assert p.propose(3) == [5, 7, 2]  # "2 3" last occurred before "5 7" (the later occurrence wins)
    p.extend([5])
    assert p.propose(2) == [7, 2]  # "2 3 5" (3 tokens) beats "3 5"
    p.reset([1, 2, 3, 1, 2, 3, 4, 1, 2])  # "1 2" occurred twice: the most recent one proposes...
    assert p.propose(8) == [3, 4, 1, 2]  # ...at most what follows, up to the end of the sequence, when none has 8
    assert p.propose(5) == [3, 1, 2, 3, 4]  # the most recent one with 5 tokens after it: the first
    assert p.propose(4) == [3, 4, 1, 2]  # the most recent one has 4
    p.reset([5, 6, 7, 8])
    assert p.propose(4) == []  # no earlier occurrence of any suffix
    p.reset([5, 6, 5, 6])
    assert p.propose(0) == [] and p.propose(1) == [5]


@pytest.mark.parametrize("prepared", [False, True])
def test_ngram_index_matches_a_brute_force_search(prepared) -> None:
    """Every proposal equals a brute-force search of the sequence, with the prompt indexed up front (`prepare`, as
    the speculative loop does while the prefill runs) or on the first proposal."""
    gen = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 5, (300,), generator=gen).tolist()
    p = NgramProposer(2, 4)
    p.reset(seq[:60])
    if prepared:
        p.prepare()
        p.prepare()  # idempotent
    for i in range(60, len(seq)):
        got = p.propose(3)
        want = []
        for n in range(4, 1, -1):
            suffix = seq[i - n:i]
            ends = [j for j in range(n - 1, i - 1) if seq[j - n + 1:j + 1] == suffix]
            if ends:
                full = [j for j in ends if j + 3 < i]  # with the 3 tokens asked for after it
                end = full[-1] if full else ends[-1]
                want = seq[end + 1:min(end + 4, i)]  # what followed, as far as the sequence goes
                break
        assert got == want, i
        p.extend([seq[i]])


def test_ngram_sizes_are_checked() -> None:
    with pytest.raises(ValueError, match="n-gram sizes"):
        NgramProposer(3, 2)
    with pytest.raises(ValueError, match="num_speculative_tokens must be in 1..8"):
        SpeculativeConfig("ngram", 9)
    with pytest.raises(ValueError, match="one of off, ngram"):
        SpeculativeConfig("medusa")


def test_adaptive_k_follows_the_acceptance_rate_and_pauses_with_back_off() -> None:
    k = AdaptiveK(SpeculativeConfig("ngram", 8))
    for _ in range(10):
        k.update(4, 4, 100)
    assert k.k() == 8  # everything accepted: the most proposals
    for _ in range(10):
        k.update(4, 0, 200)
        if not k.allowed(200):
            break
    assert not k.allowed(200) and k.allowed(200 + AdaptiveK.BACKOFF_MIN)  # paused for a back-off
    for _ in range(10):  # failing again after the pause: the next pause is twice as long
        k.update(2, 0, 300)
        if not k.allowed(300):
            break
    assert not k.allowed(300 + AdaptiveK.BACKOFF_MIN) and k.allowed(300 + 2 * AdaptiveK.BACKOFF_MIN)
    k.update(2, 2, 400)
    assert k.backoff == AdaptiveK.BACKOFF_MIN  # an acceptance resets the back-off
    fixed = AdaptiveK(SpeculativeConfig("ngram", 5, adaptive=False))
    for _ in range(20):
        fixed.update(4, 0, 100)
    assert fixed.k() == 5 and fixed.allowed(100)  # --no-adaptive-k: always the most, never a pause


# -- acceptance ------------------------------------------------------------------------------------------


def sampler_for(vocab: int, params: SamplingParams, seen: list[int] = ()) -> Sampler:
    s = Sampler(vocab, CPU)
    s.start_request(params, list(seen))
    return s


def test_greedy_acceptance_keeps_the_prefix_that_matches_the_argmax() -> None:
    vocab = 10
    logits = torch.full((4, vocab), -1.0)
    for row, best in enumerate([3, 5, 6, 9]):
        logits[row, best] = 2.0
    s = sampler_for(vocab, SamplingParams(temperature=0.0))
    for proposals, accepted, tokens in (([3, 5, 6], 3, [3, 5, 6, 9]), ([3, 5, 1], 2, [3, 5, 6]),
                                        ([4, 5, 6], 0, [3]), ([3, 1, 6], 1, [3, 5])):
        out = accept(s, logits, torch.tensor(proposals)).tolist()
        assert out[-1] == accepted and out[:accepted + 1] == tokens


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, repetition_penalty=1.7),
    SamplingParams(temperature=0.0, presence_penalty=0.9, frequency_penalty=0.4),
    SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=-0.7, logit_bias=((4, 3.0), (0, -2.0))),
], ids=["repetition", "presence-frequency", "all-with-bias"])
def test_penalized_rows_apply_the_penalty_as_a_token_by_token_run_would(params: SamplingParams) -> None:
    """Row j of a verify step's logits, processed as the sampler's own draw would process it after proposals[:j]
    were drawn (a token proposed twice counts twice for the frequency penalty)."""
    vocab = 12
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, vocab, generator=gen) * 3
    proposals = [4, 7, 4]
    s = sampler_for(vocab, params, seen=[1, 2])
    s.observe(torch.tensor([7]))  # a token of the reply before this step
    rows = s.penalized_rows(logits, torch.tensor(proposals))
    reply = [7]
    for j in range(4):
        x = logits[j].double().tolist()
        for t, b in params.logit_bias:
            x[t] += b
        for t in {1, 2, *reply}:
            x[t] = x[t] / params.repetition_penalty if x[t] > 0 else x[t] * params.repetition_penalty
        for t in set(reply):
            x[t] -= params.frequency_penalty * reply.count(t) + params.presence_penalty
        assert torch.allclose(rows[j].double(), torch.tensor(x, dtype=torch.float64), rtol=1e-6, atol=1e-5), j
        if j < 3:
            reply.append(proposals[j])


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over the cells with an expected count >= 5, and its degrees of freedom."""
    n = counts.sum()
    expected = probs * n
    cells = expected >= 5
    assert counts[~cells].sum() <= 0.01 * n  # nothing lands where the target puts (almost) no mass
    stat = float(((counts[cells] - expected[cells]) ** 2 / expected[cells]).sum())
    return stat, int(cells.sum()) - 1


CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}  # chi-square quantiles at p = 0.999


@pytest.mark.parametrize("soft_q", [False, True], ids=["one-hot q (n-gram)", "soft q (draft)"])
def test_rejection_sampling_keeps_the_target_distribution(soft_q: bool) -> None:
    """The first token out of a verify step (an accepted proposal or the added one) is distributed as the
    target's filtered distribution p_0 however the proposals are drawn; the second, given the first proposal was
    kept, as p_1. Proposals come from q (soft) or are fixed (one-hot q, as n-gram proposals)."""
    vocab, k, trials = 8, 2, 6000
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(k + 1, vocab, generator=gen) * 1.5
    params = SamplingParams(temperature=0.8, top_k=6, top_p=0.95, seed=11)
    s = sampler_for(vocab, params)
    fixed = torch.tensor([int(torch.argsort(logits[0])[-2]), int(torch.argmax(logits[1]))])  # plausible, not top
    q = torch.softmax(torch.randn(k, vocab, generator=gen), -1)
    first = torch.zeros(vocab)
    second = torch.zeros(vocab)
    for _ in range(trials):
        if soft_q:
            proposals = torch.multinomial(q, 1, generator=gen).view(-1)
            out = accept(s, logits, proposals, q)
        else:
            proposals = fixed
            out = accept(s, logits, proposals)
        first[int(out[0])] += 1
        if int(out[-1]) >= 1 and not soft_q:
            second[int(out[1])] += 1
    p = s.filtered_probs(s.penalized_rows(logits, fixed))
    stat, df = chi_square(first, p[0])
    assert stat < CHI2_999[df], (stat, df, first, p[0] * trials)
    if not soft_q:
        stat, df = chi_square(second, p[1])
        assert stat < CHI2_999[df], (stat, df, second, p[1] * second.sum())


def test_filtered_probs_is_what_sample_draws_from() -> None:
    vocab = 6
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    params = SamplingParams(temperature=0.7, top_k=4, top_p=0.9, min_p=0.05, seed=5)
    s = sampler_for(vocab, params)
    p = s.filtered_probs(logits.view(1, -1))[0]
    counts = torch.zeros(vocab)
    for _ in range(4000):
        counts[int(s.sample(logits))] += 1
    stat, df = chi_square(counts, p)
    assert stat < CHI2_999[df], (counts, p * 4000)
    assert p[4] == 0 and p[5] == 0 and math.isclose(float(p.sum()), 1.0, rel_tol=1e-6)


# -- the verify step and whole requests on a tiny model ---------------------------------------------------


def test_verify_step_gives_the_decode_steps_logits() -> None:
    runner = tiny_runner(max_context=64)
    ids = torch.randint(3, 300, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    b = runner.buffers
    b.input_ids[:20].copy_(torch.tensor(ids))
    runner.prefill(15)
    runner.verify(14, 6)  # token 14 again (its K/V rewritten identically), then 15..19
    verify = b.verify_logits[:6].clone()
    for pos in range(14, 20):
        b.next_token.fill_(ids[pos])
        runner.decode(pos)
        assert torch.allclose(b.logits, verify[pos - 14], atol=1e-5, rtol=1e-4), pos
    with pytest.raises(ValueError, match="1..9 tokens"):
        runner.verify(0, 10)
    with pytest.raises(ValueError, match="do not fit the context"):
        runner.verify(60, 5)


def test_fused_verify_step_equals_the_reference_step() -> None:
    """The GPU path's verify body (FusedVerify: row kernels, the multi-query decode attention, cuBLAS or torch.mm)
    against the model's reference step, every logit; on the CPU its Triton kernels run under the interpreter, on a
    GPU machine (where the interpreter is off) the model is on the GPU."""
    from graph_executor.fused_verify import DEFAULT_ROWS_PLAN, SMALL_ROWS_PLAN, FusedVerify, verify_plan_for

    runner = tiny_runner(max_context=64, device="cuda" if torch.cuda.is_available() else "cpu")
    device = runner.buffers.input_ids.device
    ids = torch.randint(3, 300, (30,), generator=torch.Generator().manual_seed(2)).to(device)
    b = runner.buffers
    b.input_ids[:30].copy_(ids)
    runner.prefill(20)
    runner.verify(19, 9)
    reference = b.verify_logits[:9].clone()
    assert verify_plan_for(runner.model.config.hidden_size) == SMALL_ROWS_PLAN and verify_plan_for(4096) == \
        DEFAULT_ROWS_PLAN
    for plan in (None, DEFAULT_ROWS_PLAN):  # this small model's plan (every projection on the rows), then cuBLAS
        runner.prefill(20)  # the cache as before the verify
        out = torch.full((9, 300), float("nan"), device=device)
        FusedVerify(runner.model, 9, plan).run(ids[19:28].clone(), torch.arange(19, 28, device=device), out)
        assert float((out - reference).norm() / reference.norm()) < 1e-5, plan
    # every dense projection through the multi-row GEMVs, K split over programs (RMSNorm, SwiGLU and the residual
    # fused): the candidate plan of `bench.probes.verify_plan`
    from graph_executor.fused_verify import RowsPlan
    from graph_executor.kernels.gemv_rows import RowsConfig

    split = RowsConfig(16, 16, 2, 1, split=3)
    runner.prefill(20)
    rows = torch.full((9, 300), float("nan"), device=device)
    FusedVerify(runner.model, 9, RowsPlan(gate_up=split, lm_head=split, o=split, qkv=split, down=split)).run(
        ids[19:28].clone(), torch.arange(19, 28, device=device), rows)
    assert float((rows - reference).norm() / reference.norm()) < 1e-5


def run(runner: ModelRunner, prompt: list[int], params: SamplingParams, spec: SpeculativeConfig | None = None,
        eos: frozenset[int] = frozenset({2}), ahead: int | str | None = None,
        executor_argmax: bool | None = None) -> GenerationResult:
    return list(Generator(runner, None, eos, speculation=spec, decode_ahead=ahead, executor_argmax=executor_argmax)
                .generate(prompt, params))[-1]


REPETITIVE = [5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 8, 9, 10, 11, 5, 6, 7]


def draft_port(runner: ModelRunner, seed: int):
    """The runner with a draft model of the same tiny shape: the same weights (seed 3, as tiny_runner's: every
    proposal right) or others (every proposal a guess)."""
    from graph_executor.draft import DraftingRunner, DraftProposer
    from graph_executor.loading.loader import _fill_random

    draft = tiny_runner(runner.max_context).model
    if seed != 3:
        _fill_random(draft, seed=seed)
    return DraftingRunner(runner, DraftProposer(draft, runner.buffers.input_ids))


def spec_run(runner: ModelRunner, prompt: list[int], params: SamplingParams, method: str, k: int,
             draft_seed: int = 3, eos: frozenset[int] = frozenset({2}), ahead: int | str | None = None,
             executor_argmax: bool | None = None) -> GenerationResult:
    if method == "ngram":
        return run(runner, prompt, params, SpeculativeConfig("ngram", k), eos, ahead, executor_argmax)
    config = with_draft_cost(SpeculativeConfig("draft", k, adaptive=False), 10, 1)  # always k: the CPU's costs
    # would rightly stop a draft costing a tenth of the model at small k
    return list(Generator(draft_port(runner, draft_seed), None, eos, speculation=config, decode_ahead=ahead,
                          executor_argmax=executor_argmax).generate(prompt, params))[-1]


@pytest.mark.parametrize("method", ["ngram", "draft"])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_greedy_output_is_identical_with_speculation(method: str, k: int) -> None:
    runner = tiny_runner(max_context=160)
    params = SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True)
    base = run(runner, REPETITIVE, params)
    res = spec_run(runner, REPETITIVE, params, method, k)
    assert res.token_ids == base.token_ids
    assert res.speculation["num_accepted_tokens"] > 10  # it did speculate
    assert res.finish_reason == base.finish_reason == "length" and len(res.token_ids) == 80
    if method == "draft":  # the draft has the target's weights: it proposes what the target picks
        assert res.speculation["acceptance_rate"] > 0.95, res.speculation


def test_a_draft_that_guesses_wrong_changes_no_token() -> None:
    runner = tiny_runner(max_context=160)
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    base = run(runner, REPETITIVE, params)
    res = spec_run(runner, REPETITIVE, params, "draft", 4, draft_seed=11)
    assert res.token_ids == base.token_ids and res.speculation["num_drafts"] > 0


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_min_tokens_holds_off_the_end_with_speculation_as_without(method: str) -> None:
    """Before min_tokens the loop decodes plainly (only the sampler's draw can hold the end tokens off); after it,
    it speculates again: the same tokens as without speculation."""
    runner = tiny_runner(max_context=160)
    base = run(runner, REPETITIVE, SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True))
    stop = base.token_ids[3]  # an end token that greedy decoding picks early and often
    params = SamplingParams(max_tokens=60, temperature=0.0, stop_token_ids=(stop,), min_tokens=30)
    plain = run(runner, REPETITIVE, params)
    res = spec_run(runner, REPETITIVE, params, method, 6)
    assert res.token_ids == plain.token_ids and len(plain.token_ids) > 30 and stop not in plain.token_ids[:30]
    assert res.speculation["num_drafts"] > 0  # after min_tokens


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_stops_cut_inside_an_accepted_run_exactly_where_plain_decoding_cuts(method: str) -> None:
    runner = tiny_runner(max_context=160)
    base = run(runner, REPETITIVE, SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True))
    for stop in sorted(set(base.token_ids[5:40])):  # stop tokens and EOS that first appear at many offsets
        cut = base.token_ids.index(stop) + 1
        for params, eos in ((SamplingParams(max_tokens=60, temperature=0.0, stop_token_ids=(stop,)), {2}),
                            (SamplingParams(max_tokens=60, temperature=0.0), {stop})):
            res = spec_run(runner, REPETITIVE, params, method, 6, eos=frozenset(eos))
            assert res.token_ids == base.token_ids[:cut] and res.finish_reason == "stop", stop
    for max_tokens in range(1, 30, 3):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        res = spec_run(runner, REPETITIVE, params, method, 6)
        assert res.token_ids == base.token_ids[:max_tokens] and res.finish_reason == "length"


@pytest.mark.parametrize("method", ["ngram", "draft"])
@pytest.mark.parametrize("ahead, executor_argmax", [(2, False), (3, False), ("auto", False), (1, True), (2, True),
                                                    (3, True)])
def test_plain_steps_further_ahead_keep_the_tokens_stops_and_ends(method: str, ahead: int | str,
                                                                  executor_argmax: bool) -> None:
    """Generator(decode_ahead=) in the speculative loop's plain steps (2 on a GPU), with the executor taking their
    tokens (`executor_argmax`, on a GPU) or not: the same tokens as the plain loop one step ahead, through verify
    steps, drains, stops at many offsets, max_tokens and the context's end."""
    runner = tiny_runner(max_context=160)
    params = SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True)
    base = run(runner, REPETITIVE, params, ahead=1, executor_argmax=False)
    flags = dict(ahead=ahead, executor_argmax=executor_argmax)
    res = spec_run(runner, REPETITIVE, params, method, 3, **flags)
    assert res.token_ids == base.token_ids and res.speculation["num_accepted_tokens"] > 10
    for stop in sorted(set(base.token_ids[5:40]))[::3]:
        cut = base.token_ids.index(stop) + 1
        res = spec_run(runner, REPETITIVE, SamplingParams(max_tokens=60, temperature=0.0), method, 6,
                       eos=frozenset({stop}), **flags)
        assert res.token_ids == base.token_ids[:cut] and res.finish_reason == "stop", stop
    for max_tokens in range(1, 30, 4):
        port = RecordingPort(runner)  # under the draft model's runner too (draft_port wraps it)
        res = spec_run(port, REPETITIVE, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                       method, 6, **flags)
        assert res.token_ids == base.token_ids[:max_tokens] and res.finish_reason == "length"
        assert port.sent or max_tokens == 1 or method == "draft"  # (a right draft may leave no plain step)
        # no decode consumes the last token (its position would be len(REPETITIVE) + max_tokens - 1)
        assert max((p for p, _, _ in port.sent), default=0) <= len(REPETITIVE) + max_tokens - 2
        # every decode is an argmax one exactly when the executor takes the tokens; own_input only right after one
        assert all(argmax == executor_argmax for _, argmax, _ in port.sent)
        for (p0, a0, _), (p1, _, own) in zip(port.sent, port.sent[1:]):
            assert not own or (a0 and p1 == p0 + 1), port.sent
        assert not port.sent or not port.sent[0][2]
    short = tiny_runner(max_context=41)
    res = spec_run(short, REPETITIVE, params, method, 8, **flags)
    assert res.token_ids == run(short, REPETITIVE, params, ahead=1, executor_argmax=False).token_ids \
        and len(res.token_ids) == 41 - 17


def test_speculation_s_plain_steps_take_the_executor_s_tokens_only_for_plain_greedy_requests() -> None:
    """With executor_argmax, a plain greedy request's plain steps are argmax decodes (own_input after the first of
    each run); a sampled or penalized one's are not, and still give their seeded/penalized tokens."""
    runner = tiny_runner(max_context=160)
    for params, argmax in ((SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True), True),
                           (SamplingParams(max_tokens=40, temperature=0.7, seed=5, ignore_eos=True), False),
                           (SamplingParams(max_tokens=40, temperature=0.0, repetition_penalty=1.3, ignore_eos=True),
                            False),
                           (SamplingParams(max_tokens=40, temperature=0.0, presence_penalty=0.3, frequency_penalty=0.2,
                                           logit_bias=((7, 1.0),), ignore_eos=True), False)):
        port = RecordingPort(runner)
        res = run(port, REPETITIVE, params, SpeculativeConfig("ngram", 3), ahead=2, executor_argmax=True)
        want = run(runner, REPETITIVE, params, SpeculativeConfig("ngram", 3), ahead=2, executor_argmax=False)
        assert res.token_ids == want.token_ids and port.sent, params
        assert all(a == argmax for _, a, _ in port.sent) and any(own for _, _, own in port.sent) == argmax, params


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_the_context_ends_inside_a_run_as_without_speculation(method: str) -> None:
    for context in (40, 41, 45):
        runner = tiny_runner(max_context=context)
        params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
        base = run(runner, REPETITIVE, params)
        res = spec_run(runner, REPETITIVE, params, method, 8)
        assert res.token_ids == base.token_ids and len(res.token_ids) == context - len(REPETITIVE)


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_sampled_requests_speculate_reproducibly_with_a_seed(method: str) -> None:
    runner = tiny_runner(max_context=160)
    params = SamplingParams(max_tokens=60, temperature=0.01, top_k=20, seed=9, ignore_eos=True)
    a, b = (spec_run(runner, REPETITIVE, params, method, 4) for _ in range(2))
    assert a.token_ids == b.token_ids and len(a.token_ids) == 60
    assert a.speculation["num_drafts"] > 0 and all(0 <= t < 300 for t in a.token_ids)


def test_draft_configuration_errors_are_one_line() -> None:
    with pytest.raises(ValueError, match="needs a draft model"):
        with_draft_cost(SpeculativeConfig("draft"), 100, 0)
    with pytest.raises(ValueError, match="not draft"):
        with_draft_cost(SpeculativeConfig("ngram"), 100, 10)
    assert with_draft_cost(SpeculativeConfig("draft"), 100, 10).draft_cost == 0.1
    with pytest.raises(HybridrtError, match="has no draft model"):
        from graph_executor.draft import DraftingRunner

        DraftingRunner(tiny_runner()).verify(3, 2, draft_start=0)


# -- real weights ----------------------------------------------------------------------------------------


def test_smollm2_greedy_tokens_are_identical_with_ngram_speculation(cpu_engine) -> None:
    """SmolLM2-135M real weights (CPU, float32): the input-grounded prompts of the bench, speculation on and
    off, the same tokens; speculation accepts proposals on them (the GPU test runs all 8 x 128 tokens)."""
    from launch.local import PromptInput

    spec = Generator(cpu_engine.runner, cpu_engine.tokenizer, cpu_engine.generator.eos_token_ids,
                     speculation=SpeculativeConfig("ngram", 4))
    params = SamplingParams(max_tokens=20, temperature=0.0)
    accepted = 0
    for prompt in PROMPTS["grounded"][1:3]:
        ids = cpu_engine.prompt_ids(PromptInput(messages=[{"role": "user", "content": prompt}]))
        base = list(cpu_engine.generator.generate(ids, params))[-1]
        res = list(spec.generate(ids, params))[-1]
        assert res.token_ids == base.token_ids and res.text == base.text
        accepted += res.speculation["num_accepted_tokens"]
    assert accepted >= 8


def test_a_speculating_server_streams_the_plain_tokens_and_counts_acceptance(shared_server, cpu_engine) -> None:
    """The shared server speculates (n-gram): real processes, the Verify step over the control channel and the
    shared verify-logits buffer. Its tokens equal an in-process run without speculation; each accepted token is
    its own chunk; /metrics carries vLLM's spec_decode counters."""
    import httpx

    from launch.client import Client
    from launch.local import PromptInput

    messages = [{"role": "user", "content": PROMPTS["grounded"][1]}]
    params = SamplingParams(max_tokens=24, temperature=0.0)
    base = list(cpu_engine.generator.generate(cpu_engine.prompt_ids(PromptInput(messages=messages)), params))[-1]
    with Client(shared_server.address) as client:
        chunks = list(client.generate(messages=messages, params=params))
    final = chunks[-1]
    assert final.token_ids == base.token_ids and final.text == base.text
    streamed = [t for c in chunks[:-1] for t in c.token_ids]
    assert streamed == base.token_ids and all(len(c.token_ids) <= 1 for c in chunks[:-1])
    spec = final.timings["speculation"]
    assert spec["num_accepted_tokens"] > 0, spec
    metrics = httpx.get(f"{shared_server.http}/metrics", timeout=30).text
    accepted = next(line for line in metrics.splitlines()
                    if line.startswith("hybridrt:spec_decode_num_accepted_tokens_total"))
    assert int(accepted.rsplit(" ", 1)[1]) >= spec["num_accepted_tokens"]


# -- GPU: verify graphs, and SmolLM2 real weights through them ------------------------------------------------


def decode_logits(runner, prompt: list[int], tokens: list[int]) -> list[torch.Tensor]:
    """Logits after the prompt's last token and after each of `tokens`, by prefill + decode steps."""
    b = runner.buffers
    b.input_ids[:len(prompt)].copy_(torch.tensor(prompt))
    runner.prefill(len(prompt))
    out = [b.logits.clone()]
    for i, t in enumerate(tokens[:-1]):
        b.next_token.fill_(t)
        runner.decode(len(prompt) + i)
        out.append(b.logits.clone())
    return out


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,quantize,tol", [("float32", None, 1e-4), ("float16", None, 1e-2),
                                                ("float16", "int4", 2e-2)])
def test_verify_graphs_give_the_decode_steps_logits(dtype: str, quantize: str | None, tol: float) -> None:
    """Every verify graph (2..9 tokens), replayed at a position inside a prompt's continuation, gives the logits
    of the decode graph at each of its positions (one row per token), over dense and packed weights."""
    from graph_executor.graphs import GraphRunner
    from graph_executor.loading.loader import LoadConfig, load_model

    loaded = load_model(LoadConfig(model="dummy:smollm2-135m", device="cuda", dtype=dtype, max_context=512,
                                   quantize=quantize, progress=False))
    graphs = GraphRunner(loaded.model)
    graphs.capture_all()
    assert {f"verify_{n}" for n in range(2, 10)} <= set(graphs.graphs)
    gen = torch.Generator().manual_seed(4)
    prompt = torch.randint(100, 40000, (100,), generator=gen).tolist()
    tokens = torch.randint(100, 40000, (20,), generator=gen).tolist()
    reference = decode_logits(graphs, prompt, tokens)  # [21] rows: after prompt[-1], tokens[0], ...
    b = graphs.buffers
    seq = prompt + tokens
    for n in range(2, 10):
        position = len(prompt) - 1 + n  # the verify starts after a few decoded tokens; earlier KV is valid
        b.input_ids[:len(seq)].copy_(torch.tensor(seq))
        graphs.verify(position, n)
        for row in range(n):
            want = reference[position - len(prompt) + 1 + row]
            err = float((b.verify_logits[row].double() - want.double()).norm() / want.double().norm())
            assert err < tol, (n, row, err)
    # Verify.accept: the ids sent with the step, the greedy acceptance; eager (before capture), then as graphs.
    sampler = Sampler(loaded.model.config.vocab_size, torch.device("cuda"))
    sampler.start_request(SamplingParams(temperature=0.0), prompt)
    verify_graphs = {name: graphs.graphs.pop(name) for name in list(graphs.graphs) if name.startswith("verify_")}
    for captured in (False, True):
        for n in range(2, 10):
            position = len(prompt) - 1 + n
            b.input_ids.zero_()
            ids = seq[position:position + n - 2] + [7, 8]  # the last two proposals surely wrong
            graphs.verify(position, n, tokens=ids, accept=True)
            got = graphs.wait_accepted()
            assert b.input_ids[position:position + n].tolist() == ids
            want = accept(sampler, b.verify_logits[:n], b.input_ids[position + 1:position + n]).tolist()
            assert got == want and b.next_token.tolist() == [want[want[-1]]], (captured, n, got, want)
        graphs.graphs.update(verify_graphs)


@pytest.mark.cuda
def test_smollm2_on_gpu_greedy_8_prompts_x_128_tokens_identical_with_speculation(smollm2_real) -> None:
    """The issue's check on the GPU path (graphs for decode and verify), float32 so that no argmax is a rounding
    tie between the two step shapes: 8 input-grounded prompts x 128 tokens, speculation on and off."""
    from graph_executor.loading.loader import LoadConfig
    from launch.local import LocalEngine, PromptInput

    gguf, tokenizer = smollm2_real
    engine = LocalEngine(LoadConfig(model=gguf, device="cuda", dtype="float32", max_context=1024, dequantize=True,
                                    progress=False), tokenizer)
    spec = Generator(engine.runner, engine.tokenizer, engine.generator.eos_token_ids,
                     speculation=SpeculativeConfig("ngram", 8))
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    accepted = 0
    for prompt in PROMPTS["grounded"]:
        ids = engine.prompt_ids(PromptInput(messages=[{"role": "user", "content": prompt}]))
        base = list(engine.generator.generate(ids, params))[-1]
        res = list(spec.generate(ids, params))[-1]
        assert res.token_ids == base.token_ids and len(res.token_ids) == 128
        accepted += res.speculation["num_accepted_tokens"]
    assert accepted > 8 * 16


# -- the bench's speculative workloads --------------------------------------------------------------------


def test_break_even_acceptance_solves_the_expected_tokens() -> None:
    from bench.engines.executor import break_even

    assert break_even(0.9, 4) == 0.0 and break_even(5.0, 4) is None
    a = break_even(1.15, 4)
    assert abs(sum(a ** i for i in range(5)) - 1.15) < 1e-3


def test_speculative_workload_runs_the_shipped_prompts_and_compares_runs(default_model_dir) -> None:
    """The bench's workload in-process (the executor engine, CPU, a few tokens per prompt): every prompt runs,
    the summary adds up, and the side-by-side table counts prompts whose tokens match the run without it."""
    from bench.engines.executor import ExecutorEngine
    from bench.procinfo import Timeline
    from bench.report import speculative_table
    from bench.resolve import BenchOptions, resolve_spec
    from bench.workloads import speculative

    spec = resolve_spec(BenchOptions(model="smollm2-135m-instruct", device="cpu", engines="hybridrt-executor",
                                     workloads="speculative", spec_tokens=3, speculative="ngram"))
    engine = ExecutorEngine(spec, Timeline(0.0))
    try:
        result = speculative(engine, spec)
    finally:
        engine.close()
    assert result["method"] == "ngram"
    assert len(result["grounded"]["prompts"]) == 8 and len(result["open"]["prompts"]) == 4
    assert result["grounded"]["tokens"] == sum(len(p["token_ids"]) for p in result["grounded"]["prompts"])
    assert all(1 <= len(p["token_ids"]) <= 3 for p in result["grounded"]["prompts"])
    off = {kind: {**result[kind], "prompts": [{**p, "token_ids": p["token_ids"][:1] + [-1]} if i == 0 else p
                                             for i, p in enumerate(result[kind]["prompts"])]}
           for kind in ("grounded", "open")}
    runs = {"off": {"engines": {"hybridrt-executor": {"speculative": {**result, **off, "method": "off"}}}},
            "ngram": {"engines": {"hybridrt-executor": {"speculative": result}}}}
    table = speculative_table(runs)
    assert "| ngram | hybridrt-executor |" in table and "7/8" in table and "3/4" in table


def test_generate_with_a_draft_model_in_two_processes_gives_the_plain_tokens(cpu_engine) -> None:
    """`hybridrt generate --speculative draft --draft-model M` (an ephemeral server pair): the executor loads the
    draft next to the model and runs it before each verify; the draft is the model itself here, so nearly every
    proposal is kept, and the tokens are the in-process run's without speculation. (A draft as large as the
    model never pays, so the adaptive k would not use it: --no-adaptive-k.)"""
    import subprocess
    import sys

    from launch.local import PromptInput

    prompt = PROMPTS["grounded"][5]
    params = SamplingParams(max_tokens=12, temperature=0.0)
    ids = cpu_engine.prompt_ids(PromptInput(messages=[{"role": "user", "content": prompt}]))
    base = list(cpu_engine.generator.generate(ids, params))[-1]
    out = subprocess.run([sys.executable, "-m", "launch.cli", "generate", "--json", "--quiet", "--device", "cpu",
                          "--max-tokens", "12", "--speculative", "draft", "--draft-model", "smollm2-135m-instruct",
                          "--no-adaptive-k", prompt], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["token_ids"] == base.token_ids
    assert result["speculation"]["num_drafts"] > 0 and result["speculation"]["acceptance_rate"] > 0.8


def test_draft_flags_are_checked_before_anything_starts(capsys) -> None:
    """Bad speculation flags are one line and exit 1 before any model loads or process starts (the CLI's main in
    this process: an error here would otherwise come after seconds of loading)."""
    from launch.cli import main

    for flags, message in ((["--speculative", "draft"], "go together"),
                           (["--draft-model", "dummy:smollm2-135m"], "go together"),
                           (["--speculative", "draft", "--draft-model", "/nope/model"], "nope"),
                           (["--num-speculative-tokens", "9"], "1..8")):
        assert main(["generate", "--device", "cpu", *flags, "hi"]) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.cuda
def test_smollm2_on_gpu_draft_speculation_keeps_the_tokens(smollm2_real) -> None:
    """The draft path on the GPU: SmolLM2 drafting for itself (its own weights, cache and graphs), 8 prompts x 128
    tokens, float32, fixed k = 8: the tokens of plain decoding, nearly every proposal kept."""
    from graph_executor.loading.loader import LoadConfig
    from launch.local import LocalEngine, PromptInput

    gguf, tokenizer = smollm2_real
    engine = LocalEngine(LoadConfig(model=gguf, device="cuda", dtype="float32", max_context=1024, dequantize=True,
                                    progress=False), tokenizer, draft_model=gguf,
                         speculation=SpeculativeConfig("draft", 8, adaptive=False))
    plain = Generator(engine.runner, engine.tokenizer, engine.generator.eos_token_ids)
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    drafted = accepted = 0
    for prompt in PROMPTS["grounded"]:
        ids = engine.prompt_ids(PromptInput(messages=[{"role": "user", "content": prompt}]))
        base = list(plain.generate(ids, params))[-1]
        res = list(engine.generator.generate(ids, params))[-1]
        assert res.token_ids == base.token_ids
        drafted += res.speculation["num_draft_tokens"]
        accepted += res.speculation["num_accepted_tokens"]
    assert accepted > 0.9 * drafted > 0
