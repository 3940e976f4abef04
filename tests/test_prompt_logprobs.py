"""A prompt's log-probabilities (`SamplingParams.prompt_logprobs`, the completions API's echo with logprobs): the
executor's scoring step against a float64 log-softmax of every row, the batch-1 generator and the batch engine
against the same, the wire forms and bad input (tests/test_tensor_parallel.py runs the step on two ranks,
tests/test_logprobs.py the OpenAI form on the shared server against transformers, tests/test_runtime_batching.py the
batching server's)."""

from __future__ import annotations

import pytest
import torch

import graph_executor.runner as runner_module
import jit_context.generator as generator_module
from graph_executor.runner import ModelRunner, eager_prefill
from ipc import codec
from ipc.messages import (
    MAX_LOGPROBS,
    MAX_SCORED_ROWS,
    PromptLogprobsChunk,
    ScorePrompt,
    StepDone,
    TokenLogprob,
)
from jit_context.generator import Generator, PrefillProgress, PromptScores
from jit_context.sampling_params import SamplingParams
from tests.test_batching import TINY, _drain, _engine, _model
from tests.test_robustness import tiny_runner

PROMPT = torch.randint(3, 300, (41,), generator=torch.Generator().manual_seed(11)).tolist()


def reference_rows(model, prompt: list[int], k: int) -> list[tuple[float, list[int], list[float], range]]:
    """Per prompt position i >= 1: float64 log-softmax of the model's logits after positions [0, i) (one forward
    over the whole prompt, every row), the id at i's log-probability, the top k ids and theirs, and the ranks it may
    take (1 + the tokens more likely, those within 1e-6 of it either way)."""
    n = len(prompt)
    logits = model(torch.tensor(prompt), torch.arange(n), torch.arange(n), n)  # [n, V]
    lp = torch.log_softmax(logits.double(), dim=-1)
    rows = []
    for i in range(n - 1):
        top = torch.sort(lp[i], descending=True)
        mine = lp[i, prompt[i + 1]]
        ranks = range(1 + int((lp[i] > mine + 1e-6).sum()), 2 + int((lp[i] > mine - 1e-6).sum()) - 1)
        rows.append((float(mine), top.indices[:k].tolist(), top.values[:k].tolist(), ranks))
    return rows


def assert_entries_match(entries: list[TokenLogprob], prompt: list[int], want, k: int, tol: float = 1e-5) -> None:
    assert len(entries) == len(want) == len(prompt) - 1
    for i, (entry, (logprob, ids, tops, ranks)) in enumerate(zip(entries, want, strict=True)):
        assert entry.token == prompt[i + 1] and entry.rank in ranks, (i, entry.rank, ranks)
        assert abs(entry.logprob - logprob) < tol, (i, entry.logprob, logprob)
        assert entry.top_ids == ids and len(entry.top_logprobs) == k, i
        assert all(abs(a - b) < tol for a, b in zip(entry.top_logprobs, tops, strict=True)), i


def test_a_scoring_step_is_a_prefill_that_scores_every_row(monkeypatch) -> None:
    """ModelRunner.score_prompt over two forward chunks and several log-softmax blocks (the chunk sizes made small):
    every value against a float64 log-softmax of one forward over all rows; its K/V and last logits are the plain
    prefill's; a second step from a later position scores its rows the same, its last scored row against the first
    id past it."""
    monkeypatch.setattr(runner_module, "PREFILL_CHUNK", 16)
    monkeypatch.setattr(runner_module, "SCORE_ROWS", 5)
    n, k = len(PROMPT), 3
    want = reference_rows(tiny_runner(max_context=64).model, PROMPT, k)
    plain = tiny_runner(max_context=64)
    plain.buffers.input_ids[:n] = torch.tensor(PROMPT)
    eager_prefill(plain.model, plain.buffers, n)
    runner = tiny_runner(max_context=64)
    runner.buffers.input_ids[:n] = torch.tensor(PROMPT)
    values = runner.score_prompt(n, 0, 0, k, n - 1)
    width = 2 + 2 * k
    assert len(values) == (n - 1) * width
    for i, (logprob, ids, tops, ranks) in enumerate(want):
        row = values[i * width:(i + 1) * width]
        assert abs(row[0] - logprob) < 1e-5 and int(row[1]) in ranks and [int(v) for v in row[2 + k:]] == ids, i
        assert max(abs(a - b) for a, b in zip(row[2:2 + k], tops, strict=True)) < 1e-5, i
    assert max(w[3][0] for w in want) > 1  # (some prompt token is not its row's most likely)
    torch.testing.assert_close(runner.model.kv_caches[:, :, :, :, :n], plain.model.kv_caches[:, :, :, :, :n],
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(runner.buffers.logits, plain.buffers.logits, rtol=1e-5, atol=1e-5)
    # Two steps: 20 rows all scored (the 20th against the id at 20), then the rest but the last.
    split = tiny_runner(max_context=64)
    split.buffers.input_ids[:n] = torch.tensor(PROMPT)
    first = split.score_prompt(20, 0, 0, 0, 20)
    second = split.score_prompt(n - 20, 20, 0, 0, n - 21)
    assert [round(v, 4) for v in (first + second)[::2]] == [round(w[0], 4) for w in want]
    torch.testing.assert_close(split.buffers.logits, plain.buffers.logits, rtol=1e-5, atol=1e-5)


def test_bad_scoring_steps_and_params_are_refused() -> None:
    runner = tiny_runner(max_context=64)
    runner.buffers.input_ids[:8] = torch.tensor([5, 6, 7, 8, 9, 10, 11, 12])
    with pytest.raises(ValueError, match="needs the ids up to position"):
        runner.score_prompt(4, 0, 0, 2, 5)  # more rows scored than run
    with pytest.raises(ValueError, match="needs the ids up to position 64"):
        runner.score_prompt(4, 60, 0, 2, 4)  # the last row's next id would be past the cache
    runner.buffers.input_ids[3] = 300  # the vocabulary has 300 tokens
    with pytest.raises(ValueError, match="in the vocabulary|\\(the vocabulary\\)"):
        runner.score_prompt(4, 0, 0, 2, 3)
    with pytest.raises(ValueError, match="KV slot 1 does not exist"):
        runner.score_prompt(2, 0, 1, 2, 1)
    with pytest.raises(ValueError, match="scored must be in"):
        ScorePrompt("r", 1, MAX_SCORED_ROWS + 1, 0, 0, 1, MAX_SCORED_ROWS + 1).validate()
    with pytest.raises(ValueError, match="logprobs must be in"):
        ScorePrompt("r", 1, 4, 0, 0, MAX_LOGPROBS + 1, 3).validate()
    for bad in (-1, MAX_LOGPROBS + 1, True, 2.0):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)
    with pytest.raises(ValueError, match="no text"):
        PromptLogprobsChunk("r", "x", [], 1, []).validate()
    with pytest.raises(ValueError, match="start must be >= 1"):
        PromptLogprobsChunk("r", "", [], 0, []).validate()
    entry = TokenLogprob(7, "a", -1.5, [7, 3], ["a", "b"], [-1.5, -2.0])
    for msg in (ScorePrompt("r", 3, 40, 0, 2, 5, 39), StepDone("r", 3, None, [-1.5, -0.25, 7.0]),
                PromptLogprobsChunk("r", "", [], 1, [entry], "<s>")):
        assert codec.decode(codec.encode(msg)) == msg


def test_the_generator_scores_the_prompt_in_steps_and_its_tokens_stay_the_plain_ones(monkeypatch) -> None:
    """Batch-1, steps of prefill_chunk (16) rows, or MAX_SCORED_ROWS without one: PromptScores per step (the first
    with the first token's text), the result's prompt_logprobs (None first) against the float64 reference; the
    tokens are the plain request's, and prefix reuse does not skip a scored prompt's rows."""
    k = 2
    want = reference_rows(tiny_runner(max_context=64).model, PROMPT, k)
    gen = Generator(tiny_runner(max_context=64), None, frozenset({2}), prefix_reuse=True, prefill_chunk=16)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, prompt_logprobs=k)
    plain = list(gen.generate(PROMPT, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)))[-1]
    items = list(gen.generate(PROMPT, params, yield_during_prefill=True))
    scores = [i for i in items if isinstance(i, PromptScores)]
    assert [(s.start, len(s.logprobs), s.first_text) for s in scores] == [(1, 16, ""), (17, 16, None), (33, 8, None)]
    assert not any(isinstance(i, PrefillProgress) for i in items)  # (each step's scores hand the loop back)
    monkeypatch.setattr(generator_module, "MAX_SCORED_ROWS", 32)
    whole = Generator(tiny_runner(max_context=64), None, frozenset({2}))
    assert [(i.start, len(i.logprobs)) for i in whole.generate(PROMPT, params) if isinstance(i, PromptScores)] \
        == [(1, 32), (33, 8)]
    result = items[-1]
    assert result.prompt_logprobs[0] is None and result.cached_tokens == 0
    assert result.prompt_logprobs[1:] == [e for s in scores for e in s.logprobs]
    assert_entries_match(result.prompt_logprobs[1:], PROMPT, want, k)
    assert result.token_ids == plain.token_ids and plain.prompt_logprobs is None
    one = list(gen.generate([PROMPT[0]], params))  # a prompt of one token: nothing to score, its first text still
    assert [(i.start, i.logprobs) for i in one if isinstance(i, PromptScores)] == [(1, [])]
    assert one[-1].prompt_logprobs == [None]


def test_the_batch_engine_scores_a_prompt_between_the_decodes_of_others() -> None:
    """Two slots, a plain request decoding, a scored one admitted mid-way: its prompt runs in scoring steps of its
    own of prefill_chunk rows (no chunk of it rides a decode), taking turns with the other's decodes; its entries are
    the reference's, and both requests get their tokens alone."""
    k = 3
    want = reference_rows(_model(TINY, slots=1), PROMPT[:23], k)
    alone = Generator(ModelRunner(_model(TINY, slots=1)), None, frozenset(TINY.eos_token_ids))
    plain_params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    scored_params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, prompt_logprobs=k)
    engine = _engine(slots=2, chunk=4)
    engine.admit("plain", PROMPT[:9], plain_params)
    for _ in range(4):
        engine.step()
    engine.admit("scored", PROMPT[:23], scored_params)
    results, log = _drain(engine)
    scored = results["scored"]
    assert_entries_match(scored.prompt_logprobs[1:], PROMPT[:23], want, k)
    items = [item for step in log for key, item in step if key == "scored" and isinstance(item, PromptScores)]
    assert [(i.start, len(i.logprobs)) for i in items] == [(1, 4), (5, 4), (9, 4), (13, 4), (17, 4), (21, 2)]
    kinds = [("score" if any(isinstance(i, PromptScores) for _, i in step) else
              "token" if any(k == "plain" and getattr(i, "token_ids", None) for k, i in step) else "") for step in log]
    scoring = kinds[kinds.index("score"):len(kinds) - kinds[::-1].index("score")]
    assert scoring == ["score", "token"] * 5 + ["score"], kinds  # one scoring step, then a token of the other
    assert scored.token_ids == list(alone.generate(PROMPT[:23], scored_params))[-1].token_ids
    assert results["plain"].token_ids == list(alone.generate(PROMPT[:9], plain_params))[-1].token_ids


@pytest.mark.cuda
def test_on_a_gpu_a_scored_prompt_runs_eagerly_and_the_graphs_decode_after_it() -> None:
    """GraphRunner with its graphs captured (SmolLM2's shape, random weights, float32): the scoring step (the
    reference forward, eagerly) against a float64 log-softmax of every row, and the decode graphs after it give the
    tokens and logits they give after the prefill graph."""
    from graph_executor.graphs import GraphRunner
    from graph_executor.loading.loader import LoadConfig, load_model
    from tests.test_gpu_path import relative_error, run_steps

    cfg = LoadConfig(model="dummy:smollm2-135m", device="cuda", dtype="float32", max_context=1024, progress=False)
    model = load_model(cfg).model
    prompt = torch.randint(100, 40000, (300,), generator=torch.Generator().manual_seed(4)).tolist()
    n, k = len(prompt), 3
    want = reference_rows(model, prompt, k)
    graphs = GraphRunner(model)
    graphs.capture_all()
    plain_logits, plain_tokens = run_steps(graphs, prompt, 12)
    b = graphs.buffers
    b.input_ids[:n] = torch.tensor(prompt, device="cuda")
    values = graphs.score_prompt(n, 0, 0, k, n - 1)
    width = 2 + 2 * k
    for i, (logprob, ids, tops, _) in enumerate(want):
        row = values[i * width:(i + 1) * width]
        assert abs(row[0] - logprob) < 1e-3 and [int(v) for v in row[2 + k:]] == ids, i
        assert max(abs(a - c) for a, c in zip(row[2:2 + k], tops, strict=True)) < 1e-3, i
    logits, tokens = [b.logits.clone()], []
    for i in range(12):
        b.next_token.copy_(torch.argmax(b.logits).view(1))
        tokens.append(int(b.next_token))
        graphs.decode(n + i)
        logits.append(b.logits.clone())
    assert tokens == plain_tokens
    assert max(relative_error(g, e) for g, e in zip(logits, plain_logits)) < 1e-3
