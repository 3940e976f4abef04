"""`JitServer` (the JIT context's serving loop) in-process: queue order, cancellation, clients that go away,
invalid requests and bad frames, mid-generation status and tokenization, metrics, executor step errors and
`fail_everyone`.

Nothing is faked: the real graph executor (`ExecutorServer`) serves a tiny random Llama on a thread, over a PAIR
control channel on `inproc://` and real shared step buffers (shm); the JIT side is built by
`jit_context.process.build_server` itself; clients are DEALER channels on `inproc://` in the same zmq context.
The test thread drives the server one loop turn at a time (`Rig.turn` calls `JitServer.turn`, the body of
`JitServer.run` without its executor-liveness check, which needs a second process), so queue order, the moment
of a cancel and a client vanishing mid-stream are deterministic; one test runs `JitServer.run` itself on a
thread. A step error is the executor's own: its runner is swapped for one with a shorter context, whose real
check refuses a late decode. Outputs are checked against the in-process `Generator` over a `ModelRunner` of the
same model. What needs real processes (a peer killed, SIGTERM, TCP frame limits, the CLI) is in test_runtime.py
and test_runtime_faults.py.
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid

import msgpack
import pytest
import torch
import zmq

from graph_executor.draft import DraftingRunner
from graph_executor.loading.config import ModelConfig
from graph_executor.loading.loader import LoadedModel, _fill_random
from graph_executor.model import LlamaModel
from graph_executor.runner import ModelRunner
from graph_executor.server import ExecutorServer
from ipc.channel import bind_control, connect_client, connect_control
from ipc.codec import decode, encode
from ipc.messages import (
    CancelRequest,
    DetokenizeReply,
    DetokenizeRequest,
    Error,
    Finished,
    GenerateRequest,
    Handshake,
    Reset,
    Status,
    StatusReply,
    TokenChunk,
    TokenizeReply,
    TokenizeRequest,
)
from jit_context.generator import Generator
from jit_context.process import build_server, parse_args
from jit_context.sampling_params import SamplingParams
from jit_context.tokenizer import Tokenizer

# The default model's tokenizer (49152 ids) over a 2-layer model: text prompts work, a step takes ~1 ms.
TINY = ModelConfig("llama", 49152, 64, 128, 2, 4, 2, 16, 256, tie_word_embeddings=True, eos_token_ids=(2,))
MAX_CONTEXT = 48
PROMPTS = {"a": [5, 6, 7, 8], "b": [900, 901], "c": [40000, 3, 1234], "d": [17, 17, 17, 17, 17]}
LONG = 40  # tokens of a request that must still be running when the test acts on it


def greedy(max_tokens: int, **extra) -> dict:
    return {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, **extra}


def tiny_model(max_context: int) -> LlamaModel:
    model = LlamaModel(TINY, max_context, torch.device("cpu"), torch.float32)
    _fill_random(model, seed=0)  # the same weights for any max_context (rope and KV cache are not random)
    return model


@pytest.fixture(scope="module")
def tok(default_model_dir) -> Tokenizer:
    return Tokenizer.from_path(default_model_dir)


@pytest.fixture(scope="module")
def loaded(default_model_dir) -> LoadedModel:
    return LoadedModel(tiny_model(MAX_CONTEXT), "tiny", "dummy", default_model_dir, 0.0, False)


@pytest.fixture(scope="module")
def reference(loaded, tok):
    """prompt ids, max_tokens -> the in-process GenerationResult (greedy, EOS ignored). Called only while no
    rig runs a step: it shares the model (and its KV cache) with the executor thread."""
    gen = Generator(ModelRunner(loaded.model), tok, frozenset(TINY.eos_token_ids) | tok.eos_token_ids)
    cache: dict = {}

    def run(prompt_ids: list[int], max_tokens: int):
        key = (tuple(prompt_ids), max_tokens)
        if key not in cache:
            cache[key] = list(gen.generate(list(prompt_ids), SamplingParams(**greedy(max_tokens))))[-1]
        return cache[key]

    return run


class Peer:
    """A client: a DEALER channel on the rig's context; every reply it gets lands in `inbox` (and the rig's log)."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.chan = connect_client(rig.ctx, rig.address)
        self.inbox: list = []

    def send(self, msg) -> None:
        self.chan.send(msg, timeout_ms=1000)

    def generate(self, request_id: str, prompt_ids: list[int] | None = None, **kwargs) -> None:
        self.send(GenerateRequest(request_id, token_ids=prompt_ids, **kwargs))

    def replies(self, request_id: str) -> list:
        return [m for m in self.inbox if getattr(m, "request_id", None) == request_id]

    def final(self, request_id: str):
        """The Finished or Error that ended the request (None if it has not ended)."""
        ends = [m for m in self.replies(request_id) if isinstance(m, (Finished, Error))]
        assert len(ends) <= 1, ends
        return ends[0] if ends else None

    def chunks(self, request_id: str) -> list[TokenChunk]:
        return [m for m in self.replies(request_id) if isinstance(m, TokenChunk)]

    def close(self) -> None:
        self.chan.close()


class Rig:
    """One executor thread and one JitServer over it, driven turn by turn from the test thread."""

    def __init__(self, loaded: LoadedModel, captures_s: float | None = None, jit_args: tuple[str, ...] = ()) -> None:
        """`captures_s`: the executor answers the Handshake early, then takes this long before its second Ready, as it
        does around its start-up graph captures on a GPU (here a sleep stands in for the captures). `jit_args`: more
        of the JIT context's command line."""
        self.captures_s = captures_s
        self.ctx = zmq.Context()
        name = uuid.uuid4().hex
        control_address, self.address = f"inproc://control-{name}", f"inproc://clients-{name}"
        executor_channel = bind_control(self.ctx, control_address)
        self.executor = ExecutorServer(executor_channel, loaded, supervisor_pid=None, quiet=True)
        self.failures: list[BaseException] = []  # of the executor thread (and of a `serve_on_a_thread`)
        self.jit_thread: threading.Thread | None = None
        self.thread = threading.Thread(target=self._serve_executor, args=(executor_channel,), daemon=True)
        self.thread.start()
        self.control = connect_control(self.ctx, control_address)
        args = parse_args(["--control", control_address, "--listen", self.address, "--executor-pid", str(os.getpid()),
                           *jit_args])
        self.jit = build_server(args, self.ctx, self.control)
        self.peers: list[Peer] = []
        self.log: list = []  # every reply to every peer, in the order the server sent them

    def _serve_executor(self, channel) -> None:
        try:
            if self.captures_s is not None:
                while not self.executor.answered_early:
                    self.executor.answer_handshake_early()
                    threading.Event().wait(0.005)
                threading.Event().wait(self.captures_s)
                self.executor.end_start_up_captures()
            self.executor.serve()
            self.failures.append(AssertionError("the executor loop returned"))
        except zmq.ContextTerminated:
            pass  # the rig is closing
        except BaseException as e:  # noqa: BLE001 - reported by close()
            self.failures.append(e)
        finally:
            channel.close()
            self.executor.close()

    def serve_on_a_thread(self) -> None:
        """`JitServer.run` itself on a thread, until the rig closes; the test thread then only uses its peers."""

        def serve() -> None:
            try:
                self.jit.run()
            except zmq.ContextTerminated:
                pass
            except BaseException as e:  # noqa: BLE001 - reported by close()
                self.failures.append(e)
            finally:
                self.jit.clients.close()
                self.control.close()

        self.jit_thread = threading.Thread(target=serve, daemon=True)
        self.jit_thread.start()

    def peer(self) -> Peer:
        peer = Peer(self)
        self.peers.append(peer)
        return peer

    def turn(self, wait_ms: int = 0) -> None:
        """One turn of `JitServer.run`'s loop: take client messages, start the next request, advance one token."""
        self.jit.turn(wait_ms)
        self.collect()

    def collect(self) -> None:
        for peer in self.peers:
            if peer.chan.closed:
                continue
            while (msg := peer.chan.recv(timeout_ms=0)) is not None:
                peer.inbox.append(msg)
                self.log.append(msg)

    def until(self, condition, turns: int = 200) -> int:
        """Turn until `condition()`; how many turns it took."""
        for n in range(turns):
            if condition():
                return n
            self.turn(wait_ms=20)
        raise AssertionError(f"condition not met in {turns} turns")

    def idle(self) -> bool:
        return self.jit.active is None and not self.jit.queue

    def active_id(self) -> str | None:
        return self.jit.active.request_id if self.jit.active else None

    def queued_ids(self) -> list[str]:
        return [p.request_id for p in self.jit.queue]

    def taken(self, request_id: str) -> bool:
        return self.active_id() == request_id or request_id in self.queued_ids()

    def close(self) -> None:
        for peer in self.peers:
            peer.close()
        if self.jit_thread is None:
            self.jit.clients.close()
            self.control.close()
        self.ctx.term()  # each thread's next receive raises ContextTerminated; it closes its sockets
        for thread in (self.thread, self.jit_thread):
            if thread is not None:
                thread.join(timeout=10)
                assert not thread.is_alive(), f"{thread} did not stop"
        self.jit.executor.shared.close()
        assert not self.failures, self.failures


@pytest.fixture(scope="module")
def shared_rig(loaded):
    rig = Rig(loaded)
    yield rig
    rig.close()


@pytest.fixture
def rig(shared_rig):
    """The module's rig (building one loads a tokenizer: ~1 s), idle and with no clients at the start of each
    test; its metrics accumulate across tests (see `Metrics`)."""
    assert shared_rig.idle() and not shared_rig.peers
    yield shared_rig
    for peer in shared_rig.peers:
        peer.close()  # anything left running is aborted as soon as it streams to nobody
    shared_rig.until(shared_rig.idle)
    shared_rig.peers.clear()
    shared_rig.log.clear()
    assert not shared_rig.failures, shared_rig.failures


@pytest.fixture
def fresh_rig(loaded):
    """A rig of its own, for a test that leaves it in a state no later test should see."""
    rig = Rig(loaded)
    yield rig
    rig.close()


class Metrics:
    """What the status message's metrics gained since this object was made."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.before = rig.jit.status()["metrics"]

    def gained(self) -> dict:
        now = self.rig.jit.status()["metrics"]
        finished = {k: v - self.before["finished"].get(k, 0) for k, v in now["finished"].items()}
        out = {"finished": {k: v for k, v in finished.items() if v}, "running": now["running"],
               "waiting": now["waiting"]}
        for key in ("prompt_tokens", "generation_tokens"):
            out[key] = now[key] - self.before[key]
        for key in ("ttft_s", "time_per_output_token_s", "e2e_latency_s"):
            out[key] = sum(now[key]["counts"]) - sum(self.before[key]["counts"])
        return out


# -- queue ----------------------------------------------------------------------------------------------------


def test_requests_are_served_one_at_a_time_first_come_first_served(rig, reference, tok) -> None:
    """Requests arriving c, a, b (not sorted by id, each from its own client) run in that order, one after the
    other, and each gets exactly its in-process output; a text prompt goes through the tokenizer."""
    peers = {rid: rig.peer() for rid in ("c", "a", "b", "text")}
    for rid in ("c", "a", "b"):
        peers[rid].generate(rid, PROMPTS[rid], params=greedy(6))
        rig.until(lambda rid=rid: rig.taken(rid))
    peers["text"].send(GenerateRequest("text", prompt="Hello there", params=greedy(6)))
    rig.until(lambda: rig.taken("text"))
    assert rig.active_id() == "c" and rig.queued_ids() == ["a", "b", "text"]
    assert rig.jit.status()["queued"] == 3
    rig.until(rig.idle)
    order = [m.request_id for m in rig.log]
    assert [rid for i, rid in enumerate(order) if i == 0 or order[i - 1] != rid] == ["c", "a", "b", "text"]
    for rid in ("c", "a", "b", "text"):
        prompt = tok.encode("Hello there") if rid == "text" else PROMPTS[rid]
        ref, final = reference(prompt, 6), peers[rid].final(rid)
        assert isinstance(final, Finished) and final.finish_reason == "length", final
        assert final.token_ids == ref.token_ids and final.text == ref.text, rid
        assert [t for c in peers[rid].chunks(rid) for t in c.token_ids] == ref.token_ids
        assert final.usage == {"prompt_tokens": len(prompt), "completion_tokens": 6, "total_tokens": len(prompt) + 6}
        known, sent = final.timings["token_times_ms"], final.timings["sent_times_ms"]  # each chunk sent once known
        assert len(known) == len(sent) == 6 and all(k <= s for k, s in zip(known, sent)) and sent == sorted(sent)
    _each_waited_for_the_one_before([peers[rid].final(rid).timings for rid in ("c", "a", "b", "text")])


def _each_waited_for_the_one_before(timings: list[dict]) -> None:
    """Finished.timings in serving order: each request started (received + queue) after the one before it sent its
    last token, and every one but the first queued. (Not queue times increasing: a request that arrives later than
    the one ahead of it by more than that one's run waits less -- the text prompt, sent after a poll and its
    tokenization on a loaded 2-core machine, failed that in CI.)"""
    for before, after in zip(timings, timings[1:]):
        last_sent_s = before["received_at_s"] + before["sent_times_ms"][-1] / 1e3
        assert after["received_at_s"] + after["queue_ms"] / 1e3 >= last_sent_s - 1e-5, (before, after)
    assert all(t["queue_ms"] > 0 for t in timings[1:]), timings


def test_run_loop_serves_in_arrival_order_and_answers_status_meanwhile(fresh_rig, reference) -> None:
    """`JitServer.run` itself (the other tests step its loop body): requests queued c, a, b start in that order."""
    rig = fresh_rig
    peers = {rid: rig.peer() for rid in ("c", "a", "b")}
    for n, rid in enumerate(("c", "a", "b")):
        peers[rid].generate(rid, PROMPTS[rid], params=greedy(8))
        for _ in range(100):
            if len(rig.jit.queue) > n:
                break
            rig.jit._drain_clients(20)
    assert rig.queued_ids() == ["c", "a", "b"]
    asker = rig.peer()
    rig.serve_on_a_thread()
    asker.send(Status())
    status = asker.chan.recv(timeout_ms=10_000)
    assert isinstance(status, StatusReply) and status.facts["model"] == "tiny"
    finals = {}
    for rid, peer in peers.items():
        while rid not in finals:
            msg = peer.chan.recv(timeout_ms=30_000)
            assert msg is not None, f"no reply for {rid}"
            if isinstance(msg, (Finished, Error)):
                finals[rid] = msg
    for rid, final in finals.items():
        assert isinstance(final, Finished) and final.token_ids == reference(PROMPTS[rid], 8).token_ids, final
    _each_waited_for_the_one_before([finals[rid].timings for rid in ("c", "a", "b")])


def test_a_handshake_answered_during_captures_sets_up_first_and_steps_after(loaded, reference) -> None:
    """An executor that answers the Handshake while it captures (Ready.captures_pending): the JIT context opens the
    buffers and builds its request side meanwhile, sends no step (its warm-up request included) before the second
    Ready, then serves as usual."""
    rig = Rig(loaded, captures_s=1.0)  # the set-up takes ~0.2 s on a loaded 2-core machine: room for it
    try:
        phases = list(rig.jit.startup.phases.items())
        names = [name for name, _ in phases]
        assert names.index("step buffers and events (IPC)") < names.index("waiting for the executor's graph captures")
        assert names.index("waiting for the executor's graph captures") < names.index("warm-up request")
        assert dict(phases)["waiting for the executor's graph captures"] >= 0.2  # the set-up overlapped the wait
        assert not rig.jit.ready.captures_pending
        peer = rig.peer()
        peer.generate("a", PROMPTS["a"], params=greedy(5))
        rig.until(lambda: peer.final("a") is not None)
        assert peer.final("a").token_ids == reference(PROMPTS["a"], 5).token_ids
    finally:
        rig.close()


def test_the_handshake_is_queued_before_the_executor_binds(tmp_path) -> None:
    """The JIT context queues its Handshake first thing (`send_handshake_now`), so that an executor answers it as soon
    as it can, even one that binds its control channel later."""
    from ipc.messages import Handshake
    from jit_context.process import send_handshake_now

    ctx = zmq.Context()
    address = f"ipc://{tmp_path}/control"
    try:
        jit_side = connect_control(ctx, address)
        assert send_handshake_now(jit_side)
        executor_side = bind_control(ctx, address)
        got = executor_side.recv(timeout_ms=5000)
        assert isinstance(got, Handshake) and got.pid == os.getpid()
    finally:
        ctx.destroy(linger=0)


def test_prompt_filling_the_context_but_one_gets_one_token(rig, reference) -> None:
    peer = rig.peer()
    prompt = [42] * (MAX_CONTEXT - 1)
    peer.generate("full", prompt, params=greedy(10))
    rig.until(lambda: peer.final("full") is not None)
    final = peer.final("full")
    assert isinstance(final, Finished) and final.finish_reason == "length"
    assert final.token_ids == reference(prompt, 1).token_ids and len(final.token_ids) == 1


def test_after_a_request_the_loop_polls_without_sleeping_for_the_idle_spin_window(loaded, reference) -> None:
    """`--idle-spin-ms`: for that long after its last request the serving loop's turns poll the clients without
    sleeping (a request that comes then is read without a thread wake-up); after it, and with the default 0, an idle
    turn sleeps in its poll for its wait."""

    def idle_turn_s(rig: Rig) -> float:
        start = time.perf_counter()
        rig.turn(wait_ms=200)
        return time.perf_counter() - start

    for spin_ms in (0, 400):
        rig = Rig(loaded, jit_args=("--idle-spin-ms", str(spin_ms)))
        try:
            peer = rig.peer()
            peer.generate("r", [5, 6, 7], params=greedy(2))
            rig.until(lambda: peer.final("r") is not None)
            assert peer.final("r").token_ids == reference([5, 6, 7], 2).token_ids
            took = idle_turn_s(rig)
            if spin_ms:
                assert rig.jit.idle_spinning and took < 0.1, took
                time.sleep(spin_ms / 1e3)
                took = idle_turn_s(rig)
            assert not rig.jit.idle_spinning and took >= 0.15, took
        finally:
            rig.close()


# -- cancellation and clients that go away -----------------------------------------------------------------------


def test_cancel_a_queued_request_it_never_starts(rig, reference) -> None:
    a, b, c, stranger = rig.peer(), rig.peer(), rig.peer(), rig.peer()
    a.generate("a", PROMPTS["a"], params=greedy(LONG))  # still running while b and c arrive, however slow the host
    rig.until(lambda: rig.active_id() == "a")
    b.generate("b", PROMPTS["b"], params=greedy(8))
    c.generate("c", PROMPTS["c"], params=greedy(8))
    rig.until(lambda: rig.queued_ids() == ["b", "c"])
    stranger.send(CancelRequest("c"))  # not its request: ignored
    stranger.send(CancelRequest("nobody"))  # no such request: ignored
    b.send(CancelRequest("b"))
    rig.until(lambda: b.final("b") is not None)
    assert b.replies("b") == [Finished("b", "", [], "abort", {}, {})]
    assert rig.active_id() == "a" and rig.queued_ids() == ["c"]
    rig.until(rig.idle)
    assert a.final("a").token_ids == reference(PROMPTS["a"], LONG).token_ids
    assert c.final("c").token_ids == reference(PROMPTS["c"], 8).token_ids
    assert b.replies("b") == [Finished("b", "", [], "abort", {}, {})]  # nothing more, ever
    assert stranger.inbox == []
    assert [m.request_id for m in rig.log if isinstance(m, TokenChunk)][-1] == "c"


def test_cancel_the_active_request_frees_the_executor_for_the_next(rig, reference) -> None:
    a, b = rig.peer(), rig.peer()
    a.generate("a", PROMPTS["a"], params=greedy(LONG))
    rig.until(lambda: rig.active_id() == "a")
    b.generate("b", PROMPTS["b"], params=greedy(5))
    rig.until(lambda: len(a.chunks("a")) >= 3 and rig.queued_ids() == ["b"])
    a.send(CancelRequest("a"))
    turns = rig.until(lambda: a.final("a") is not None)
    assert turns <= 2
    final = a.final("a")
    assert isinstance(final, Finished) and final.finish_reason == "abort"
    assert final.timings == {"reason": "cancelled by the client"}
    streamed = [t for c in a.chunks("a") for t in c.token_ids]
    assert len(streamed) < LONG and streamed == reference(PROMPTS["a"], LONG).token_ids[:len(streamed)]
    rig.until(rig.idle)  # b's steps are not confused by the cancelled request's last step
    assert b.final("b").token_ids == reference(PROMPTS["b"], 5).token_ids


def test_client_gone_mid_stream_frees_the_executor_for_the_next(rig, reference) -> None:
    metrics = Metrics(rig)
    a, b = rig.peer(), rig.peer()
    a.generate("a", PROMPTS["a"], params=greedy(LONG))
    rig.until(lambda: rig.active_id() == "a")
    b.generate("b", PROMPTS["b"], params=greedy(5))
    rig.until(lambda: len(a.chunks("a")) >= 2 and rig.queued_ids() == ["b"])
    a.close()  # without a word
    turns = rig.until(lambda: rig.active_id() != "a")
    # ZeroMQ's I/O thread tears the gone peer's pipe down on its own time: <= 5 turns on a quiet machine, 8 seen in a
    # loaded CI run. Running on for the ~38 tokens left would be the bug; 15 turns is well short of that.
    assert turns <= 15, "the server kept generating for a client that is gone"
    rig.until(rig.idle)
    assert b.final("b").token_ids == reference(PROMPTS["b"], 5).token_ids
    m = metrics.gained()
    assert m["finished"] == {"abort": 1, "length": 1}
    assert m["generation_tokens"] == 5  # an aborted request's tokens are not counted as generated


# -- bad input ------------------------------------------------------------------------------------------------

BAD_REQUESTS = {
    "empty prompt": ({"prompt": ""}, "the prompt is empty"),
    "empty token ids": ({"token_ids": []}, "the prompt is empty"),
    "prompt over the max context": ({"prompt": "hello " * MAX_CONTEXT}, "maximum context"),
    "token ids filling the max context": ({"token_ids": [42] * MAX_CONTEXT}, "maximum context"),
    "token id over the vocabulary": ({"token_ids": [1, TINY.vocab_size]}, "vocabulary"),
    "bad chat role": ({"messages": [{"role": "robot", "content": "x"}]}, "robot"),
    "temperature < 0": ({"prompt": "Hi", "params": {"temperature": -0.5}}, "temperature"),
    "top_p = 0": ({"prompt": "Hi", "params": {"top_p": 0.0}}, "top_p"),
    "max_tokens = 0": ({"prompt": "Hi", "params": {"max_tokens": 0}}, "max_tokens"),
    "unknown params field": ({"prompt": "Hi", "params": {"temprature": 0.5}}, "unknown sampling params"),
}


@pytest.mark.parametrize("kwargs,message", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_invalid_request_is_answered_while_the_active_one_runs_on(rig, reference, kwargs, message) -> None:
    metrics = Metrics(rig)
    a, bad = rig.peer(), rig.peer()
    a.generate("a", PROMPTS["a"], params=greedy(8))
    rig.until(lambda: len(a.chunks("a")) >= 1)
    bad.send(GenerateRequest("bad", **kwargs))  # not validated here: as a client that skips its own checks
    turns = rig.until(lambda: bad.final("bad") is not None)
    assert turns <= 2  # answered at once, not queued behind the running request
    error = bad.final("bad")
    assert isinstance(error, Error) and error.code == "invalid_request" and message in error.message, error
    assert bad.replies("bad") == [error] and rig.queued_ids() == []
    rig.until(rig.idle)
    assert a.final("a").token_ids == reference(PROMPTS["a"], 8).token_ids
    assert metrics.gained()["finished"] == {"length": 1}  # an invalid request is not a served one


BAD_FRAMES = {
    "malformed msgpack": ([b"\xc1\x93\x01"], "malformed"),
    "random bytes": ([random.Random(0).randbytes(256)], "malformed"),
    "not [tag, fields]": ([msgpack.packb({"prompt": "hi"})], "malformed"),
    "two frames": ([encode(GenerateRequest("r", prompt="hi")), b"extra"], "malformed"),
    "unknown message type": ([msgpack.packb([99, {}])], "unknown_type"),
    "unknown message field": ([msgpack.packb([20, {"request_id": "r", "prompt": "hi", "bogus": 1}])], "bad_fields"),
    "wrong field type": ([msgpack.packb([20, {"request_id": "r", "prompt": 7}])], "bad_fields"),
    "no prompt": ([msgpack.packb([20, {"request_id": "r"}])], "bad_fields"),
    "two prompts": ([msgpack.packb([20, {"request_id": "r", "prompt": "hi", "token_ids": [1]}])], "bad_fields"),
    "executor-only message": ([encode(Reset("from a client"))], "unexpected"),
}


@pytest.mark.parametrize("frames,code", BAD_FRAMES.values(), ids=BAD_FRAMES.keys())
def test_bad_frame_gets_an_error_reply_and_the_server_serves_on(rig, reference, frames, code) -> None:
    sock = rig.ctx.socket(zmq.DEALER)  # a bare socket: frames go out exactly as given
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(rig.address)
    try:
        sock.send_multipart(frames)
        rig.until(lambda: sock.poll(0))
        reply = decode(sock.recv())
        assert isinstance(reply, Error) and reply.code == code and reply.message, reply
        assert rig.idle()
    finally:
        sock.close()
    peer = rig.peer()
    peer.generate("after", PROMPTS["b"], params=greedy(3))
    rig.until(lambda: peer.final("after") is not None)
    assert peer.final("after").token_ids == reference(PROMPTS["b"], 3).token_ids


# -- answered at once, even mid-generation --------------------------------------------------------------------


def test_status_tokenize_and_detokenize_are_answered_mid_generation(rig, reference, tok) -> None:
    a, b, asker = rig.peer(), rig.peer(), rig.peer()
    a.generate("a", PROMPTS["a"], params=greedy(12))
    rig.until(lambda: len(a.chunks("a")) >= 2)
    b.generate("b", PROMPTS["b"], params=greedy(3))
    rig.until(lambda: rig.queued_ids() == ["b"])
    chat = [{"role": "user", "content": "Hi"}]
    ids = tok.apply_chat_template(chat)
    questions = [Status(), Handshake(1, "client", 1), TokenizeRequest("t1", prompt="Hello world, 日本"),
                 TokenizeRequest("t2", messages=chat),
                 TokenizeRequest("t3", messages=chat, add_generation_prompt=False),
                 DetokenizeRequest("d1", ids), DetokenizeRequest("d2", [TINY.vocab_size]),
                 TokenizeRequest("t4", messages=[{"role": "robot", "content": "x"}])]
    for q in questions:
        asker.send(q)
    tokens_before = len(a.chunks("a"))
    rig.until(lambda: len(asker.inbox) == len(questions), turns=3)
    assert len(a.chunks("a")) - tokens_before <= 3  # answered within the turns of a few tokens
    status, hello, t1, t2, t3, d1, d2, t4 = asker.inbox
    assert isinstance(status, StatusReply)
    facts = status.facts
    assert (facts["active"], facts["queued"], facts["max_context"], facts["model"]) == ("a", 1, MAX_CONTEXT, "tiny")
    assert (facts["metrics"]["running"], facts["metrics"]["waiting"]) == (1, 1)
    assert facts["executor"]["executor_pid"] == os.getpid()
    assert isinstance(hello, Handshake) and hello.role == "jit_context" and hello.pid == os.getpid()
    assert t1 == TokenizeReply("t1", tok.encode("Hello world, 日本"), MAX_CONTEXT)
    assert t2 == TokenizeReply("t2", ids, MAX_CONTEXT)
    assert t3.token_ids == tok.apply_chat_template(chat, add_generation_prompt=False) and len(t3.token_ids) < len(ids)
    assert d1 == DetokenizeReply("d1", tok.decode(ids, skip_special_tokens=False))
    for error, rid in ((d2, "d2"), (t4, "t4")):
        assert isinstance(error, Error) and error.code == "invalid_request" and error.request_id == rid, error
    rig.until(rig.idle)
    assert a.final("a").token_ids == reference(PROMPTS["a"], 12).token_ids
    assert b.final("b").token_ids == reference(PROMPTS["b"], 3).token_ids
    asker.send(Status())  # idle: the executor is asked for its live facts
    rig.until(lambda: len(asker.inbox) == len(questions) + 1)
    live = asker.inbox[-1].facts
    assert live["active"] is None and live["executor"]["executor_pid"] == os.getpid()


# -- metrics --------------------------------------------------------------------------------------------------


def test_the_start_up_request_runs_the_path_and_is_neither_sent_nor_counted(fresh_rig, reference, tok) -> None:
    """`JitServer.warm_up` (in `build_server`): one request of its own went through the executor before any client
    came (its phase is timed), nothing of it reached a client or the metrics, and the first client's request is
    served as the in-process reference serves it."""
    rig = fresh_rig
    status = rig.jit.status()
    assert "warm-up request" in status["startup"]["phases_s"]
    m = status["metrics"]
    assert sum(m["finished"].values()) == 0 and m["prompt_tokens"] == m["generation_tokens"] == 0
    assert rig.idle() and rig.executor.last_step == ("warm-up", 3)  # its prefill and 2 decodes: 3 tokens
    peer = rig.peer()
    peer.generate("first", PROMPTS["a"], params=greedy(5))
    rig.until(lambda: peer.final("first") is not None)
    assert peer.final("first").token_ids == reference(PROMPTS["a"], 5).token_ids
    assert [getattr(msg, "request_id", None) for msg in rig.log if getattr(msg, "request_id", "") == "warm-up"] == []


def test_a_launchers_warm_up_request_is_served_but_not_counted(rig, reference) -> None:
    """GenerateRequest.warm_up (the HTTP app's start-up requests): answered in full like any request, neither
    counted in the metrics nor logged; a queued one cancelled is not counted either."""
    metrics = Metrics(rig)
    peer = rig.peer()
    peer.generate("warm", PROMPTS["a"], params=greedy(4), warm_up=True)
    peer.generate("queued-warm", PROMPTS["b"], params=greedy(4), warm_up=True)
    rig.until(lambda: rig.taken("queued-warm"))
    peer.send(CancelRequest("queued-warm"))
    rig.until(lambda: rig.idle() and peer.final("queued-warm") is not None)
    assert peer.final("warm").token_ids == reference(PROMPTS["a"], 4).token_ids
    assert peer.final("queued-warm").finish_reason == "abort"
    m = metrics.gained()
    assert m["finished"] == {} and m["prompt_tokens"] == m["generation_tokens"] == m["ttft_s"] == 0
    peer.generate("counted", PROMPTS["a"], params=greedy(4))
    rig.until(lambda: rig.idle() and peer.final("counted") is not None)
    assert metrics.gained()["finished"] == {"length": 1}


def test_metrics_count_each_outcome(rig, reference) -> None:
    metrics = Metrics(rig)
    peer = rig.peer()
    stop_at = reference(PROMPTS["c"], 6).token_ids[2]
    expected = reference(PROMPTS["c"], 6).token_ids
    stop_len = expected.index(stop_at) + 1
    peer.generate("length", PROMPTS["a"], params=greedy(4))
    peer.generate("stop", PROMPTS["c"], params=greedy(6, stop_token_ids=[stop_at]))
    peer.generate("cancelled", PROMPTS["d"], params=greedy(LONG))
    peer.send(GenerateRequest("invalid", prompt=""))
    rig.until(lambda: len(peer.chunks("cancelled")) >= 2)
    peer.send(CancelRequest("cancelled"))
    rig.until(lambda: rig.idle() and peer.final("cancelled") is not None)
    assert peer.final("stop").finish_reason == "stop" and len(peer.final("stop").token_ids) == stop_len
    m = metrics.gained()
    assert m["finished"] == {"length": 1, "stop": 1, "abort": 1}
    assert m["prompt_tokens"] == len(PROMPTS["a"]) + len(PROMPTS["c"]) + len(PROMPTS["d"])
    assert m["generation_tokens"] == 4 + stop_len
    assert m["ttft_s"] == 2 and m["e2e_latency_s"] == 3  # observations: aborted requests have no tokens
    assert m["time_per_output_token_s"] == (4 - 1) + (stop_len - 1)
    assert (m["running"], m["waiting"]) == (0, 0)


# -- failures -------------------------------------------------------------------------------------------------


def test_executor_step_error_fails_that_request_only(fresh_rig, reference) -> None:
    """The executor refuses a step (here its runner has a shorter context than it announced, so a late decode
    does not fit): that request ends with `generation_failed`, the queued one is served."""
    rig = fresh_rig
    rig.executor.runner = DraftingRunner(ModelRunner(tiny_model(8), rig.executor.shared.buffers))
    a, b = rig.peer(), rig.peer()
    a.generate("a", PROMPTS["a"], params=greedy(20))  # decode at position 8 fails
    rig.until(lambda: rig.active_id() == "a")
    b.generate("b", PROMPTS["b"], params=greedy(3))  # positions up to 4: fits the short context
    rig.until(rig.idle)
    error = a.final("a")
    assert isinstance(error, Error) and error.code == "generation_failed", error
    assert "do not fit the context of 8" in error.message
    streamed = [t for c in a.chunks("a") for t in c.token_ids]
    assert 0 < len(streamed) < 20 and streamed == reference(PROMPTS["a"], 20).token_ids[:len(streamed)]
    assert b.final("b").token_ids == reference(PROMPTS["b"], 3).token_ids
    assert rig.jit.status()["metrics"]["finished"] == {"error": 1, "length": 1}


def test_fail_everyone_answers_the_active_and_every_queued_request(fresh_rig) -> None:
    rig = fresh_rig
    a, b, c = rig.peer(), rig.peer(), rig.peer()
    a.generate("a", PROMPTS["a"], params=greedy(LONG))
    rig.until(lambda: len(a.chunks("a")) >= 1)
    b.generate("b", PROMPTS["b"], params=greedy(LONG))
    c.generate("c", PROMPTS["c"], params=greedy(LONG))
    rig.until(lambda: rig.queued_ids() == ["b", "c"])
    rig.jit.fail_everyone("shutting_down", "the server is shutting down")
    rig.collect()
    for peer, rid in ((a, "a"), (b, "b"), (c, "c")):
        assert peer.final(rid) == Error("shutting_down", "the server is shutting down", rid)
    assert rig.idle() and rig.jit.status()["active"] is None
    sent = len(rig.log)
    for _ in range(3):
        rig.turn()
    assert len(rig.log) == sent  # nothing more for anyone


def test_request_log_lines_and_throughput(rig, capsys) -> None:
    """serve's log (`--log-requests`, on unless --quiet): one line per finished or failed request, and the
    throughput while requests run, every interval (a fake clock here)."""
    from jit_context.request_log import RequestLog

    now = [0.0]
    rig.jit.log = RequestLog(interval_s=5.0, clock=lambda: now[0])
    try:
        peer = rig.peer()
        peer.generate("logged", PROMPTS["a"], params=greedy(4))
        rig.until(lambda: peer.final("logged") is not None)
        now[0] = 6.0
        rig.turn()  # idle, but 4 tokens were streamed in the interval: one throughput line
        now[0] = 12.0
        rig.turn()  # nothing ran since: no line
        peer.send(GenerateRequest("bad", prompt=""))
        rig.until(lambda: peer.final("bad") is not None)
    finally:
        rig.jit.log = None
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("jit_context: ")]
    assert lines[0].startswith("jit_context: request logged finished (length): 4 prompt + 4 generated tokens, TTFT ")
    assert lines[1] == "jit_context: generation throughput 0.7 tokens/s, 0 running, 0 waiting"
    assert len(lines) == 2  # an invalid request is answered at once, never started: nothing to log


def test_request_log_failures_and_a_bad_interval(capsys) -> None:
    from jit_context.request_log import RequestLog

    RequestLog().failed("r1", "executor_timeout")
    assert capsys.readouterr().err == "jit_context: request r1 failed (executor_timeout)\n"
    with pytest.raises(ValueError, match="interval_s"):
        RequestLog(interval_s=0)


def test_the_early_warm_ups_size_the_vocabulary_from_the_preloaded_tokenizer(tok, default_model_dir) -> None:
    """`load_kernels_early` (GPU only) sizes its warm-ups from the tokenizer loaded before the handshake, else guesses
    Llama 2's; the size comes from here, so that the CPU suite runs the code the GPU start-up runs."""
    from pathlib import Path

    from jit_context.process import GUESSED_VOCAB, Preloaded, warm_up_vocab

    assert warm_up_vocab(Preloaded(Path(default_model_dir), tok)) == tok.vocab_size == 49152
    assert warm_up_vocab(None) == GUESSED_VOCAB
