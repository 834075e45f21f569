"""The runner template every backend follows (after Polygraphy's ``backend/base/runner.py``).

Public ``activate / infer / deactivate`` do the checks once for all backends (is the runner active,
do the inputs match the manifest's names, dtypes and shapes) and record timing; a backend only
implements ``activate_impl / infer_impl / deactivate_impl``. Inputs and outputs are plain
``name -> numpy array`` dicts, so the sampler never knows which backend it drives.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from types import TracebackType

import numpy as np

from .errors import RunnerError
from .manifest import OnnxManifest

__all__ = ["Runner", "zero_feed"]


class Runner(ABC):
    """Base class: a context manager that runs one model described by an :class:`OnnxManifest`.

    Attributes:
        manifest: the model's ONNX manifest (input names, image shape, output name).
        name: a label for messages.
        last_inference_time: seconds spent inside the last ``infer_impl`` call, or None.
    """

    def __init__(self, manifest: OnnxManifest, name: str) -> None:
        self.manifest = manifest
        self.name = name
        self.is_active = False
        self.last_inference_time: float | None = None

    # --- public template -------------------------------------------------------------------------
    def activate(self) -> None:
        """Load the model (sessions, engines, device buffers). Idempotent activation is refused.

        Raises:
            RunnerError: already active.
        """
        if self.is_active:
            raise RunnerError(f"Runner {self.name} is already active; call deactivate() first.")
        self.activate_impl()
        self.is_active = True

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model once on ``feed`` and return ``{output_name: array}``.

        Raises:
            RunnerError: not active, or inputs that do not match the manifest.
        """
        if not self.is_active:
            raise RunnerError(f"Runner {self.name} is not active; use it as a context manager or call activate() first.")
        self.check_feed(feed)
        start = time.perf_counter()
        outputs = self.infer_impl(feed)
        self.last_inference_time = time.perf_counter() - start
        out = self.manifest.output_name
        if out not in outputs:
            raise RunnerError(f"Runner {self.name} returned {sorted(outputs)} but not the manifest's output {out!r}; rebuild the engine.")
        return outputs

    def deactivate(self) -> None:
        """Release everything :meth:`activate` acquired; a no-op when not active."""
        if not self.is_active:
            return
        try:
            self.deactivate_impl()
        finally:
            self.is_active = False

    def check_feed(self, feed: dict[str, np.ndarray]) -> None:
        """Check names, dtypes and shapes against the manifest's graph inputs: ``sample`` float32
        ``[B, C, H, W]``, ``timestep`` float32 ``[B]``, and a conditional model's input (``class_labels``
        int64 ``[B]``), every one with the batch of ``sample``.

        Raises:
            RunnerError: naming the input, what it got and what is expected.
        """
        inputs = self.manifest.graph_inputs
        expected = {i.name for i in inputs}
        if set(feed) != expected:
            raise RunnerError(f"Runner {self.name} expects inputs {sorted(expected)}, got {sorted(feed)}.")
        for spec in inputs:
            arr = feed[spec.name]
            if not isinstance(arr, np.ndarray) or arr.dtype != spec.np_dtype:
                got = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
                raise RunnerError(f"Input {spec.name!r} must be a {spec.dtype} numpy array, got {got}.")
        sample = feed["sample"]
        c, h, w = self.manifest.image_shape
        if sample.ndim != 4 or tuple(sample.shape[1:]) != (c, h, w) or sample.shape[0] < 1:
            raise RunnerError(f"Input 'sample' must have shape [batch, {c}, {h}, {w}], got {list(sample.shape)}.")
        batch = sample.shape[0]
        for spec in inputs[1:]:
            arr = feed[spec.name]
            if tuple(arr.shape) != spec.shape(batch):
                raise RunnerError(f"Input {spec.name!r} must have shape {spec.shape_text(batch)} (one per sample), "
                                  f"got {list(arr.shape)}.")

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.deactivate()

    # --- backend hooks ---------------------------------------------------------------------------
    @abstractmethod
    def activate_impl(self) -> None:
        """Load the model / create the session."""

    @abstractmethod
    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; `feed` has already been checked against the manifest."""

    @abstractmethod
    def deactivate_impl(self) -> None:
        """Release the session and its memory."""


def zero_feed(manifest: OnnxManifest, batch: int = 1) -> dict[str, np.ndarray]:
    """A feed of ``batch`` rows for a build's smoke test: zero noise, the student's first timestep, and
    zeros for a conditional model's input (label 0, a class of every class-conditional model)."""
    feed = {i.name: np.zeros(i.shape(batch), i.np_dtype) for i in manifest.graph_inputs}
    feed["timestep"] = np.full((batch,), manifest.student_timesteps[0], np.float32)
    return feed
