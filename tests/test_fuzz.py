"""A seeded sample of hostile native frames and HTTP requests against a real `hybridrt serve` (CPU): after every
batch both children must be alive and a normal request must give the same ids as before; no HTTP answer may
be a 5xx. The full run (10,000 frames, 5,000 HTTP requests) is `python -m tests.fuzz`; the suite's sample (400 frames,
100 HTTP requests, ~12 s on 2 cores) keeps the whole CPU suite near issue 8's 4 minutes."""

from __future__ import annotations

from tests.fuzz import fuzz_server

SEED = 20261130
FRAMES, HTTP_REQUESTS = 400, 100


def test_fuzzed_frames_and_http_requests_never_take_the_server_down(shared_server) -> None:
    """On the session's plain server (conftest), which test_runtime.py and test_http_api.py use too, and which must
    still exit 0 on SIGTERM at the end of the session."""
    fuzzer, alive = fuzz_server(shared_server, FRAMES, HTTP_REQUESTS, SEED)
    assert alive
    assert fuzzer.sent == {"native": FRAMES, "http": HTTP_REQUESTS}
    assert not fuzzer.failures, "\n".join(fuzzer.failures[:10])
