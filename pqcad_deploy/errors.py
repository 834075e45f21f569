"""One error family for the PyTorch stage.

Every error a user can cause (a bad path, a bad option, a model we cannot handle) is raised as a
subclass of :class:`PqcadError` with one sentence that names the argument, the value and what to do.
The CLI turns these into one line on stderr and a non-zero exit; anything else is a bug.
"""

from __future__ import annotations

__all__ = [
    "PqcadError",
    "ModelLoadError",
    "ConfigError",
    "ArtifactError",
    "ExportError",
    "OutputPathError",
    "CheckpointError",
]


class PqcadError(Exception):
    """Base class of every user-facing error of pqcad_deploy and converters."""


class ModelLoadError(PqcadError):
    """The model directory is missing, corrupt, or not a diffusers UNet2DModel."""


class ConfigError(PqcadError):
    """An option has a value we do not support."""


class ArtifactError(PqcadError):
    """A compressed artifact is missing, corrupt, or of a format/version we cannot read."""


class ExportError(PqcadError):
    """The artifact cannot be exported as asked (e.g. 4-bit activations below opset 21)."""


class OutputPathError(PqcadError):
    """An output location cannot be written."""


class CheckpointError(PqcadError):
    """A compress checkpoint is unreadable, corrupt, or of a format/version we cannot read."""
