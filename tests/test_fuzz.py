"""A seeded sample of hostile native frames and HTTP requests against a real `hybridrt serve` (CPU): after every
batch both children must be alive and a normal request must give the same ids as before; no HTTP answer may
be a 5xx. The full run (10,000 frames, 5,000 HTTP requests) is `python -m tests.fuzz`."""

from __future__ import annotations

import pytest

from tests.fuzz import fuzz_server
from tests.serve_process import ServeProcess

SEED = 20261130
FRAMES, HTTP_REQUESTS = 800, 200


@pytest.fixture(scope="module")
def server(default_model_dir):
    with ServeProcess() as server:
        yield server
    assert server.proc.returncode == 0, server.proc.stderr.read()


def test_fuzzed_frames_and_http_requests_never_take_the_server_down(server) -> None:
    fuzzer, alive = fuzz_server(server, FRAMES, HTTP_REQUESTS, SEED)
    assert alive
    assert fuzzer.sent == {"native": FRAMES, "http": HTTP_REQUESTS}
    assert not fuzzer.failures, "\n".join(fuzzer.failures[:10])
