"""The step doorbell: a page of shared memory that carries the hot control messages (Prefill, Decode, Verify and
their StepDone, and a request's Reset) between the JIT context and the graph executor without a ZeroMQ hop.

Why: on the H200 host a ZeroMQ message between the two processes takes ~0.3-0.6 ms (two I/O-thread wake-ups
on a VM), a shared-memory write seen by a spinning reader well under 1 us (bench/NOTES.md). Plain decode hides
the message behind the steps in flight, but a speculative verify step (its proposals need the previous step's
accepted tokens on the host) and a prefill (TTFT) wait for it.

ZeroMQ stays the reliable path and carries everything else. The rules that make the pair safe:
- The JIT context rings the command bell, then also sends the message over ZeroMQ unless the executor has
  promised to watch the bell for a while yet (`listening`): an idle executor sleeps in a poll of its ZeroMQ socket
  and of the bell's wake pipe (a FIFO beside the file), and the JIT context writes one byte to the pipe before the
  ZeroMQ copy. The byte wakes the executor's thread directly; the ZeroMQ copy needs three thread wake-ups (the
  sender's I/O thread, the receiver's, then the receiver itself): after 50 ms or more of idle that path took
  ~1.4 ms from the request's arrival until the executor had the prefill queued, against 0.4 ms back to back (H200
  host, `bench.probes.idle_gap`). The pipe only wakes: what runs is the rung command, once, as below.
- The executor runs a step at most once. Step numbers increase over the JIT context's life (`RemoteExecutor` counts
  them), so a command numbered at or below the last step it ran is a copy from the other path, and is dropped. Not
  only the last step's copy: one sent beside a step rung while the executor was waking can arrive after that step
  was answered on the bell and the next one (or the next request's first) rung and taken.
- A request's end (Reset) is rung with no ZeroMQ copy (a wake byte if the executor does not listen) and nothing
  waits for it; the executor answers it on the done bell. The next command rung replaces it if the executor has not
  taken it yet, which loses nothing (that command is the next request's step: the executor stays busy, right while
  it runs).
  The executor reads the bell before ZeroMQ (`rung_copy` holds a ZeroMQ message while the bell has an untaken
  command that is not its copy), so the Reset is never read after a step the JIT context sent later.
- The executor answers a step that was rung on the done bell (its status too, an Error also goes over ZeroMQ),
  any other step with a ZeroMQ StepDone. The JIT context waits for either.

Layout (one 4 KiB file in the launch's private runtime dir, little-endian int64 fields):
- command, at 0: seq, length, crc, then `length` bytes of the message as the codec encodes it.
- done, at 512: seq (the command it answers), status (1 ok, 2 failed), crc, then a count and up to
  MAX_VALUES int64 values (a greedy verify step's accepted tokens, `Verify.accept`), which the crc covers.
- listening, at 1024: a CLOCK_MONOTONIC deadline in ns and its complement (a torn read is "not listening").

Each writer writes the payload and its crc before the seq; a reader takes a record only when the crc over
(seq, payload) holds, so a torn read (a write in progress, or any store order the CPU chooses) is retried,
never used. There is one writer per record.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
import zlib
from pathlib import Path
from typing import NamedTuple

from ipc.codec import decode, encode
from ipc.messages import Message

MODES = ("auto", "on", "off")  # the executor's --doorbell: auto is on where the device is a GPU
SIZE = 4096
_COMMAND, _DONE, _LISTEN = 0, 512, 1024
_HEADER = struct.Struct("<qqq")  # seq, length or status, crc
MAX_PAYLOAD = _DONE - _HEADER.size  # an encoded step message is ~40-100 bytes; longer ones go over ZeroMQ only
OK, FAILED = 1, 2
MAX_VALUES = 16  # values an answer carries (a verify's k + 1 tokens and the count accepted: <= 10)
_COUNT = struct.Struct("<q")
_MASK = (1 << 64) - 1
LISTEN_MARGIN_NS = 1_000_000  # the JIT context skips ZeroMQ only while the executor listens this much longer
WAKE_SUFFIX = ".wake"  # the wake pipe: a FIFO beside the doorbell file


def _crc(seq: int, value: int, payload: bytes = b"") -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack("<qq", seq, value)))


class Answer(NamedTuple):
    status: int  # OK or FAILED
    values: tuple[int, ...]  # what the step returns on the bell (empty for most steps)


class Doorbell:
    """One side's view of the doorbell file (`create` by the executor, `open` by the JIT context)."""

    def __init__(self, path: Path, fd: int, owner: bool = False) -> None:
        self.path = path
        self.owner = owner  # created it: removes the file (and the wake pipe) on close
        try:
            self._map = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)
        self._seq = 0  # the JIT context's last command seq
        self.taken = 0  # the executor's last command seq taken (from the bell or matched to a ZeroMQ copy)
        # the wake pipe's read end (the executor's; None without one) and write end (the JIT context's, opened at
        # its first wake: None when there was none to open)
        self.wake_fd: int | None = None
        self._wake_w: int | None = None
        self._wake_opened = False

    @property
    def wake_path(self) -> Path:
        return self.path.with_name(self.path.name + WAKE_SUFFIX)

    @classmethod
    def create(cls, path: str | os.PathLike) -> Doorbell:
        """A fresh doorbell file (0600, never an existing one) and its wake pipe, whose read end this side polls."""
        path = Path(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, SIZE)
        except BaseException:
            os.close(fd)
            raise
        bell = cls(path, fd, owner=True)
        try:
            os.mkfifo(bell.wake_path, 0o600)
            # O_RDWR keeps a writer open on our side: the pipe never reads as hung up between two JIT writers
            bell.wake_fd = os.open(bell.wake_path, os.O_RDWR | os.O_NONBLOCK)
        except BaseException:
            bell.close()
            raise
        return bell

    @classmethod
    def open(cls, path: str | os.PathLike) -> Doorbell:
        path = Path(path)
        fd = os.open(path, os.O_RDWR)
        if os.fstat(fd).st_size != SIZE:
            os.close(fd)
            raise ValueError(f"{path} is not a doorbell ({SIZE} bytes)")
        return cls(path, fd)

    def close(self) -> None:
        for fd in (self.wake_fd, self._wake_w):
            if fd is not None:
                os.close(fd)
        self.wake_fd, self._wake_w, self._wake_opened = None, None, True
        if not self._map.closed:
            self._map.close()
            if self.owner:
                self.path.unlink(missing_ok=True)
                self.wake_path.unlink(missing_ok=True)

    # -- JIT context: ring, wait -------------------------------------------------------------------------

    def ring(self, msg: Message) -> int | None:
        """Write a command (a step, or a request's Reset); its seq, or None when it does not fit (it must then go over
        ZeroMQ only)."""
        payload = encode(msg)
        if len(payload) > MAX_PAYLOAD:
            return None
        seq = self._seq + 1
        start = _COMMAND + _HEADER.size
        self._map[start:start + len(payload)] = payload
        struct.pack_into("<qq", self._map, _COMMAND + 8, len(payload), _crc(seq, len(payload), payload))
        struct.pack_into("<q", self._map, _COMMAND, seq)  # last: the reader looks at the seq first
        self._seq = seq
        return seq

    def wake(self) -> None:
        """Wake an executor sleeping in its poll (one byte into the wake pipe), never blocking: without a pipe (an
        executor that made none), with none reading it or with the pipe full, nothing happens, and the command's
        ZeroMQ copy, which the caller sends next, wakes it as before."""
        if not self._wake_opened:
            self._wake_opened = True
            try:
                self._wake_w = os.open(self.wake_path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENOENT: no pipe; ENXIO: no reader (an executor that closed it)
                return
        if self._wake_w is None:
            return
        try:
            os.write(self._wake_w, b"\1")
        except OSError:  # EAGAIN: full of wakes not yet drained, so the executor is awake anyway; EPIPE: gone
            pass

    def answered(self, seq: int) -> Answer | None:
        """The executor's answer to command `seq` once it has answered, else None."""
        done, status, crc = _HEADER.unpack_from(self._map, _DONE)
        if done != seq:
            return None
        start = _DONE + _HEADER.size
        (count,) = _COUNT.unpack_from(self._map, start)
        if not 0 <= count <= MAX_VALUES:
            return None  # torn
        payload = self._map[start:start + _COUNT.size * (count + 1)]
        if crc != _crc(done, status, payload):
            return None
        return Answer(status, struct.unpack_from(f"<{count}q", payload, _COUNT.size))

    def listening(self, now_ns: int | None = None) -> bool:
        """Whether the executor promised to watch the bell for at least LISTEN_MARGIN_NS more."""
        deadline, check = struct.unpack_from("<qq", self._map, _LISTEN)
        if deadline ^ check != -1:  # torn, or never written
            return False
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        return now_ns + LISTEN_MARGIN_NS < deadline

    # -- executor: take, answer, listen ------------------------------------------------------------------

    def peek(self) -> tuple[int, Message] | None:
        """The command rung and not taken yet (seq, message), or None (nothing new, or a write in progress)."""
        seq, length, crc = _HEADER.unpack_from(self._map, _COMMAND)
        if seq <= self.taken or not 0 < length <= MAX_PAYLOAD:
            return None
        start = _COMMAND + _HEADER.size
        payload = self._map[start:start + length]
        if crc != _crc(seq, length, payload):
            return None
        return seq, decode(payload, trusted=True)

    def take(self) -> tuple[int, Message] | None:
        """`peek`, marking the command taken."""
        got = self.peek()
        if got is not None:
            self.taken = got[0]
        return got

    def answer(self, seq: int, status: int, values: tuple[int, ...] | list[int] = ()) -> None:
        if len(values) > MAX_VALUES:
            raise ValueError(f"a doorbell answer carries at most {MAX_VALUES} values, got {len(values)}")
        payload = struct.pack(f"<q{len(values)}q", len(values), *values)
        self._map[_DONE + _HEADER.size:_DONE + _HEADER.size + len(payload)] = payload
        struct.pack_into("<qq", self._map, _DONE + 8, status, _crc(seq, status, payload))
        struct.pack_into("<q", self._map, _DONE, seq)

    def drain_wake(self) -> None:
        """Empty the wake pipe (after the poll said it was readable): one wake per sleep, however many bytes. A byte
        written while the executor was still spinning (its promise within the JIT context's margin of running out)
        stays until its next sleep, which it then ends at once: one spin of SPIN_US for nothing, never a lost step."""
        if self.wake_fd is None:
            return
        try:
            while os.read(self.wake_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def listen_until(self, deadline_ns: int) -> None:
        """Promise to look at the bell until `deadline_ns` (CLOCK_MONOTONIC) before sleeping in a ZeroMQ poll."""
        struct.pack_into("<qq", self._map, _LISTEN, deadline_ns, ~deadline_ns)
