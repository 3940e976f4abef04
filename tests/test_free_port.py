"""ipc.free_port: a port a listener binds later, never one the kernel hands to outgoing connections."""

from __future__ import annotations

import socket

import pytest

from ipc import free_port as fp


def test_the_port_is_below_the_ephemeral_range_and_binds() -> None:
    low, _ = fp.ephemeral_range()
    ports = {fp.free_port() for _ in range(20)}
    for port in ports:
        assert fp.LOWEST <= port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    assert len(ports) > 1  # random picks, not one fixed port that parallel test workers would share


def test_a_taken_port_is_not_chosen(monkeypatch) -> None:
    low, _ = fp.ephemeral_range()
    with socket.socket() as held:
        held.bind(("127.0.0.1", fp.LOWEST))
        picks = iter([fp.LOWEST, fp.LOWEST + 1])
        monkeypatch.setattr(fp.random.Random, "randrange", lambda self, a, b: next(picks))
        assert fp.free_port() == fp.LOWEST + 1


def test_a_low_ephemeral_range_falls_back_to_the_kernels_choice(monkeypatch, tmp_path) -> None:
    ranges = tmp_path / "range"
    ranges.write_text("10500\t60999\n")
    monkeypatch.setattr(fp, "RANGE_FILE", ranges)
    assert fp.ephemeral_range() == (10500, 60999)
    assert fp.free_port() >= 10500  # the kernel's: inside the range, which is all there is
    monkeypatch.setattr(fp, "RANGE_FILE", tmp_path / "missing")
    assert fp.ephemeral_range() == (49152, 65535)


def test_no_free_port_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(fp.random.Random, "randrange", lambda self, a, b: fp.LOWEST)
    with socket.socket() as held:
        held.bind(("127.0.0.1", fp.LOWEST))
        with pytest.raises(OSError, match="no free TCP port"):
            fp.free_port(attempts=3)
