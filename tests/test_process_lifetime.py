"""Process lifetime on real processes and sockets: children never outlive the supervisor (`serve` or
`generate` killed with SIGKILL leaves no process, segment or runtime directory within 3 s), and a hung executor
fails the request after the step time-out while the server stays up (a JIT context that dies is reported to
native clients within 2 s: test_runtime_faults.py). GPU variants (marked cuda) also check that nvidia-smi shows
the memory freed and that the MPS daemon is gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ipc.liveness import process_alive
from ipc.runtime_dir import default_base
from launch.client import Client, ServerError
from tests.serve_process import ServeProcess, child_pids, free_port, shm_segments

LONG = {"max_tokens": 2000, "ignore_eos": True, "temperature": 0.0}  # minutes on CPU: always cut short here
GONE_WITHIN_S = 3.0
STEP_TIMEOUT_S = 2.0


def descendants(pid: int) -> list[int]:
    """Every process started under pid (children in their own sessions included), from /proc."""
    found, todo = [], [pid]
    while todo:
        for child in child_pids(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def runtime_children_started(pid: int) -> bool:
    """Both runtime processes of supervisor pid exist (they may still be importing)."""
    lines = [_cmdline(p) for p in descendants(pid)]
    return all(any(f"-m {name}" in line for line in lines) for name in ("graph_executor", "jit_context"))


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def leftovers(supervisor_pid: int, pids: list[int]) -> list[str]:
    """What is still there of a dead supervisor: live processes, its executor's segments, its runtime dir."""
    left = [f"process {p} ({_cmdline(p)[:60]})" for p in pids if process_alive(p)]
    for p in pids:
        left += [f"segment {s}" for s in shm_segments() if s.startswith(f"hybridrt-{p}-")]
    left += [f"directory {d}" for d in default_base().glob(f"hybridrt-{supervisor_pid}-*")]
    return left


def wait_all_gone(supervisor_pid: int, pids: list[int], within_s: float = GONE_WITHIN_S) -> float:
    """Seconds until nothing of the supervisor is left; fails the test past within_s."""
    start = time.monotonic()
    while (left := leftovers(supervisor_pid, pids)) and time.monotonic() - start < within_s + 2:
        time.sleep(0.02)
    took = time.monotonic() - start
    assert not left, f"left after {took:.2f} s: {left}"
    assert took < within_s, f"cleaning up took {took:.2f} s"
    return took


def executor_and_jit(address: str) -> tuple[int, int]:
    with Client(address) as client:
        facts = client.status()
    return facts["executor"]["executor_pid"], facts["jit_context_pid"]


def stream_some(client: Client, n: int = 3):
    stream = client.generate(prompt="Tell me a long story.", params=LONG)
    for _ in range(n):
        next(stream)
    return stream


def drain_within(stream, deadline: float) -> None:
    """Read a stream to its end; fail the test if it is still going at `deadline` (monotonic)."""
    for _ in stream:
        if time.monotonic() > deadline:
            stream.close()
            pytest.fail("the request was still streaming")


def close_pipes(proc: subprocess.Popen) -> None:
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


@pytest.fixture(scope="module")
def server(default_model_dir):
    """One serve for the module: the hung-executor test leaves it serving, the SIGKILL test ends it."""
    server = ServeProcess("--step-timeout", str(STEP_TIMEOUT_S), http=False)
    try:
        server.wait_ready()
        with Client(server.address) as client:  # warm: a cold first prefill on a busy CPU may take seconds
            list(client.generate(prompt="Hi", params={"max_tokens": 2, "temperature": 0.0}))
        yield server
    finally:
        server.stop()
        close_pipes(server.proc)


def test_hung_executor_fails_the_request_after_the_step_timeout_and_the_server_recovers(server) -> None:
    executor, jit = executor_and_jit(server.address)
    with Client(server.address, timeout_s=10) as client:
        stream = stream_some(client)
        os.kill(executor, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            with pytest.raises(ServerError) as err:
                drain_within(stream, stopped + STEP_TIMEOUT_S + 3)
            failed_after = time.monotonic() - stopped
            assert "executor_timeout" in str(err.value), err.value
            assert STEP_TIMEOUT_S - 0.1 < failed_after < STEP_TIMEOUT_S + 3, failed_after
            # Still hung: the next request fails the same way, after one time-out, and the server stays up.
            with pytest.raises(ServerError) as err:
                list(client.generate(prompt="Hi", params={"max_tokens": 4, "temperature": 0.0}))
            assert "executor_timeout" in str(err.value), err.value
        finally:
            os.kill(executor, signal.SIGCONT)
        assert process_alive(jit) and server.proc.poll() is None
        # The executor works through the abandoned steps; their late replies are dropped as stale.
        *_, final = client.generate(prompt="Hi", params={"max_tokens": 4, "temperature": 0.0})
        assert final.finish_reason == "length" and len(final.token_ids) == 4
        assert client.status()["executor"]["executor_pid"] == executor
    print(f"\nhung executor: the request failed {failed_after:.2f} s after SIGSTOP (step time-out {STEP_TIMEOUT_S:g} s)")


def test_sigkill_of_serve_mid_request_leaves_nothing(server) -> None:
    executor, jit = executor_and_jit(server.address)
    pids = descendants(server.proc.pid)  # executor, JIT context, the reaper
    assert {executor, jit} <= set(pids)
    assert any(s.startswith(f"hybridrt-{executor}-") for s in shm_segments())
    assert list(default_base().glob(f"hybridrt-{server.proc.pid}-*"))
    with Client(server.address, timeout_s=10) as client:
        stream = stream_some(client)
        server.proc.kill()
        killed = time.monotonic()
        with pytest.raises(ServerError) as err:  # the request in flight is abandoned, and its client told
            drain_within(stream, killed + 2.0)
        told = time.monotonic() - killed
    assert err.value.code in ("shutting_down", "server_died"), err.value
    assert told < 2.0, told
    took = wait_all_gone(server.proc.pid, pids)
    print(f"\nSIGKILL of serve mid-request: client told in {told:.2f} s, nothing left after {took:.2f} s")


def test_sigkill_of_serve_at_start_up_leaves_nothing(default_model_dir) -> None:
    """Killed while its children import and load: they never finish starting."""
    server = ServeProcess(http=False)
    try:
        deadline = time.monotonic() + 30
        while not runtime_children_started(server.proc.pid):
            assert time.monotonic() < deadline and server.proc.poll() is None, "the children never started"
            time.sleep(0.01)
        time.sleep(0.5)  # importing torch
        pids = descendants(server.proc.pid)
        server.proc.kill()
        took = wait_all_gone(server.proc.pid, pids)
    finally:
        server.stop()
        close_pipes(server.proc)
    print(f"\nSIGKILL of serve at start-up: nothing left after {took:.2f} s")


def test_sigkill_of_generate_mid_request_leaves_nothing(default_model_dir) -> None:
    """The ephemeral pair of `hybridrt generate` dies with it, in the middle of streaming."""
    cmd = [sys.executable, "-m", "launch.cli", "generate", "--quiet", "--device", "cpu", "--max-tokens", "2000",
           "--ignore-eos", "Tell me a long story."]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
    try:
        assert proc.stdout.read(20), proc.stderr.read()  # tokens stream: the request is in flight
        assert runtime_children_started(proc.pid)
        pids = descendants(proc.pid)
        proc.kill()
        took = wait_all_gone(proc.pid, pids)
    finally:
        proc.kill()
        proc.wait()
        close_pipes(proc)
    print(f"\nSIGKILL of generate mid-request: nothing left after {took:.2f} s")


# -- GPU: the same kills, with CUDA memory and the MPS daemon ------------------------------------------------


def gpu_used_mib() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def gpu_compute_pids() -> set[int]:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                         capture_output=True, text=True, check=True).stdout
    return {int(p) for p in out.split() if p.strip().isdigit()}


def mps_processes() -> list[int]:
    return [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/cmdline")
            if b"nvidia-cuda-mps" in _read(p)]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


@pytest.mark.cuda
@pytest.mark.parametrize("command", ["serve", "generate"])
@pytest.mark.parametrize("moment", ["start-up", "capture", "request"])
def test_gpu_sigkill_frees_processes_mps_and_memory(request, command: str, moment: str) -> None:
    """start-up: while the children import and load; capture: serve just ready (it captures graphs while
    idle), generate once the weights are on the GPU; request: while tokens stream. The model is SmolLM2's
    shape with random weights and its real tokenizer ($HYBRIDRT_TEST_TOKENIZER on GPU machines without the
    default model's package)."""
    tokenizer = os.environ.get("HYBRIDRT_TEST_TOKENIZER") or str(request.getfixturevalue("default_model_dir"))
    model = ["--model", "dummy:smollm2-135m", "--tokenizer", tokenizer]
    mps_before = set(mps_processes())
    baseline = gpu_used_mib()
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    if command == "serve":
        cmd = ["serve", "--quiet", "--port", str(port), "--http-port", "0", "--device", "cuda", *model]
    else:
        cmd = ["generate", "--quiet", "--device", "cuda", *model, "--max-tokens", "100000", "--ignore-eos",
               "Tell me a long story."]
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=os.environ.copy())
    client = Client(address, timeout_s=30)
    try:
        deadline = time.monotonic() + 300
        while not runtime_children_started(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
            time.sleep(0.01)
        if moment == "start-up":
            time.sleep(1.0)
        elif command == "serve":
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
                try:
                    client.status(timeout_s=0.5)
                    break
                except ServerError:
                    pass
            if moment == "request":
                stream_some(client)
        elif moment == "capture":
            while gpu_used_mib() < baseline + 300:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
                time.sleep(0.02)
        else:
            assert proc.stdout.read(20), proc.stderr.read().decode()
        pids = descendants(proc.pid)
        proc.kill()
        killed = time.monotonic()
        wait_all_gone(proc.pid, pids)
        while (set(mps_processes()) - mps_before or gpu_used_mib() > baseline + 256) and \
                time.monotonic() - killed < GONE_WITHIN_S + 5:
            time.sleep(0.1)
        took = time.monotonic() - killed
        assert not set(mps_processes()) - mps_before, "the MPS daemon was left"
        assert gpu_used_mib() <= baseline + 256, f"{gpu_used_mib()} MiB used, {baseline} before"
        assert took < GONE_WITHIN_S, f"GPU memory freed only after {took:.2f} s"
    finally:
        client.close()
        proc.kill()
        proc.wait()
        close_pipes(proc)
    print(f"\n{command} killed at {moment}: processes, MPS and GPU memory gone after {took:.2f} s")


def test_after_a_child_died_an_executor_that_ignores_sigterm_is_killed_at_once() -> None:
    """The supervisor's crash path with real processes standing in for the children: one exits (the dead rank),
    an executor process that cannot run its SIGTERM handler (here: ignores SIGTERM, as one blocked in a collective
    with the dead rank does) and a JIT context that exits on SIGTERM. ChildDied comes after PEER_EXIT_GRACE_S; the
    stop that follows kills the executor CRASH_KILL_GRACE_S after its SIGTERM, not STOP_GRACE_S (CI saw the server
    end 7.2 s after a rank was killed)."""
    from graph_executor.loading.load_config import LoadConfig
    from launch.supervisor import (
        CRASH_KILL_GRACE_S,
        PEER_EXIT_GRACE_S,
        STOP_GRACE_S,
        ChildDied,
        ServerConfig,
        Supervisor,
    )

    ignore = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    killed = "import os; os.kill(os.getpid(), 9)"
    sup = Supervisor(ServerConfig(LoadConfig(model="dummy:smollm2-135m", device="cpu", progress=False)))
    try:
        sup.children = {"graph_executor": subprocess.Popen([sys.executable, "-c", ignore]),
                        "graph_executor rank 1": subprocess.Popen([sys.executable, "-c", killed]),
                        "jit_context": subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])}
        sup.children["graph_executor rank 1"].wait()
        time.sleep(0.5)  # the others are up (the executor has installed SIG_IGN)
        with pytest.raises(ChildDied, match="rank 1"):
            sup.check_children()
        start = time.monotonic()
    finally:
        sup.stop()
    took = time.monotonic() - start
    assert all(proc.poll() is not None for proc in sup.children.values())
    assert took < CRASH_KILL_GRACE_S + 1.0 < STOP_GRACE_S, took
    assert PEER_EXIT_GRACE_S < 3.0
