"""User-facing errors shared by every process: one line, no stack trace for the user."""


class HybridrtError(Exception):
    """An error caused by the user's input or environment; the CLI prints `error: <message>` and exits 1."""


class ModelLoadError(HybridrtError):
    """The model could not be found, parsed or loaded (bad path, unsupported architecture, shape mismatch)."""


class DeviceError(HybridrtError):
    """The requested device or dtype is not available here."""
