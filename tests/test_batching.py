"""Several requests at once (`--max-num-seqs`, issue 14), CPU: KV slots, the batched decode step, and continuous
batching in the JIT context.

- The model: `forward_batch` (one step of B sequences in B slots) equals each sequence's own step, for MHA, GQA with
  a QKV bias and a sliding window, with every slot's cache checked.
- `BatchEngine` over a real `ModelRunner` of a tiny random Llama: every request's tokens equal the tokens it gets
  alone (greedy, and seeded sampling), with more requests than slots, prompts prefilled in chunks while others
  decode, stop tokens and max_tokens; a cancelled request frees its slot at once; a follow-up turn reuses its slot's
  cache and gives the same tokens.
- `JitServer` with several slots over a real `ExecutorServer` on a thread (test_jit_server's rig): concurrent
  requests streamed and finished, status, cancel mid-batch.
The real-process path with SmolLM2's real weights is in test_runtime_batching.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from graph_executor.loading.config import ModelConfig
from graph_executor.loading.loader import LoadedModel, _fill_random
from graph_executor.model import LlamaModel
from graph_executor.runner import ModelRunner
from ipc.messages import CancelRequest, DecodeBatch, Finished, Status, StatusReply
from jit_context.batch import BatchEngine
from jit_context.generator import Chunk, GenerationResult, Generator, PrefillProgress
from jit_context.sampling_params import SamplingParams
from tests.test_jit_server import TINY, Rig, greedy

CONTEXT = 64
GQA = ModelConfig("qwen2", 512, 64, 96, 2, 4, 2, 16, 256, qkv_bias=True, sliding_window=6)


def _model(cfg: ModelConfig, slots: int, context: int = CONTEXT) -> LlamaModel:
    model = LlamaModel(cfg, context, torch.device("cpu"), torch.float32, slots=slots)
    _fill_random(model, seed=0)  # the same weights for any number of slots
    return model


@pytest.mark.parametrize("cfg", [TINY, GQA], ids=["mha", "gqa-bias-window"])
def test_a_batched_decode_step_equals_each_sequences_own_step(cfg):
    model = _model(cfg, slots=3)
    prompts = {0: [1, 2, 3, 4, 5, 6, 7], 2: [9, 8, 7], 1: list(range(20, 30))}  # slot -> prompt
    for slot, prompt in prompts.items():
        n = len(prompt)
        model(torch.tensor(prompt), torch.arange(n), torch.tensor([n - 1]), n, slot=slot)
    before = model.kv_caches.clone()
    tokens = {0: 11, 2: 12, 1: 13}
    alone = {}
    for slot, prompt in prompts.items():
        n = len(prompt)
        alone[slot] = model(torch.tensor([tokens[slot]]), torch.tensor([n]), torch.tensor([0]), n + 1, slot=slot)[0]
    caches_alone = model.kv_caches.clone()
    model.kv_caches.copy_(before)
    order = [2, 0, 1]
    batched = model.forward_batch(torch.tensor([tokens[s] for s in order]),
                                  torch.tensor([len(prompts[s]) for s in order]), order)  # [3, V]
    for row, slot in enumerate(order):
        torch.testing.assert_close(batched[row], alone[slot], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.kv_caches, caches_alone, rtol=1e-5, atol=1e-5)  # every slot, every position


def test_the_runner_checks_slots_and_batches():
    runner = ModelRunner(_model(TINY, slots=2))
    for slots, positions in (([2], [3]), ([0, 0], [1, 2]), ([0, 1], [1]), ([0], [CONTEXT])):
        with pytest.raises(ValueError):
            runner.decode_batch(slots, positions)
    with pytest.raises(ValueError, match="KV slot 5 does not exist"):
        runner.prefill(3, 0, slot=5)
    with pytest.raises(ValueError, match="distinct"):
        DecodeBatch("r", 1, [1, 1], [2, 3]).validate()


# -- the engine -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alone():
    """prompt, params -> the GenerationResult of the request alone (a one-slot model with the same weights)."""
    gen = Generator(ModelRunner(_model(TINY, slots=1)), None, frozenset(TINY.eos_token_ids))
    cache = {}

    def run(prompt: list[int], params: SamplingParams) -> GenerationResult:
        key = (tuple(prompt), params)
        if key not in cache:
            cache[key] = list(gen.generate(list(prompt), params))[-1]
        return cache[key]

    return run


def _engine(slots: int, chunk: int = 4, reuse: bool = False) -> BatchEngine:
    return BatchEngine(ModelRunner(_model(TINY, slots)), None, frozenset(TINY.eos_token_ids), chunk,
                       prefix_reuse=reuse)


def _drain(engine: BatchEngine, waiting: list[tuple[str, list[int], SamplingParams]] | None = None,
           steps: int = 500) -> tuple[dict[str, GenerationResult], list[list[tuple[str, object]]]]:
    """Step until every request (admitted, and `waiting` ones as slots free) ends; results and each step's items."""
    waiting = list(waiting or [])
    results: dict[str, GenerationResult] = {}
    log = []
    for _ in range(steps):
        while waiting and engine.has_room():
            key, prompt, params = waiting.pop(0)
            engine.admit(key, prompt, params)
        if not engine.running:
            return results, log
        events = engine.step()
        log.append(events)
        for key, item in events:
            if isinstance(item, GenerationResult):
                assert key not in results
                results[key] = item
    raise AssertionError("the engine did not finish")


REQUESTS = [  # key, prompt, max_tokens: more requests than slots, prompts of 1..23 tokens
    ("a", [5, 6, 7, 8], 9), ("b", [900], 3), ("c", list(range(100, 123)), 7), ("d", [17] * 5, 12),
    ("e", [40000, 3, 1234], 1), ("f", list(range(7, 18)), 6),
]


def test_every_request_gets_the_tokens_it_gets_alone(alone):
    engine = _engine(slots=3, chunk=4)
    waiting = [(key, prompt, SamplingParams(**greedy(n))) for key, prompt, n in REQUESTS]
    results, _ = _drain(engine, waiting)
    assert sorted(results) == sorted(k for k, _, _ in REQUESTS)
    for key, prompt, n in REQUESTS:
        want = alone(prompt, SamplingParams(**greedy(n)))
        assert results[key].token_ids == want.token_ids, key
        assert results[key].finish_reason == "length" and results[key].prompt_tokens == len(prompt)
    assert engine.running == 0 and engine.has_room()


def test_seeded_sampling_draws_the_same_tokens_as_alone(alone):
    engine = _engine(slots=4)
    params = [SamplingParams(max_tokens=10, temperature=0.9, top_k=50, seed=s, ignore_eos=True) for s in (1, 2, 3)]
    params.append(SamplingParams(max_tokens=10, temperature=0.7, top_p=0.9, repetition_penalty=1.3, seed=4,
                                 ignore_eos=True))
    waiting = [(f"s{i}", [10 + i, 20, 30 + i], p) for i, p in enumerate(params)]
    results, _ = _drain(engine, waiting)
    for key, prompt, p in waiting:
        assert results[key].token_ids == alone(prompt, p).token_ids, key


def test_steady_decoding_sends_the_next_step_before_reading_the_tokens():
    engine = _engine(slots=2)
    engine.admit("a", [5, 6, 7], SamplingParams(**greedy(6)))
    engine.admit("b", [8, 9], SamplingParams(**greedy(3)))
    engine.step()  # a's prefill and first token
    assert engine._inflight is None  # b still prefills: nothing sent ahead
    engine.step()  # a's decode and b's prompt in one step; then both decode: the next one goes out before reading
    assert [lane.key for lane in engine._inflight] == ["a", "b"]
    engine.step()  # a's third and b's second token
    assert [lane.key for lane in engine._inflight] == ["a", "b"]
    engine.step()  # b's third token is its last by max_tokens: not in the step sent ahead
    assert [lane.key for lane in engine._inflight] == ["a"]


def _hooked(slots: int, hook) -> BatchEngine:
    """An engine whose `incoming` hook is hook(engine, timeout) (the server's: admit what waits, answer cancels)."""
    engine = None

    def incoming(timeout):
        hook(engine, timeout)

    engine = BatchEngine(ModelRunner(_model(TINY, slots)), None, frozenset(TINY.eos_token_ids), 4, incoming=incoming)
    return engine


def test_a_request_admitted_while_a_step_runs_rides_the_step_sent_ahead(alone):
    arrivals = []

    def admit_arrivals(engine, timeout):
        while arrivals and engine.has_room():
            engine.admit(*arrivals.pop())

    engine = _hooked(2, admit_arrivals)
    engine.admit("a", [5, 6, 7], SamplingParams(**greedy(20)))
    results = {}

    def step():
        items = engine.step()
        results.update((key, item) for key, item in items if isinstance(item, GenerationResult))
        return items

    step()  # its prefill and first token
    step()  # its first decode; nobody arrives: the next one is sent ahead, a decode alone
    assert [lane.key for lane in engine._inflight] == ["a"] and engine._inflight_chunks == []
    arrivals.append(("b", [8, 9], SamplingParams(**greedy(3))))  # a request arrives while that decode runs
    step()  # the hook admits it before the next step goes out: a's decode carries b's whole prompt
    assert [lane.key for lane in engine._inflight] == ["a"] and [lane.key for lane in engine._inflight_chunks] == ["b"]
    items = step()  # that step: a's token and b's first
    assert [key for key, _ in items] == ["a", "b"]
    assert [lane.key for lane in engine._inflight] == ["a", "b"]  # all decoding again
    while engine.running:
        step()
    assert results["a"].token_ids == alone([5, 6, 7], SamplingParams(**greedy(20))).token_ids
    assert results["b"].token_ids == alone([8, 9], SamplingParams(**greedy(3))).token_ids


def test_a_request_cancelled_from_the_hook_leaves_no_row_in_the_step_sent_ahead(alone):
    """The server answers clients' messages in the hook: a cancel there ends its request before the next step is
    sent, and the request admitted in its place prefills alone."""
    def swap(engine, timeout):
        if engine.running == 1 and "a" in [lane.key for lane in engine.lanes.values()] and not calls:
            assert engine.cancel("a")
            engine.admit("b", [8, 9, 10], SamplingParams(**greedy(4)))
        calls.append(timeout)

    calls = []
    engine = _hooked(2, swap)
    engine.admit("a", [5, 6, 7], SamplingParams(**greedy(20)))
    engine.step()
    engine.step()  # the hook's first call: a is cancelled, b admitted
    assert engine._inflight is None and [lane.key for lane in engine.lanes.values()] == ["b"]
    results, _ = _drain(engine)
    assert list(results) == ["b"]
    assert results["b"].token_ids == alone([8, 9, 10], SamplingParams(**greedy(4))).token_ids


def test_greedy_sampled_penalized_and_min_tokens_requests_together_get_their_tokens_alone(alone):
    """One batch of lanes that draw differently: plain greedy rows share one argmax (consecutive slots), the others
    take their sampler's draw; every request's tokens are its tokens alone."""
    engine = _engine(slots=4)
    eos = sorted(TINY.eos_token_ids)[0]
    params = [SamplingParams(**greedy(9)), SamplingParams(**greedy(8)),
              SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True),
              SamplingParams(max_tokens=7, temperature=0.0, repetition_penalty=1.5, ignore_eos=True),
              SamplingParams(**greedy(10)),
              SamplingParams(max_tokens=9, temperature=0.0, presence_penalty=0.6, frequency_penalty=0.4,
                             logit_bias=((5, 0.5), (9, -1.0)), ignore_eos=True),
              SamplingParams(max_tokens=6, temperature=0.0, min_tokens=4, stop_token_ids=(eos,)),
              SamplingParams(**greedy(5))]
    waiting = [(f"r{i}", [30 + i, 7, 60 + 2 * i][:1 + i % 3], p) for i, p in enumerate(params)]
    results, _ = _drain(engine, waiting)
    for key, prompt, p in waiting:
        assert results[key].token_ids == alone(prompt, p).token_ids, key


def test_with_a_margin_the_engine_watches_for_arrivals_until_just_before_the_step_ends():
    """`send_ahead_margin_s`: once it knows a pipelined step's length, the engine watches for a request until that
    step should end less the margin, and sends the next decode then; with every slot taken it does not wait."""
    waits = []

    def incoming(timeout):
        waits.append(timeout)
        return False

    engine = BatchEngine(ModelRunner(_model(TINY, 2)), None, frozenset(TINY.eos_token_ids), 4, incoming=incoming,
                         send_ahead_margin_s=0.0)
    engine.admit("a", [5, 6, 7], SamplingParams(**greedy(40)))
    for _ in range(10):
        engine.step()
    assert waits[0] == 0.0 and engine._step_s is not None  # no estimate at first; then a step's length
    assert any(w > 0 for w in waits) and max(waits) <= 2 * engine._step_s + 0.05
    engine.admit("b", [8, 9], SamplingParams(**greedy(12)))  # both slots taken: nobody can join, nothing waits
    before = len(waits)
    for _ in range(4):
        engine.step()
    assert len(waits) == before


def test_a_stop_token_ends_one_request_and_the_others_go_on(alone):
    plain = alone([5, 6, 7, 8], SamplingParams(**greedy(9)))
    stop_at = plain.token_ids[3]
    engine = _engine(slots=2)
    stopping = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True, stop_token_ids=(stop_at,))
    results, _ = _drain(engine, [("stop", [5, 6, 7, 8], stopping), ("other", [17] * 5, SamplingParams(**greedy(12)))])
    first = plain.token_ids.index(stop_at)
    assert results["stop"].token_ids == plain.token_ids[:first + 1] and results["stop"].finish_reason == "stop"
    assert results["other"].token_ids == alone([17] * 5, SamplingParams(**greedy(12))).token_ids


def test_running_streams_wait_at_most_one_prefill_chunk():
    engine = _engine(slots=2, chunk=4)
    engine.admit("running", [5, 6, 7], SamplingParams(**greedy(30)))
    engine.step()  # its prefill and first token
    engine.step()  # its first decode, and (every request decoding) the next one sent ahead
    engine.admit("long", list(range(100, 122)), SamplingParams(**greedy(5)))  # 22 tokens: 6 chunks
    assert [key for key, _ in engine.step()] == ["running"]  # the decode sent before it came: its token only
    for step in range(6):  # then each step is a decode of the running stream carrying one chunk (a mixed step)
        items = engine.step()
        assert [key for key, item in items if isinstance(item, Chunk)].count("running") == 1  # a token every step
        long = [item for key, item in items if key == "long"]
        # chunks 1-5: progress; chunk 6: the first token, out at once
        assert [type(i) for i in long] == ([PrefillProgress] if step < 5 else [Chunk])
        assert (engine._inflight is None) == (step < 5)  # nothing is sent ahead while a prompt is prefilled
    assert engine.lanes[1].prefilled == 22


def test_an_idle_engine_may_prefill_a_prompt_whole(alone):
    """`whole_prompt_when_idle` (the GPU's): with nothing decoding, a long prompt is one step; a prompt arriving while
    another request decodes is still chunked."""
    engine = BatchEngine(ModelRunner(_model(TINY, 2)), None, frozenset(TINY.eos_token_ids), 4,
                         whole_prompt_when_idle=True)
    long = list(range(100, 122))
    engine.admit("first", long, SamplingParams(**greedy(8)))
    assert [type(item) for _, item in engine.step()] == [Chunk]  # 22 tokens in one step, then the first token
    engine.admit("second", long[:10], SamplingParams(**greedy(3)))
    assert [type(item) for key, item in engine.step() if key == "second"] == [PrefillProgress]  # first decodes
    results, _ = _drain(engine)
    assert results["first"].token_ids == alone(long, SamplingParams(**greedy(8))).token_ids
    assert results["second"].token_ids == alone(long[:10], SamplingParams(**greedy(3))).token_ids


def test_a_cancelled_request_frees_its_slot_at_once(alone):
    engine = _engine(slots=2)
    engine.admit("x", [5, 6, 7, 8], SamplingParams(**greedy(20)))
    engine.admit("y", [17] * 5, SamplingParams(**greedy(12)))
    engine.step()
    engine.step()
    assert not engine.has_room()
    assert engine.cancel("x") and engine.has_room() and not engine.cancel("x")
    results, _ = _drain(engine, [("z", [900, 901], SamplingParams(**greedy(4)))])
    assert sorted(results) == ["y", "z"]
    assert results["y"].token_ids == alone([17] * 5, SamplingParams(**greedy(12))).token_ids
    assert results["z"].token_ids == alone([900, 901], SamplingParams(**greedy(4))).token_ids


def test_a_follow_up_turn_reuses_its_slot_and_gives_the_same_tokens(alone):
    engine = _engine(slots=2, reuse=True)
    params = SamplingParams(**greedy(6))
    first, _ = _drain(engine, [("t1", [5, 6, 7, 8, 9], params), ("other", [300, 301, 302], params)])
    follow = [5, 6, 7, 8, 9, *first["t1"].token_ids, 44, 45]
    again, _ = _drain(engine, [("t2", follow, params)])
    assert again["t2"].cached_tokens == 5 + 6 - 1  # the prompt and every reply token but the last
    assert again["t2"].token_ids == alone(follow, params).token_ids
    # The other slot's contents are untouched: its follow-up reuses them too.
    other, _ = _drain(engine, [("o2", [300, 301, 302, *first["other"].token_ids, 7], params)])
    assert other["o2"].cached_tokens == 3 + 5
    assert engine.cancel("nobody") is False


def test_admission_checks_the_prompt_and_the_room():
    engine = _engine(slots=1)
    with pytest.raises(ValueError, match="empty"):
        engine.admit("e", [], SamplingParams())
    with pytest.raises(ValueError, match="maximum context"):
        engine.admit("long", [1] * CONTEXT, SamplingParams())
    engine.admit("a", [1, 2], SamplingParams(**greedy(3)))
    with pytest.raises(ValueError, match="KV slots are in use"):
        engine.admit("b", [1, 2], SamplingParams())


# -- the JIT context's server with several slots ------------------------------------------------------------


@pytest.fixture(scope="module")
def batch_rig(default_model_dir):
    model = LlamaModel(TINY, 48, torch.device("cpu"), torch.float32, slots=3)
    _fill_random(model, seed=0)
    rig = Rig(LoadedModel(model, "tiny", "dummy", default_model_dir, 0.0, False))
    yield rig
    rig.close()


def test_the_start_up_requests_fill_every_slot_at_once_and_are_not_counted(batch_rig):
    """`JitServer.warm_up` with 3 slots: one request per slot, admitted together (the batched decode and mixed steps
    run before the first client's request); every slot has served once and nothing reached the metrics."""
    rig = batch_rig
    engine = rig.jit.engine
    assert all(state.last_used > 0 for state in engine.slots) and engine.running == 0
    m = rig.jit.status()["metrics"]
    assert sum(m["finished"].values()) == 0 and m["prompt_tokens"] == m["generation_tokens"] == 0


def test_the_server_streams_concurrent_requests_each_as_alone(batch_rig):
    rig = batch_rig
    assert rig.jit.engine is not None and rig.jit.engine.capacity == 3
    peer = rig.peer()
    asks = {"a": ([5, 6, 7, 8], 8), "b": ([900, 901], 5), "c": ([40000, 3, 1234], 10), "d": ([17] * 5, 4)}
    for request_id, (prompt, n) in asks.items():
        peer.generate(request_id, prompt, params=greedy(n))
    rig.until(lambda: rig.jit.num_running() == 3)
    peer.send(Status())
    rig.until(lambda: any(isinstance(m, StatusReply) for m in peer.inbox))
    status = next(m for m in peer.inbox if isinstance(m, StatusReply)).facts
    assert status["max_num_seqs"] == 3 and len(status["running"]) == 3 and status["queued"] == 1
    rig.until(lambda: all(peer.final(r) is not None for r in asks))
    plain = Generator(ModelRunner(_model_like(rig)), None, frozenset(TINY.eos_token_ids))
    for request_id, (prompt, n) in asks.items():
        final = peer.final(request_id)
        assert isinstance(final, Finished), final
        want = list(plain.generate(prompt, SamplingParams(**greedy(n))))[-1].token_ids
        assert final.token_ids == want == [t for c in peer.chunks(request_id) for t in c.token_ids]
    assert rig.jit.num_running() == 0 and not rig.jit.queue


def _model_like(rig: Rig) -> LlamaModel:
    """A one-slot copy of the rig's model weights (the reference runs outside the rig's executor thread)."""
    model = LlamaModel(TINY, 48, torch.device("cpu"), torch.float32)
    _fill_random(model, seed=0)
    return model


def test_a_request_cancelled_mid_batch_frees_its_slot_for_the_next(batch_rig):
    rig = batch_rig
    peer = rig.peer()
    for request_id in ("x", "y", "z"):
        peer.generate(request_id, [5, 6, 7], params=greedy(40))
    peer.generate("w", [8, 9], params=greedy(3))
    rig.until(lambda: len(peer.chunks("y")) >= 2)
    assert "w" in [p.request_id for p in rig.jit.queue]
    peer.send(CancelRequest("y"))
    rig.until(lambda: peer.final("y") is not None)
    assert peer.final("y").finish_reason == "abort"
    rig.until(lambda: "w" in rig.jit._active_ids() or peer.final("w") is not None, turns=5)
    for request_id in ("x", "z"):
        peer.send(CancelRequest(request_id))
    rig.until(lambda: all(peer.final(r) is not None for r in ("x", "z", "w")))
    assert peer.final("w").finish_reason == "length" and len(peer.final("w").token_ids) == 3
    assert rig.jit.num_running() == 0


def test_a_model_with_slots_reports_them_in_ready():
    model = _model(dataclasses.replace(TINY, num_layers=1), slots=2)
    assert model.slots == 2 and model.kv_caches.shape[0] == 2 and model.kv_cache.shape == model.kv_caches[0].shape


def test_a_single_sequence_request_keeps_every_slots_token():
    """The batch-1 loop writes slot 0's token through a [1] view: an `out=` of the whole [slots] buffer would resize
    it (what the GPU server's warm-up request once did, leaving the JIT context one slot)."""
    runner = ModelRunner(_model(TINY, slots=3))
    gen = Generator(runner, None, frozenset(TINY.eos_token_ids))
    list(gen.generate([5, 6, 7], SamplingParams(**greedy(3))))
    assert runner.buffers.next_token.shape == (3,) and runner.buffers.slots == 3


@pytest.mark.parametrize("seed", range(6))
def test_random_arrivals_and_cancels_never_change_a_requests_tokens(seed, alone):
    """Requests arrive between random steps, some are cancelled mid-way (their slots reused at once, while a step
    sent ahead may still hold their rows), some end on a stop token inside a pipelined step: every request that
    finishes has exactly the tokens it gets alone."""
    import random

    rng = random.Random(seed)
    engine = _engine(slots=3, chunk=5)
    asks: dict[str, tuple[list[int], SamplingParams]] = {}
    for i in range(12):
        prompt = [rng.randrange(100, 40000) for _ in range(rng.randrange(1, 14))]
        params = SamplingParams(**greedy(rng.randrange(1, 24)))
        if rng.random() < 0.3:  # a stop token the request will meet (one of its first greedy tokens)
            tokens = alone(prompt, params).token_ids
            params = SamplingParams(max_tokens=params.max_tokens, temperature=0.0, ignore_eos=True,
                                    stop_token_ids=(tokens[min(len(tokens) - 1, rng.randrange(1, 4))],))
        asks[f"r{i}"] = (prompt, params)
    todo = list(asks)
    cancelled, results, sent_ahead = set(), {}, 0
    for _ in range(2000):
        if not todo and not engine.running:
            break
        running = [lane.key for lane in engine.lanes.values()]
        if running and rng.random() < 0.1:  # as a server turn does: cancels first, then admissions, then a step
            victim = rng.choice(running)
            assert engine.cancel(victim)
            cancelled.add(victim)
        while todo and engine.has_room() and rng.random() < 0.3:
            key = todo.pop(0)
            engine.admit(key, *asks[key])
        if engine.running:
            results.update((key, item) for key, item in engine.step() if isinstance(item, GenerationResult))
            sent_ahead += engine._inflight is not None
    assert set(results) | cancelled == set(asks) and not set(results) & cancelled
    assert sent_ahead > 0  # the pipelined path ran
    for key, result in results.items():
        assert result.token_ids == alone(*asks[key]).token_ids, (seed, key)


def test_the_batching_server_survives_random_cancels_and_departures(batch_rig):
    """Through the JIT server with slots (a real executor on a thread): three clients send ten requests, some
    cancelled, one client closing its socket mid-stream; every request that is answered to the end has the tokens it
    gets alone, and the server is idle afterwards."""
    import random

    rig = batch_rig
    rng = random.Random(7)
    peers = [rig.peer() for _ in range(3)]
    plain = Generator(ModelRunner(_model_like(rig)), None, frozenset(TINY.eos_token_ids))
    asks = {}
    for i in range(10):
        prompt = [rng.randrange(100, 40000) for _ in range(rng.randrange(1, 12))]
        asks[f"q{i}"] = (peers[i % 3], prompt, rng.randrange(2, 20))
    for request_id, (peer, prompt, n) in asks.items():
        peer.generate(request_id, prompt, params=greedy(n))
    cancelled = set()
    for turn in range(400):
        rig.turn(wait_ms=5)
        if turn == 6:
            peers[2].close()  # its requests' streams go nowhere: they are aborted
        if rng.random() < 0.05:
            request_id = rng.choice([r for r, (p, _, _) in asks.items() if p is not peers[2]])
            asks[request_id][0].send(CancelRequest(request_id))
            cancelled.add(request_id)
        if rig.jit.num_running() == 0 and not rig.jit.queue and turn > 10:
            break
    rig.until(lambda: rig.jit.num_running() == 0 and not rig.jit.queue)
    answered = 0
    for request_id, (peer, prompt, n) in asks.items():
        if peer is peers[2]:
            continue
        final = peer.final(request_id)
        assert final is not None, request_id
        if request_id in cancelled and final.finish_reason == "abort":
            continue
        want = list(plain.generate(prompt, SamplingParams(**greedy(n))))[-1].token_ids
        assert final.finish_reason == "length" and final.token_ids == want, request_id
        answered += 1
    assert answered >= 4


def test_prompts_arriving_together_start_in_one_step_as_long_as_their_chunks_fit(alone):
    """With one request decoding, three arrive at once: the next step carries the first two prompts whole (each padded
    to the longer, 2 x 4 rows <= the 16-token chunk budget) and leaves the third (3 x 6 > 16) for the step after;
    every request still gets its tokens alone."""
    engine = _engine(slots=4, chunk=16)
    engine.admit("a", [5, 6, 7, 8, 9], SamplingParams(**greedy(8)))
    engine.step()  # a's prefill alone, its first token
    prompts = {"b": [30, 31, 32, 33], "c": [40, 41, 42], "d": [50, 51, 52, 53, 54, 55]}
    for key, prompt in prompts.items():
        engine.admit(key, prompt, SamplingParams(**greedy(5)))
    items = engine.step()  # a's decode with b's and c's prompts: their first tokens in the same step
    assert [key for key, _ in items] == ["a", "b", "c"]
    lanes = {lane.key: lane for lane in engine.lanes.values()}
    assert lanes["d"].prefilled == 0 and all(lanes[k].prefilled == len(prompts[k]) for k in "bc")
    items = engine.step()  # a, b and c decode; d's whole prompt rides along
    assert [key for key, _ in items] == ["a", "b", "c", "d"]
    results, _ = _drain(engine)
    for key, prompt in prompts.items():
        assert results[key].token_ids == alone(prompt, SamplingParams(**greedy(5))).token_ids, key
    assert results["a"].token_ids == alone([5, 6, 7, 8, 9], SamplingParams(**greedy(8))).token_ids
