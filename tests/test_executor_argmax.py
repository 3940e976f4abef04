"""The executor takes a plain greedy request's tokens (`Decode.argmax` / `own_input`, graph_executor/greedy_token.py,
`Generator(executor_argmax=True)`): the same tokens, stops and ends as when the JIT context samples; only plain
greedy requests use it; the executor's server takes the flags off the wire and files the token in the shared ring.
On the CPU (in-process, and an ExecutorServer driven over a real ZeroMQ channel); the GPU kernel's ring write is
tests/test_argmax.py's."""

from __future__ import annotations

import itertools
import os
import time
import uuid

import pytest
import torch
import zmq

from ipc.step_buffers import TOKEN_RING
from jit_context.generator import EXECUTOR_ARGMAX_GPU, GenerationResult, Generator, default_executor_argmax
from jit_context.sampling_params import SamplingParams
from tests.test_decode_ahead import RecordingPort
from tests.test_robustness import tiny_runner

PROMPT = torch.randint(3, 300, (9,), generator=torch.Generator().manual_seed(11)).tolist()


def run(port, params: SamplingParams, executor_argmax: bool, ahead: int = 1,
        eos: frozenset[int] = frozenset({2})) -> GenerationResult:
    gen = Generator(port, None, eos, decode_ahead=ahead, executor_argmax=executor_argmax)
    return list(gen.generate(PROMPT, params))[-1]


@pytest.fixture(scope="module")
def runner():
    return tiny_runner()


def test_the_executor_s_tokens_are_the_sampler_s(runner) -> None:
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    reference = run(runner, params, executor_argmax=False)
    for ahead in (1, 2, 3):
        port = RecordingPort(runner)
        got = run(port, params, executor_argmax=True, ahead=ahead)
        assert got.token_ids == reference.token_ids and got.finish_reason == "length", ahead
        n = len(PROMPT)
        # every decode asks for the argmax; all but the first take their input from the executor's last one
        assert port.sent == [(n + k, True, k > 0) for k in range(39)], ahead
        # the ring holds the last TOKEN_RING tokens the executor took, each at its step's position
        for k in range(40 - TOKEN_RING, 40):
            assert int(runner.buffers.token_ring[(n + k - 1) % TOKEN_RING]) == reference.token_ids[k]


def test_stops_and_ends_are_the_sampler_s(runner) -> None:
    free = run(runner, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True), executor_argmax=False)
    firsts = [i for i in range(30) if free.token_ids[i] not in free.token_ids[:i]]
    for stop_at, ahead in itertools.product(firsts[::2], (1, 2)):
        got = run(runner, SamplingParams(max_tokens=30, temperature=0.0), True, ahead,
                  eos=frozenset({free.token_ids[stop_at]}))
        assert got.token_ids == free.token_ids[:stop_at + 1] and got.finish_reason == "stop", (stop_at, ahead)
    for max_tokens in (1, 2, 3, 17):
        got = run(runner, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), True, 2)
        assert got.token_ids == free.token_ids[:max_tokens]


def test_only_plain_greedy_requests_leave_the_draw_to_the_executor(runner) -> None:
    for params in (SamplingParams(max_tokens=12, temperature=0.8, seed=3, ignore_eos=True),
                   SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=1.3, ignore_eos=True),
                   SamplingParams(max_tokens=12, temperature=0.0, frequency_penalty=0.5, ignore_eos=True),
                   SamplingParams(max_tokens=12, temperature=0.0, logit_bias=((3, 1.0),), ignore_eos=True),
                   SamplingParams(max_tokens=12, temperature=0.0, min_tokens=5)):  # EOS held off: the sampler bans it
        port = RecordingPort(runner)
        got = run(port, params, executor_argmax=True)
        assert got.token_ids == run(runner, params, executor_argmax=False).token_ids
        assert not any(argmax or own for _, argmax, own in port.sent), params


def test_off_by_default_until_measured(runner) -> None:
    assert Generator(runner, None, frozenset({2})).executor_argmax is False
    assert default_executor_argmax(torch.device("cpu")) is False
    assert default_executor_argmax(torch.device("cuda")) is EXECUTOR_ARGMAX_GPU


def test_the_executor_server_takes_the_flags_off_the_wire_and_files_the_token() -> None:
    """An ExecutorServer over a tiny model, driven over a real ZeroMQ channel from this thread: a Decode with argmax
    writes next_token and the shared ring slot of its position; own_input then runs on that token."""
    from graph_executor.loading.loader import LoadedModel
    from graph_executor.server import ExecutorServer
    from ipc.channel import bind_control, connect_control
    from ipc.messages import Decode, Prefill, StepDone
    from tests.test_doorbell import MAX_CONTEXT, tiny_model

    ctx = zmq.Context()
    address = f"inproc://control-{uuid.uuid4().hex}"
    channel = bind_control(ctx, address)
    control = connect_control(ctx, address)
    server = ExecutorServer(channel, LoadedModel(tiny_model(MAX_CONTEXT), "tiny", "dummy", None, 0.0, False),
                            supervisor_pid=None, quiet=True)
    try:
        b = server.shared.buffers
        # the JIT context's side puts the flags on the wire (RemoteExecutor over the same channel); its step is the
        # executor's first (step numbers increase over a JIT context's life: one run before would drop it as a copy)
        from jit_context.remote_executor import RemoteExecutor

        remote = RemoteExecutor(control, server.shared, MAX_CONTEXT, os.getpid())
        remote.request_id = "r"
        remote.decode(8, argmax=True, own_input=True)
        deadline = time.monotonic() + 5
        while not server.channel.poll(10):
            assert time.monotonic() < deadline
        got = server.next_command()
        assert (got[1].request_id, got[1].position, got[1].argmax, got[1].own_input) == ("r", 8, True, True)
        assert server.reply(server.dispatch(*got))
        remote.wait_enqueued()  # its StepDone came back
        b.input_ids[:4].copy_(torch.tensor([5, 6, 7, 8]))
        steps = [Prefill("r", 2, 4, 0), Decode("r", 3, 4, argmax=False), Decode("r", 4, 5, argmax=True),
                 Decode("r", 5, 6, argmax=True, own_input=True)]
        b.next_token.fill_(9)
        for msg in steps:
            control.send(msg)
            deadline = time.monotonic() + 5
            while not server.channel.poll(10):
                assert time.monotonic() < deadline
            got = server.next_command()
            assert got == (None, msg)  # as sent: the flags crossed the wire
            assert server.dispatch(*got) == StepDone("r", msg.step)
            if isinstance(msg, Decode) and msg.argmax:
                want = int(torch.argmax(b.logits))
                assert int(b.next_token[0]) == want == int(b.token_ring[msg.position % TOKEN_RING]), msg
        # own_input is trusted (no wait for the JIT context's event) only right after the argmax decode before it
        assert server.own_input_trusted(Decode("r", 6, 7, own_input=True))
        for other in (Decode("r", 6, 8, own_input=True), Decode("q", 6, 7, own_input=True), Decode("r", 6, 7)):
            assert not server.own_input_trusted(other), other
        server.dispatch(None, Decode("r", 6, 7, argmax=False, own_input=True))  # not an argmax decode: the chain ends
        assert not server.own_input_trusted(Decode("r", 7, 8, own_input=True))
    finally:
        control.close()
        channel.close()
        server.close()
        ctx.term()


@pytest.mark.cuda
def test_on_a_gpu_the_graph_runner_s_tokens_are_the_sampler_s() -> None:
    """GraphRunner.decode(argmax=True): the argmax kernel after the decode step (its position read from the graph's
    buffer), eager, after the captured decode graph, or inside ARGMAX_GRAPH (which moves the position on itself: the
    host fills it only for a step at another position, here each request's first after the other's last): the same
    tokens as the JIT context's sampling, every ring slot as filed."""
    from graph_executor.graphs import ARGMAX_GRAPH, GraphRunner

    model = tiny_runner(max_context=96, device="cuda").model
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    for capture in ((), ("decode",), ("decode", ARGMAX_GRAPH), (ARGMAX_GRAPH,)):
        graphs = GraphRunner(model)
        for name in capture:
            graphs.capture(name)
        reference = run(graphs, params, executor_argmax=False, ahead=2)
        port = RecordingPort(graphs)
        got = run(port, params, executor_argmax=True, ahead=2)
        assert got.token_ids == reference.token_ids and all(argmax for _, argmax, _ in port.sent), capture
        n = len(PROMPT)
        for k in range(30 - TOKEN_RING, 30):
            assert int(graphs.buffers.token_ring[(n + k - 1) % TOKEN_RING]) == reference.token_ids[k], capture
        again = run(graphs, params, executor_argmax=False, ahead=1)  # after the position moved on by the graph
        assert again.token_ids == reference.token_ids, capture
        # a capture after decoding: its warm-up and upload runs start at the cache's last row (the argmax graph's
        # advance leaves the buffer one past it, read by nothing), and the host's tracking of the position is reset
        tracked = graphs._position_after
        graphs.capture("extend_16" if ARGMAX_GRAPH in capture else ARGMAX_GRAPH)
        torch.cuda.synchronize()
        assert int(graphs.static.position) == 96 - 1 + (ARGMAX_GRAPH not in capture), capture
        graphs.decode(tracked)
        torch.cuda.synchronize()
        assert int(graphs.static.position) == tracked, capture
