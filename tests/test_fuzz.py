"""A seeded sample of hostile native frames and HTTP requests against a real `hybridrt serve` (CPU): after every
batch both children must be alive and a normal request must give the same ids as before; no HTTP answer may
be a 5xx. The full run (10,000 frames, 5,000 HTTP requests) is `python -m tests.fuzz`."""

from __future__ import annotations

import pytest

from tests.fuzz import Fuzzer, dead_process, reference_request, runtime_pids
from tests.serve_process import ServeProcess

SEED = 20261130
FRAMES, HTTP_REQUESTS = 800, 200


@pytest.fixture(scope="module")
def server(default_model_dir):
    with ServeProcess() as server:
        yield server
    assert server.proc.returncode == 0, server.proc.stderr.read()


def test_fuzzed_frames_and_http_requests_never_take_the_server_down(server) -> None:
    expected = reference_request(server.address)
    pids = runtime_pids(server.address)

    def healthy() -> str | None:
        if (dead := dead_process(server.proc, pids)) is not None:
            return dead
        got = reference_request(server.address)
        return None if got == expected else f"the reference request changed: {got} != {expected}"

    fuzzer = Fuzzer(server.address, server.http, healthy, SEED)
    try:
        fuzzer.native(FRAMES)
        fuzzer.http(HTTP_REQUESTS)
    finally:
        fuzzer.close()
    assert fuzzer.sent == {"native": FRAMES, "http": HTTP_REQUESTS}
    assert not fuzzer.failures, "\n".join(fuzzer.failures[:10])
