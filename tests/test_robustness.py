"""No request can take the server down: sampling parameters stay inside what float32 sampling can hold, and
the JIT context's loop turns every request-level failure into an error reply (in-process, on the `Rig` of
test_jit_server.py: the real executor on a thread, the real JitServer)."""

from __future__ import annotations

import math

import pytest
import torch

from jit_context.sampler import Sampler
from jit_context.sampling_params import (
    MAX_PENALTY,
    MAX_TEMPERATURE,
    MIN_PENALTY,
    MIN_TEMPERATURE,
    QUOTE_CHARS,
    SamplingParams,
)


@pytest.mark.parametrize("field,value", [
    ("temperature", 1e308), ("temperature", 1e-40), ("temperature", MAX_TEMPERATURE * 2),
    ("temperature", MIN_TEMPERATURE / 2), ("repetition_penalty", 1e308), ("repetition_penalty", 1e-300),
    ("repetition_penalty", MAX_PENALTY * 2), ("seed", 2**64), ("seed", 10**30),
])
def test_values_float32_sampling_cannot_hold_are_refused_with_the_range(field, value) -> None:
    with pytest.raises(ValueError, match=rf"{field} must .*in \["):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("params", [
    dict(temperature=MIN_TEMPERATURE), dict(temperature=MAX_TEMPERATURE),
    dict(temperature=1.0, repetition_penalty=MIN_PENALTY), dict(temperature=1.0, repetition_penalty=MAX_PENALTY),
    dict(temperature=MIN_TEMPERATURE, repetition_penalty=MIN_PENALTY, top_k=3, top_p=0.5, min_p=0.1),
    dict(temperature=0.0, repetition_penalty=MAX_PENALTY),
])
def test_sampling_at_the_edges_of_the_ranges_stays_finite(params) -> None:
    """Logits as large as real ones (|x| ~ 1e3, negative too), every prompt token seen: each draw is a valid id,
    and the smallest temperature picks the argmax of the penalised logits."""
    vocab = 1000
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(vocab, generator=gen) * 300  # [V]
    sampler = Sampler(vocab, torch.device("cpu"))
    sampler.start_request(SamplingParams(seed=1, **params), list(range(0, vocab, 3)))
    for _ in range(20):
        token = int(sampler.sample(logits))
        assert 0 <= token < vocab
    if params.get("temperature") == MIN_TEMPERATURE and "top_k" not in params:
        penalty = params.get("repetition_penalty", 1.0)
        seen = torch.zeros(vocab, dtype=torch.bool)
        seen[::3] = True
        x = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
        assert token == int(torch.argmax(x))


def test_error_messages_quote_at_most_a_bounded_part_of_a_value() -> None:
    for bad in ({"temperature": "x" * 400_000}, {"stop": ["", "y" * 400_000]}, {"z" * 400_000: 1}):
        with pytest.raises(ValueError) as info:
            SamplingParams.from_dict(bad)
        assert len(str(info.value)) < QUOTE_CHARS + 120, len(str(info.value))


def test_nan_and_inf_still_refused() -> None:
    for field in ("temperature", "repetition_penalty", "top_p", "min_p"):
        for value in (math.nan, math.inf, -math.inf):
            with pytest.raises(ValueError):
                SamplingParams(**{field: value})


def tiny_runner(max_context: int = 96, device: str = "cpu"):
    from graph_executor.loading.config import ModelConfig
    from graph_executor.loading.loader import _fill_random
    from graph_executor.model import LlamaModel
    from graph_executor.runner import ModelRunner

    cfg = ModelConfig("llama", 300, 64, 128, 2, 4, 2, 16, 256, eos_token_ids=(2,))
    model = LlamaModel(cfg, max_context, torch.device(device), torch.float32)
    _fill_random(model, seed=3)
    return ModelRunner(model)


def test_prefill_in_chunks_equals_one_prefill_and_yields_between_chunks() -> None:
    """A long CPU prompt is prefilled 256 tokens per Prefill so that the JIT context can answer other clients in
    between: the chunks must give the same first-token logits and the same tokens as one prefill."""
    from jit_context.generator import Generator, PrefillProgress

    runner = tiny_runner()
    prompt = torch.randint(3, 300, (61,), generator=torch.Generator().manual_seed(5)).tolist()
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    whole = Generator(runner, None, frozenset({2}))
    items = list(whole.generate(prompt, params, yield_during_prefill=True))
    assert not any(isinstance(i, PrefillProgress) for i in items)
    for chunk in (8, 16, 60, 61, 100):
        gen = Generator(runner, None, frozenset({2}), prefill_chunk=chunk)
        stream = gen.generate(prompt, params, yield_during_prefill=True)
        progress = []
        for item in stream:
            if not isinstance(item, PrefillProgress):
                break
            progress.append(item.done)
        expected = list(range(chunk, len(prompt), chunk))
        assert progress == expected, chunk
        rest = [item, *stream]
        assert rest[-1].token_ids == items[-1].token_ids, chunk
    # Chunked attention over the cache is the same arithmetic as one pass, up to float32 rounding
    # (max_tokens=1: no decode step runs, so `logits` keeps the prefill's).
    list(Generator(runner, None, frozenset({2})).generate(prompt, SamplingParams(max_tokens=1, temperature=0.0)))
    one = runner.buffers.logits.clone()
    list(Generator(runner, None, frozenset({2}), prefill_chunk=8).generate(
        prompt, SamplingParams(max_tokens=1, temperature=0.0)))
    assert torch.allclose(runner.buffers.logits, one, atol=1e-5, rtol=1e-5)


def test_clients_take_the_key_from_the_environment(monkeypatch) -> None:
    from launch.async_client import AsyncClient
    from launch.client import API_KEY_ENV, Client

    monkeypatch.setenv(API_KEY_ENV, "from-env")
    with Client("tcp://127.0.0.1:9") as client:
        assert client.api_key == "from-env"
    with Client("tcp://127.0.0.1:9", api_key="given") as client:
        assert client.api_key == "given"
    assert AsyncClient("tcp://127.0.0.1:9").api_key == "from-env"
    monkeypatch.delenv(API_KEY_ENV)
    assert AsyncClient("tcp://127.0.0.1:9").api_key is None


def test_api_key_never_shows_in_a_message_repr() -> None:
    from ipc.messages import GenerateRequest

    assert "hunter2" not in repr(GenerateRequest("r", prompt="x", api_key="hunter2"))


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                           ("localhost", True), ("0.0.0.0", False), ("::", False),
                                           ("192.168.1.5", False), ("example.com", False)])
def test_non_loopback_hosts_are_recognised(host, loopback) -> None:
    from launch.cmd_serve import is_loopback

    assert is_loopback(host) is loopback


# -- the JIT context's loop, in-process (the Rig of test_jit_server.py: real executor thread, real JitServer) --

from tests.test_jit_server import PROMPTS, Rig, greedy, loaded, reference, tok  # noqa: E402, F401 (fixtures)


@pytest.fixture(scope="module")
def rig(loaded):  # noqa: F811
    rig = Rig(loaded)
    yield rig
    rig.close()


def test_queued_request_whose_client_left_is_dropped_before_its_prefill(rig, reference) -> None:  # noqa: F811
    from ipc.messages import Started

    a, b, c = rig.peer(), rig.peer(), rig.peer()
    a.generate("a", PROMPTS["a"], params=greedy(6))
    rig.until(lambda: rig.active_id() == "a")
    b.generate("b", PROMPTS["b"], params=greedy(6))
    c.generate("c", PROMPTS["c"], params=greedy(3))
    rig.until(lambda: rig.queued_ids() == ["b", "c"])
    b.close()  # gone while queued, without a cancel
    rig.until(lambda: a.final("a") is not None)
    steps = rig.jit.executor._step
    rig.until(rig.idle)
    assert c.final("c").token_ids == reference(PROMPTS["c"], 3).token_ids
    assert rig.jit.executor._step - steps == 3  # c's prefill and two decodes: nothing ran for b
    assert [type(m) for m in c.replies("c")][:2] == [Started, type(c.chunks("c")[0])]
    assert c.replies("c")[0].spin_ms == 0.0  # a server on the CPU: its clients sleep (ipc.reply_spin)
    assert rig.jit.status()["metrics"]["finished"].get("abort") == 1


def test_a_request_at_an_idle_server_hears_started_after_its_prefill_is_sent(rig, reference) -> None:  # noqa: F811
    """Started's encode and send are off the way to the executor for a request that finds the server idle (told
    right after its prefill is sent); one queued behind another is told first (its client may have left)."""
    from ipc.messages import Started, TokenChunk

    order: list[str] = []
    port, jit = rig.jit.generator.port, rig.jit
    prefill, send_started = port.prefill, jit._send_started
    port.prefill = lambda *a, **k: (order.append("prefill"), prefill(*a, **k))[1]  # spies: call through
    jit._send_started = lambda p: (order.append(f"started {p.request_id}"), send_started(p))[1]
    try:
        a, b = rig.peer(), rig.peer()
        a.generate("a", PROMPTS["a"], params=greedy(4))
        rig.until(lambda: rig.active_id() == "a")
        b.generate("b", PROMPTS["b"], params=greedy(3))
        rig.until(rig.idle)
    finally:
        del port.prefill, jit._send_started  # the instances' own methods again
    assert order == ["prefill", "started a", "started b", "prefill"]
    for peer, rid, n in ((a, "a", 4), (b, "b", 3)):
        assert [type(m) for m in peer.replies(rid)][:2] == [Started, TokenChunk]
        assert peer.final(rid).token_ids == reference(PROMPTS[rid], n).token_ids


def test_a_client_gone_before_its_idle_request_started_ends_it_after_the_prefill(rig, reference) -> None:  # noqa: F811
    """At an idle server the prefill goes first: a client whose identity no longer routes is found by Started, right
    after it; the request ends there (aborted, counted once), and the server serves the next one."""
    import time

    from jit_context.sampling_params import SamplingParams
    from jit_context.server import Pending

    aborted = rig.jit.status()["metrics"]["finished"].get("abort", 0)
    steps = rig.jit.executor._step
    rig.jit.queue.append(Pending(b"gone-client", "gone", list(PROMPTS["a"]), SamplingParams(max_tokens=4),
                                 time.perf_counter()))  # as _enqueue leaves a request that found the server idle
    rig.until(rig.idle)
    assert rig.jit.executor._step - steps == 1  # its prefill, nothing after
    assert rig.jit.status()["metrics"]["finished"].get("abort", 0) == aborted + 1
    a = rig.peer()
    a.generate("after", PROMPTS["a"], params=greedy(3))
    rig.until(lambda: a.final("after") is not None)
    assert a.final("after").token_ids == reference(PROMPTS["a"], 3).token_ids


def test_long_cpu_prompt_prefills_in_chunks_with_clients_answered_between(rig, reference) -> None:  # noqa: F811
    from ipc.messages import Status, StatusReply, TokenChunk

    prompt = [(7 * i) % 3000 + 3 for i in range(40)]
    rig.jit.generator.prefill_chunk = 8
    try:
        a, asker = rig.peer(), rig.peer()
        a.generate("long", prompt, params=greedy(2))
        rig.until(lambda: rig.active_id() == "long")
        asker.send(Status())
        rig.until(lambda: len(asker.inbox) == 1, turns=2)  # answered after at most one 8-token chunk
        assert isinstance(asker.inbox[0], StatusReply) and not a.chunks("long")
        rig.until(rig.idle)
        assert [m for m in a.replies("long") if isinstance(m, TokenChunk)]
        assert a.final("long").token_ids == reference(prompt, 2).token_ids
    finally:
        rig.jit.generator.prefill_chunk = None


def test_a_reply_too_big_for_a_frame_is_an_error_and_the_server_serves_on(rig, reference) -> None:  # noqa: F811
    from ipc.messages import Error, TokenizeRequest

    asker, a = rig.peer(), rig.peer()
    asker.send(TokenizeRequest("big", prompt="日本" * 160_000))  # 960 KB of text: 1.1 MB of token ids
    rig.until(lambda: len(asker.inbox) == 1)
    reply = asker.inbox[0]
    assert isinstance(reply, Error) and reply.code == "oversized" and reply.request_id == "big", reply
    a.generate("a", PROMPTS["a"], params=greedy(3))
    rig.until(lambda: a.final("a") is not None)
    assert a.final("a").token_ids == reference(PROMPTS["a"], 3).token_ids
    assert rig.jit.status()["metrics"]["errors"].get("oversized") == 1
