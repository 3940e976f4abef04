"""Cost of one control message on the wire: encode + decode of a Decode and a StepDone, as the control
channel does them (structural decode between the two processes) and as the client socket does them (full
validation), against plain msgpack of the same fields. Run: `python -m bench.probes.codec_cost`.
"""

from __future__ import annotations

import inspect
import time

import msgpack

from ipc import codec
from ipc.messages import Decode, StepDone


def _per_call_us(fn, n: int = 20000) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n * 1e6)
    return best


def main() -> None:
    trusted = "trusted" in inspect.signature(codec.decode).parameters
    rows = []
    for msg in (Decode("req-0001", 17, 300), StepDone("req-0001", 17)):
        name = type(msg).__name__
        plain = [msg.TAG, dict(msg.__dict__)]
        rows.append((name, "plain msgpack", _per_call_us(lambda: msgpack.unpackb(msgpack.packb(plain)))))
        rows.append((name, "full validation", _per_call_us(lambda: codec.decode(codec.encode(msg)))))
        if trusted:
            rows.append((name, "control channel",
                         _per_call_us(lambda: codec.decode(codec.encode(msg), trusted=True))))
    for name, how, us in rows:
        print(f"{name:9s} {how:16s} {us:6.2f} us per encode+decode")


if __name__ == "__main__":
    main()
