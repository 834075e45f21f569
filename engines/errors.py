"""The error family of the torch-free runtime.

Every failure a user can cause (a foreign ONNX, an edited engine, a missing backend, an unwritable
output directory) is raised as an :class:`EngineError` subclass whose message is one sentence saying
what to do. The CLI catches ``EngineError`` (and the PyTorch side's ``PqcadError``) and prints the
message as one line, so these messages are the user interface: keep them specific, with the path or
value and what is allowed.
"""

from __future__ import annotations

__all__ = [
    "EngineError",
    "ManifestError",
    "EngineDirectoryError",
    "BackendUnavailableError",
    "BuildError",
    "RunnerError",
    "ConfigError",
    "OutputError",
]


class EngineError(Exception):
    """Base class of every error raised by ``engines``; the CLI turns it into one line."""


class ManifestError(EngineError):
    """An ONNX or engine manifest is missing, unreadable, foreign, of unknown format or too new."""


class EngineDirectoryError(EngineError):
    """An engine directory fails verification (missing files, checksum mismatch)."""


class BackendUnavailableError(EngineError):
    """An optional backend (onnxruntime, tensorrt, cuda-python) cannot be imported here."""


class BuildError(EngineError):
    """Building an engine directory failed; nothing valid-looking was left behind."""


class RunnerError(EngineError):
    """A runner was misused (not active) or fed inputs that do not match the manifest."""


class ConfigError(EngineError):
    """A scheduler config or sampling argument is outside what the runtime supports."""


class OutputError(EngineError):
    """Images or arrays could not be written where the user asked."""
