"""`hybridrt chat` as a user drives it, through pipes: history across turns, /reset, Ctrl-C cancelling a reply
while the REPL (and its ephemeral server) carries on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

CLI = [sys.executable, "-m", "launch.cli"]
# The Ctrl-C test's chat: Python's own SIGINT handler set first, as in a terminal. A child inherits an ignored SIGINT
# (and Python then leaves it ignored), and a non-interactive shell starts `cmd &` with SIGINT ignored: a suite run in
# the background (`.ci/run &`) made the chat ignore the test's Ctrl-C and finish its reply.
CHAT_WITH_SIGINT = [sys.executable, "-c", "import runpy, signal, sys; signal.signal(signal.SIGINT, "
                    "signal.default_int_handler); sys.argv[0] = 'hybridrt'; runpy.run_module('launch.cli', "
                    "run_name='__main__')"]


class Pipe:
    """A child process whose stdout and stderr are collected as they arrive."""

    def __init__(self, args: list[str]) -> None:
        # Its own process group, so that a terminal-style Ctrl-C (SIGINT to the whole group) can be sent.
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=os.environ.copy(), start_new_session=True)
        self.out, self.err = bytearray(), bytearray()
        self.readers = [threading.Thread(target=self._collect, args=(f, buf), daemon=True)
                        for f, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _collect(stream, buf: bytearray) -> None:
        while chunk := stream.read1(4096):
            buf.extend(chunk)

    def send(self, text: str) -> None:
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def wait_for(self, condition, what: str, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert self.proc.poll() is None, f"exited early ({what}): {self.err.decode()}"
            assert time.monotonic() < deadline, (f"timed out waiting for {what}: {self.err.decode()}; stdout "
                                                 f"{bytes(self.out)!r}; {self.signal_masks()}")
            time.sleep(0.01)

    def signal_masks(self) -> str:
        """The child's blocked, ignored and caught signal masks (SIGINT is bit 1 of each), for a failure's message."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                return " ".join(line.strip() for line in f if line.startswith(("SigBlk", "SigIgn", "SigCgt")))
        except OSError:
            return "(no /proc status)"

    def finish(self, timeout_s: float = 120.0) -> int:
        self.proc.stdin.close()
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise
        for reader in self.readers:
            reader.join(timeout=5)
        return code


def test_chat_keeps_history_resets_and_survives_ctrl_c(default_model_dir) -> None:
    # 14 tokens a reply (~0.1 s each on this CPU), each ending at its first newline (one line per reply): greedy, the
    # replies name Rex, or not, well within them
    chat = Pipe([*CHAT_WITH_SIGINT, "chat", "--device", "cpu", "--quiet", "--temperature", "0", "--max-tokens", "14",
                 "--stop", "\n"])
    try:
        chat.send("Tell me a story about a dragon.\n")
        chat.wait_for(lambda: chat.out, "the first reply to start")
        os.killpg(chat.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        chat.wait_for(lambda: b"[cancelled]" in chat.err, "the reply to be cancelled")
        # The cancelled turn is not in the history: the next answers are those of a fresh conversation.
        chat.send("I have a dog called Rex.\nWhat is my dog called?\n/reset\nWhat is my dog called?\n/exit\n")
        code = chat.finish()
    finally:
        if chat.proc.poll() is None:
            os.killpg(chat.proc.pid, signal.SIGKILL)
    stderr = chat.err.decode()
    assert code == 0, stderr
    assert "Traceback" not in stderr and "history cleared" in stderr
    cancelled, intro, recalled, after_reset = chat.out.decode().splitlines()  # one line per reply
    assert cancelled.strip()  # the part streamed before Ctrl-C
    assert "dragon" not in intro and "Rex" in intro
    assert "Rex" in recalled  # the second turn saw the first
    assert "Rex" not in after_reset  # /reset forgot it


def test_chat_help_lists_its_flags(capsys) -> None:
    from launch.cli import main

    with pytest.raises(SystemExit) as done:
        main(["chat", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--system", "--connect", "--max-tokens", "--temperature", "--model", "--device", "/reset", "/exit"):
        assert flag in out

