"""The step doorbell (ipc/doorbell.py): its records, the executor's rules for a step that comes on both paths
(run once, answered where it was rung), and a real two-process server with it on (the CPU path otherwise runs
without it: `--doorbell auto` is GPU only), whose tokens must equal the in-process run's."""

from __future__ import annotations

import struct
import time
import uuid

import pytest
import torch
import zmq

from graph_executor.loading.loader import LoadedModel
from graph_executor.server import ExecutorServer
from ipc.channel import bind_control, connect_control
from ipc.doorbell import FAILED, MAX_PAYLOAD, MAX_VALUES, OK, SIZE, Doorbell
from ipc.messages import Decode, Error, Prefill, StepDone, Verify
from tests.test_jit_server import MAX_CONTEXT, tiny_model


@pytest.fixture
def bells(tmp_path):
    executor = Doorbell.create(tmp_path / "bell")
    jit = Doorbell.open(tmp_path / "bell")
    yield executor, jit
    jit.close()
    executor.close()


def test_a_rung_command_is_taken_once_and_its_answer_read(bells) -> None:
    executor, jit = bells
    assert executor.take() is None and jit.answered(1) is None  # a fresh bell holds nothing
    for step in (1, 2):
        msg = Verify("req-1", step, 17, 5, None)
        seq = jit.ring(msg)
        assert executor.peek() == (seq, msg)  # peek does not take
        assert executor.take() == (seq, msg)
        assert executor.take() is None
        assert jit.answered(seq) is None
        executor.answer(seq, OK if step == 1 else FAILED)
        assert jit.answered(seq) == (OK if step == 1 else FAILED, ()) and jit.answered(seq + 1) is None


def test_a_torn_command_is_never_taken(bells, tmp_path) -> None:
    executor, jit = bells
    seq = jit.ring(Decode("req-1", 1, 3))
    with open(tmp_path / "bell", "r+b") as f:  # a byte of the payload changed after the crc: as a write in progress
        f.seek(30)
        byte = f.read(1)
        f.seek(30)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert executor.take() is None and executor.taken == 0
    msg = Decode("req-1", 2, 4)
    seq = jit.ring(msg)  # the next write is whole again
    assert executor.take() == (seq, msg)


def test_a_torn_answer_is_not_read(bells, tmp_path) -> None:
    executor, jit = bells
    seq = jit.ring(Decode("req-1", 1, 3))
    executor.take()
    executor.answer(seq, OK)
    with open(tmp_path / "bell", "r+b") as f:
        f.seek(512 + 8)
        f.write(struct.pack("<q", FAILED))  # status changed, crc not
    assert jit.answered(seq) is None


def test_an_answer_carries_values_and_a_torn_one_is_not_read(bells, tmp_path) -> None:
    executor, jit = bells
    seq = jit.ring(Verify("req-1", 1, 17, 3, None, [4, 5, 6], True))
    executor.take()
    executor.answer(seq, OK, [9, 5, 11, 1])
    assert jit.answered(seq) == (OK, (9, 5, 11, 1))
    seq = jit.ring(Decode("req-1", 2, 20))
    executor.take()
    executor.answer(seq, OK)  # a shorter answer after a longer one: no stale values
    assert jit.answered(seq) == (OK, ())
    seq = jit.ring(Verify("req-1", 3, 21, 2, None, [4, 5], True))
    executor.take()
    executor.answer(seq, OK, [7, 8, 0])
    with open(tmp_path / "bell", "r+b") as f:  # a value changed after the crc
        f.seek(512 + 24 + 8)
        f.write(struct.pack("<q", 99))
    assert jit.answered(seq) is None
    with pytest.raises(ValueError, match="at most"):
        executor.answer(seq, OK, list(range(MAX_VALUES + 1)))


def test_a_message_too_long_for_the_bell_is_not_rung(bells) -> None:
    executor, jit = bells
    assert jit.ring(Decode("x" * (MAX_PAYLOAD + 1), 1, 3)) is None
    assert executor.take() is None


def test_listening_holds_only_well_before_the_promised_deadline(bells) -> None:
    executor, jit = bells
    assert not jit.listening()  # never promised
    executor.listen_until(time.monotonic_ns() + 50_000_000)
    assert jit.listening()
    executor.listen_until(time.monotonic_ns() + 500_000)  # within the margin: send the ZeroMQ copy too
    assert not jit.listening()


def test_the_file_is_private_new_and_removed_by_its_creator(tmp_path) -> None:
    path = tmp_path / "bell"
    bell = Doorbell.create(path)
    assert path.stat().st_size == SIZE and path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        Doorbell.create(path)
    (tmp_path / "short").write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match="not a doorbell"):
        Doorbell.open(tmp_path / "short")
    bell.close()
    assert not path.exists()


@pytest.fixture
def rig(tmp_path):
    """An ExecutorServer over a tiny random model with a doorbell, driven from this thread (no serve loop): the
    test plays the JIT context with a control channel and its own view of the bell."""
    ctx = zmq.Context()
    address = f"inproc://control-{uuid.uuid4().hex}"
    channel = bind_control(ctx, address)
    control = connect_control(ctx, address)
    bell = Doorbell.create(tmp_path / "bell")
    loaded = LoadedModel(tiny_model(MAX_CONTEXT), "tiny", "dummy", None, 0.0, False)
    server = ExecutorServer(channel, loaded, supervisor_pid=None, quiet=True, doorbell=bell)
    server.shared.buffers.input_ids[:4].copy_(torch.tensor([5, 6, 7, 8]))
    jit = Doorbell.open(tmp_path / "bell")
    yield server, control, jit
    jit.close()
    control.close()
    channel.close()
    server.close()
    ctx.term()


def _zmq_arrived(server: ExecutorServer) -> None:
    deadline = time.monotonic() + 5
    while not server.channel.poll(10):
        assert time.monotonic() < deadline


def test_the_executor_runs_a_step_that_comes_both_ways_once_and_answers_it_on_the_bell(rig) -> None:
    server, control, jit = rig
    prefill = Prefill("req-1", 1, 4, 0)
    seq = jit.ring(prefill)
    control.send(prefill)  # the ZeroMQ copy, as for an executor that was asleep
    assert server.next_command() == (seq, prefill)  # the bell is looked at first
    assert server.dispatch(seq, prefill) is None and jit.answered(seq) == (OK, ())
    _zmq_arrived(server)
    assert server.next_command() == (None, prefill)  # the copy: not rung any more...
    assert server.dispatch(None, prefill) is None  # ...and dropped: the step ran already
    # The ZeroMQ copy first (the bell's seq is then taken with it), the rung one is never seen again.
    decode = Decode("req-1", 2, 4)
    control.send(decode)
    _zmq_arrived(server)
    seq = jit.ring(decode)
    assert server.rung_copy(server.channel.recv(timeout_ms=0)) == (seq, decode)
    assert server.dispatch(seq, decode) is None and jit.answered(seq) == (OK, ())
    assert server.doorbell.take() is None
    # A step that only came over ZeroMQ is answered there.
    decode = Decode("req-1", 3, 5)
    control.send(decode)
    _zmq_arrived(server)
    got = server.next_command()
    assert got == (None, decode)
    assert server.dispatch(*got) == StepDone("req-1", 3)
    # A rung step that fails: FAILED on the bell, the Error (with its text) over ZeroMQ.
    bad = Decode("req-1", 4, MAX_CONTEXT + 5)
    seq = jit.ring(bad)
    got = server.next_command()
    assert got == (seq, bad)
    answer = server.dispatch(*got)
    assert isinstance(answer, Error) and jit.answered(seq) == (FAILED, ())
    assert control.recv(timeout_ms=0) is None  # nothing went over ZeroMQ for the steps answered on the bell


def test_an_accepting_verify_is_answered_with_its_result_on_the_bell_and_over_zeromq(rig) -> None:
    """Verify.accept: the executor writes the ids it was sent, runs the step and the greedy acceptance, and answers
    with [argmax per row, count kept]: the result of jit_context.acceptance.accept on the same logits."""
    from jit_context.acceptance import accept
    from jit_context.sampler import Sampler
    from jit_context.sampling_params import SamplingParams

    server, control, jit = rig
    buffers = server.shared.buffers
    server.dispatch(None, Prefill("req-1", 1, 4, 0))
    sampler = Sampler(buffers.logits.shape[0], buffers.logits.device)
    sampler.start_request(SamplingParams(temperature=0.0), [5, 6, 7, 8])
    for step, (tokens, rung) in enumerate([([8, 3, 1, 2], True), ([8, 9], False)], start=2):
        msg = Verify("req-1", step, 3, len(tokens), None, tokens, True)
        seq = jit.ring(msg) if rung else None
        answer = server.dispatch(seq, msg)
        assert buffers.input_ids[3:3 + len(tokens)].tolist() == tokens  # written by the executor
        expected = accept(sampler, buffers.verify_logits[:len(tokens)], buffers.input_ids[4:3 + len(tokens)])
        assert buffers.next_token.tolist() == [expected[expected[-1]].item()]  # the added token
        if rung:
            assert answer is None and jit.answered(seq) == (OK, tuple(expected.tolist()))
        else:
            assert answer == StepDone("req-1", step, expected.tolist())
    # The proposals' ids must be the step's and in the vocabulary.
    answer = server.dispatch(None, Verify("req-1", 9, 3, 2, None, [8, 10**6], True))
    assert isinstance(answer, Error) and "ids in [0," in answer.message
    with pytest.raises(ValueError, match="num_tokens"):
        Verify("req-1", 10, 3, 3, None, [8, 9], True).validate()


def test_a_busy_executor_promises_to_watch_the_bell(rig) -> None:
    server, _, jit = rig
    prefill = Prefill("req-1", 1, 4, 0)
    jit.ring(prefill)
    server.dispatch(*server.next_command())  # busy from here
    assert not jit.listening()
    start = time.monotonic()
    assert server.next_command() is None  # nothing came: it watched the bell, then polled
    assert time.monotonic() - start >= 0.02
    assert not jit.listening()  # the promise has run out


def test_a_two_process_server_with_the_doorbell_gives_the_in_process_tokens(cpu_engine) -> None:
    """Real processes with `doorbell="on"` on the CPU: steps rung in shared memory, the executor spinning on it
    mid-request; plain and speculative requests give the in-process run's tokens, back to back (each request's
    Reset rung with nothing waiting for it), after a status round trip and after a request its client left early,
    and a seeded sampled request (its tokens come from `logits`, which a step run twice would overwrite) too."""
    from graph_executor.loading.loader import LoadConfig
    from jit_context.sampling_params import SamplingParams
    from jit_context.speculative_config import SpeculativeConfig
    from launch.client import Client
    from launch.local import PromptInput
    from launch.supervisor import ServerConfig, Supervisor
    from tests.test_speculative import PROMPTS

    config = ServerConfig(LoadConfig(device="cpu", dtype="float32", progress=False), doorbell="on",
                          speculation=SpeculativeConfig("ngram", 4))
    params = SamplingParams(max_tokens=16, temperature=0.0)
    with Supervisor(config) as sup:
        sup.wait_ready()
        assert any(p.name.endswith(".doorbell") for p in sup.runtime.path.iterdir())
        with Client(sup.address) as client:
            for prompt in PROMPTS["grounded"][1:3]:
                messages = [{"role": "user", "content": prompt}]
                base = list(cpu_engine.generator.generate(cpu_engine.prompt_ids(PromptInput(messages=messages)),
                                                          params))[-1]
                final = list(client.generate(messages=messages, params=params))[-1]
                assert final.token_ids == base.token_ids
            stream = client.generate(messages=messages, params=SamplingParams(max_tokens=200, temperature=0.0))
            next(stream), next(stream)
            stream.close()  # the client leaves mid-request: cancelled, the executor told by a rung Reset
            assert client.status()["ready"]
            sampled = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
            ids = cpu_engine.prompt_ids(PromptInput(messages=messages))
            base = list(cpu_engine.generator.generate(ids, sampled))[-1]
            final = list(client.generate(messages=messages, params=sampled))[-1]
            assert final.token_ids == base.token_ids


def test_a_wake_makes_the_pipe_readable_until_drained(bells) -> None:
    import select

    executor, jit = bells
    assert executor.wake_path.stat().st_mode & 0o777 == 0o600
    assert select.select([executor.wake_fd], [], [], 0)[0] == []
    for _ in range(3):
        jit.wake()
    assert select.select([executor.wake_fd], [], [], 0)[0] == [executor.wake_fd]
    executor.drain_wake()  # every byte at once: one wake-up per sleep
    assert select.select([executor.wake_fd], [], [], 0)[0] == []


def test_a_wake_without_a_pipe_does_nothing(tmp_path) -> None:
    executor = Doorbell.create(tmp_path / "bell")
    executor.wake_path.unlink()  # as an executor that made none
    jit = Doorbell.open(tmp_path / "bell")
    jit.wake()
    jit.wake()
    jit.close()
    executor.close()
    assert not (tmp_path / "bell").exists() and not executor.wake_path.exists()


def test_an_idle_executor_wakes_on_the_pipe_and_takes_the_rung_command(rig) -> None:
    """Asleep in its poll (not busy, no promise), the executor wakes on the pipe: a command rung meanwhile with a wake
    and no ZeroMQ copy is taken at once; rung without the wake, the poll runs to its timeout with nothing."""
    import threading

    from graph_executor.server import POLL_MS

    server, _, jit = rig
    assert not jit.listening()

    def ring_later(msg, wake: bool) -> threading.Timer:
        timer = threading.Timer(0.02, lambda: (jit.ring(msg), jit.wake() if wake else None))
        timer.start()
        return timer

    prefill = Prefill("req-1", 1, 4, 0)
    timer = ring_later(prefill, wake=True)
    start = time.monotonic()
    assert server.next_command() == (1, prefill)
    assert time.monotonic() - start < 0.02 + POLL_MS / 1e3 / 2
    timer.join()
    decode = Decode("req-2", 1, 4)
    timer = ring_later(decode, wake=False)
    start = time.monotonic()
    assert server.next_command() is None  # the poll's timeout: the ZeroMQ copy would have been needed
    assert time.monotonic() - start >= POLL_MS / 1e3 * 0.9
    timer.join()
    assert server.next_command() == (2, decode)  # the bell is looked at first after each poll


def test_woken_without_a_command_the_executor_watches_the_bell(rig) -> None:
    """`RemoteExecutor.wake_early`: a request's arrival wakes the executor before its first step is rung; the
    executor then promises to watch the bell, so the step (rung with no wake and, as it listens, no ZeroMQ copy)
    is taken from the bell without another wake-up."""
    import threading

    from graph_executor.server import POLL_MS

    server, _, jit = rig
    prefill = Prefill("req-1", 1, 4, 0)
    seen = {}

    def client_side() -> None:
        jit.wake()  # the request arrived
        deadline = time.monotonic() + 1.0  # the executor's thread wakes (later when CI's cores are busy)
        while not jit.listening() and time.monotonic() < deadline:
            time.sleep(0.0005)
        seen["listening"] = jit.listening()  # so the JIT context would skip the ZeroMQ copy
        seen["rung"] = time.monotonic()
        jit.ring(prefill)

    timer = threading.Timer(0.02, client_side)
    timer.start()
    assert server.next_command() == (1, prefill)
    assert time.monotonic() - seen["rung"] < POLL_MS / 1e3 / 2  # taken from the bell, not after an idle poll
    timer.join()
    assert seen["listening"]


def test_a_copy_that_comes_after_the_next_step_was_rung_is_dropped(rig) -> None:
    """A step's ZeroMQ copy can be slower than the step's whole turn: rung while the executor was waking (the copy
    sent with it), answered on the bell, and the JIT context's next step rung and taken, all before the copy
    arrives. The copy is then older than the last step run, not equal to it, and must be dropped all the same: run
    again it would redo the prefill after the decode and overwrite the logits the JIT context samples next."""
    server, control, jit = rig
    buffers = server.shared.buffers
    prefill = Prefill("req-1", 1, 4, 0)
    seq = jit.ring(prefill)
    control.send(prefill)  # the executor was not listening yet: the copy goes too
    assert server.next_command() == (seq, prefill)
    assert server.dispatch(seq, prefill) is None
    decode = Decode("req-1", 2, 4)
    seq = jit.ring(decode)  # the next step, rung before the copy is read
    assert server.next_command() == (seq, decode)
    assert server.dispatch(seq, decode) is None and jit.answered(seq) == (OK, ())
    after_decode = buffers.logits.clone()
    _zmq_arrived(server)
    assert server.next_command() == (None, prefill)
    assert server.dispatch(None, prefill) is None  # dropped, not answered and not run
    assert torch.equal(buffers.logits, after_decode)
    assert control.recv(timeout_ms=0) is None
    # A later request's steps run (its request id differs), as does an ordinary next step of the same request.
    decode = Decode("req-1", 3, 5)
    assert server.dispatch(jit.ring(decode), decode) is None
    assert not torch.equal(buffers.logits, after_decode)
    prefill = Prefill("req-2", 4, 4, 0)
    assert server.dispatch(None, prefill) == StepDone("req-2", 4)
    # A copy of the first request's step read after the next request's: dropped too (step numbers are the JIT
    # context's, increasing across requests; its Reset may have been rung, with nothing waiting for it).
    assert server.dispatch(None, decode) is None


def test_a_request_s_end_is_rung_and_waits_for_nothing(rig) -> None:
    """`RemoteExecutor.finish_request` with a doorbell: the Reset is rung (no ZeroMQ copy; a wake byte when the
    executor does not listen) and nothing waits for it: the executor answers it on the bell, or the next command
    rung replaces it. The executor reads the bell before ZeroMQ: a message that came over ZeroMQ while an untaken
    Reset was on the bell is held until the Reset has been handed out."""
    import os
    import threading

    from graph_executor.server import POLL_MS
    from ipc.messages import Reset
    from jit_context.remote_executor import RemoteExecutor

    server, control, jit = rig
    remote = RemoteExecutor(control, server.shared, MAX_CONTEXT, os.getpid(), doorbell=jit)

    def listening(yes: bool) -> None:
        server.doorbell.listen_until(time.monotonic_ns() + (10**9 if yes else -10**9))

    # Listening: rung, answered on the bell, the executor no longer busy.
    server.busy = True
    listening(True)
    remote.request_id = "req-1"
    remote.finish_request()  # nobody serves the executor here: it returned without an answer
    seq, msg = server.next_command()
    assert msg == Reset("req-1") and server.dispatch(seq, msg) is None
    assert jit.answered(seq) == (OK, ()) and not server.busy
    # Rung and not taken yet: the next request's first step replaces it (the Reset's seq is never handed out).
    listening(True)
    remote.request_id = "req-2"
    remote.finish_request()
    remote.request_id = "req-3"
    remote.prefill(4, 0)
    assert server.next_command() == (seq + 2, Prefill("req-3", 1, 4, 0))
    assert server.dispatch(seq + 2, Prefill("req-3", 1, 4, 0)) is None
    remote.wait_enqueued()
    time.sleep(0.05)
    assert not server.channel.poll(0)  # nothing went over ZeroMQ

    # Not listening (asleep in its poll): rung with a wake byte; the executor wakes on the pipe and takes it.
    listening(False)
    server.busy = False
    timer = threading.Timer(0.02, remote.finish_request)
    timer.start()
    start = time.monotonic()
    assert server.next_command() == (seq + 3, Reset("req-3"))
    assert time.monotonic() - start < 0.02 + POLL_MS / 1e3 / 2  # woken, not found after an idle poll
    timer.join()
    assert not server.channel.poll(0)
    server.dispatch(seq + 3, Reset("req-3"))

    # An untaken Reset on the bell and a step that came over ZeroMQ only: the Reset first, the step held.
    listening(True)
    remote.request_id = "req-4"
    remote.finish_request()
    step = Prefill("req-5", 2, 4, 0)
    control.send(step)
    _zmq_arrived(server)
    assert server.rung_copy(server.channel.recv(timeout_ms=0)) == (seq + 4, Reset("req-4"))
    assert server.held == step and server.doorbell.peek() is None
    server.dispatch(seq + 4, Reset("req-4"))
    assert server.next_turn() == (None, step) and server.held is None  # the held step comes next, once


def test_a_status_read_behind_a_rung_reset_is_answered(rig) -> None:
    """The 2026-12-05 CI failure: a client's status right after it left a request. The JIT context rings the Reset
    and at once asks the executor's Status over ZeroMQ; an executor that reads the Status while the Reset is on the
    bell untaken hands out the Reset and holds the Status. The serving loop's turns (`next_turn`) must then give the
    Status (it was dropped, and the status waited for the step time-out, 60 s)."""
    import os

    from ipc.messages import Reset, Status, StatusReply
    from jit_context.remote_executor import RemoteExecutor

    server, control, jit = rig
    remote = RemoteExecutor(control, server.shared, MAX_CONTEXT, os.getpid(), doorbell=jit)
    server.busy = True
    server.doorbell.listen_until(time.monotonic_ns() + 10**9)
    remote.request_id = "req-1"
    remote.finish_request()
    control.send(Status())
    _zmq_arrived(server)
    seq, reset = server.rung_copy(server.channel.recv(timeout_ms=0))  # as next_command's poll between two takes
    assert reset == Reset("req-1")
    assert server.dispatch(seq, reset) is None and jit.answered(seq) == (OK, ()) and not server.busy
    got = server.next_turn()
    assert got == (None, Status())  # the held Status, then nothing more
    assert server.next_turn() is None
    assert server.reply(server.dispatch(*got))
    reply = control.recv(timeout_ms=1000)
    assert isinstance(reply, StatusReply) and reply.facts["source"] == "dummy"
