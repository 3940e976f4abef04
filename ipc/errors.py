"""User-facing errors shared by every process: one line, no stack trace for the user."""

import sys
from pathlib import Path


def report_fatal(message: str, error_file: str | None) -> None:
    """A child process's last word before it exits: into the error file its supervisor reads (and reports once, as
    the cause), or, run on its own, one `error:` line on stderr."""
    if error_file:
        try:
            Path(error_file).write_text(message)
            return
        except OSError:
            pass  # the supervisor's dir is gone: say it here instead
    print(f"error: {message}", file=sys.stderr)


class HybridrtError(Exception):
    """An error caused by the user's input or environment; the CLI prints `error: <message>` and exits 1."""


class ModelLoadError(HybridrtError):
    """The model could not be found, parsed or loaded (bad path, unsupported architecture, shape mismatch)."""


class DeviceError(HybridrtError):
    """The requested device or dtype is not available here."""


class ProtocolError(HybridrtError):
    """A frame that is not a valid message of this protocol; `code` says how (an `Error` reply carries it)."""

    CODES = ("malformed", "unknown_type", "oversized", "bad_fields")

    def __init__(self, code: str, detail: str):
        if code not in self.CODES:
            raise ValueError(f"unknown protocol error code {code!r}; expected one of {self.CODES}")
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class ChannelError(HybridrtError):
    """A socket could not be bound or connected, or was used after it was closed."""


class PeerUnreachableError(ChannelError):
    """A routed reply found no peer: the client disconnected, or stopped reading and its queue is full."""


class SharedTensorError(HybridrtError):
    """A shared tensor could not be created or opened (segment missing, too small, out of shared memory)."""
