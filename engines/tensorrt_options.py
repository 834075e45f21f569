"""The options of a TensorRT build, and what they mean for the builder and for trtexec: pure functions.

Kept apart from :mod:`engines.tensorrt_build` because none of this needs TensorRT: the batch profile,
the precision builder flags a TensorRT version allows, and the equivalent ``trtexec`` command line
are decided here and tested everywhere, while the builder only applies them.

Precision: our ONNX carries explicit Q/DQ nodes, so a strongly typed build (the default) takes every
tensor's type from the graph and allows no precision flags. A weakly typed build needs TensorRT 10's
``BuilderFlag.INT8`` to honour the Q/DQ nodes (``FP16`` lets it run the float layers in half
precision); TensorRT 11 removed both flags with all of weak typing ("Removed Python APIs and
Replacements", docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-reference.html),
so there :meth:`TensorRTBuildOptions.builder_flags` refuses a weakly typed build.

trtexec flag names are those of NVIDIA/TensorRT samples/common/sampleOptions.cpp (10.3 and 11.1):
``--onnx``, ``--stronglyTyped`` (a no-op in 11, where strong typing is always on), ``--int8``,
``--fp16``, ``--minShapes/--optShapes/--maxShapes=name:AxBxC,...``, ``--memPoolSize=workspace:<n>M``
(MiB when no suffix; B/K/M/G accepted), ``--profilingVerbosity=detailed``, ``--saveEngine=<file>``,
``--exportLayerInfo=<file>``.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from .conditioning import ConditioningSpec
from .errors import BuildError
from .graph_inputs import GraphInput
from .manifest import OnnxManifest

__all__ = ["TRT_MODEL_FILE", "LAYER_REPORT_FILE", "WEAK_TYPING_FLAGS", "TensorRTBuildOptions", "trtexec_command"]

TRT_MODEL_FILE = "model.plan"
LAYER_REPORT_FILE = "layers.json"
"""The engine inspector's per-layer JSON, written next to the plan (what trtexec --exportLayerInfo writes)."""
WEAK_TYPING_FLAGS: tuple[str, ...] = ("INT8", "FP16")
"""The precision builder flags of a weakly typed build, in the order they are set."""

Shape = tuple[int, ...]


@dataclass(frozen=True)
class TensorRTBuildOptions:
    """How to build a plan (see the module docstring for the precision choices).

    Attributes:
        strongly_typed: types from the Q/DQ graph (default); False needs TensorRT 10.
        int8, fp16: the precision flags of a weakly typed build (ignored when strongly typed).
        workspace_gb: the builder's workspace memory pool limit in GiB.
        opt_batch, max_batch: the optimization profile's batch sizes in images per call (its minimum is 1;
            doubled in the profile for a model that guides, :meth:`profile_shapes`).

    Raises:
        BuildError: batch sizes outside ``1 <= opt_batch <= max_batch`` or a workspace <= 0.
    """

    strongly_typed: bool = True
    int8: bool = True
    fp16: bool = True
    workspace_gb: float = 2.0
    opt_batch: int = 8
    max_batch: int = 32

    def __post_init__(self) -> None:
        if not 1 <= self.opt_batch <= self.max_batch:
            raise BuildError(f"Batch sizes must satisfy 1 <= opt_batch <= max_batch, got opt_batch={self.opt_batch}, "
                             f"max_batch={self.max_batch}.")
        if not self.workspace_gb > 0:
            raise BuildError(f"workspace_gb must be positive, got {self.workspace_gb}.")

    @property
    def workspace_bytes(self) -> int:
        """The workspace pool limit in bytes (what ``set_memory_pool_limit`` takes)."""
        return int(self.workspace_gb * (1 << 30))

    def profile_shapes(self, image_shape: tuple[int, int, int],
                       conditioning: ConditioningSpec | None = None) -> dict[str, tuple[Shape, Shape, Shape]]:
        """``{input: (min, opt, max)}`` for every graph input, all with one batch range.

        The range is 1 / opt_batch / max_batch images per call. A conditional model that can guide (it
        has an unconditional branch) runs each call on the unconditional and conditional copies of the
        batch, [uncond, cond] (engines.guidance), so its model batch is twice the images: opt and max
        are doubled, for ``sample``, ``timestep`` and the conditioning input alike (TensorRT needs a
        profile entry for every dynamic input, and they share the batch axis).
        """
        per_call = 2 if conditioning is not None and conditioning.can_guide else 1
        batches = (1, self.opt_batch * per_call, self.max_batch * per_call)
        inputs = [GraphInput("sample", "float32", image_shape), GraphInput("timestep", "float32")]
        if conditioning is not None:
            inputs.append(conditioning.input)
        return {i.name: tuple(i.shape(b) for b in batches) for i in inputs}  # type: ignore[misc]

    def builder_flags(self, available: Collection[str], tensorrt_version: str) -> tuple[str, ...]:
        """The ``BuilderFlag`` names to set: none when strongly typed, else the requested INT8 / FP16.

        Args:
            available: the names this TensorRT's ``BuilderFlag`` has (``trt.BuilderFlag.__members__``).
            tensorrt_version: ``trt.__version__``, for the message.

        Raises:
            BuildError: a weakly typed build on a TensorRT without INT8 / FP16 flags (TensorRT 11).
        """
        if self.strongly_typed:  # TensorRT refuses precision flags on a strongly typed network
            return ()
        missing = [f for f in WEAK_TYPING_FLAGS if f not in available]
        if missing:
            raise BuildError(f"strongly_typed=False needs TensorRT's weak-typing builder flags, and TensorRT "
                             f"{tensorrt_version} has no BuilderFlag.{' / '.join(missing)} (TensorRT 11 removed weak "
                             "typing); build strongly typed (the default), which takes INT8 from the ONNX's Q/DQ nodes.")
        return tuple(f for f, wanted in zip(WEAK_TYPING_FLAGS, (self.int8, self.fp16)) if wanted)


def _shape_spec(shapes: dict[str, Shape]) -> str:
    """trtexec's ``name:AxBxC,name2:D`` form."""
    return ",".join(f"{name}:{'x'.join(map(str, shape))}" for name, shape in shapes.items())


def trtexec_command(onnx_path: str | os.PathLike[str], engine_dir: str | os.PathLike[str], manifest: OnnxManifest,
                    options: TensorRTBuildOptions) -> str:
    """The trtexec command line that builds the plan :func:`engines.tensorrt_build.build_tensorrt_engine` builds.

    It writes the plan and the layer report where build-engine does (``engine_dir/model.plan``,
    ``engine_dir/layers.json``), so an engine can be rebuilt, or its latency measured, with NVIDIA's
    tool alone. Paths are shell-quoted where needed.

    Args:
        onnx_path: the ONNX, as the user named it.
        engine_dir: the engine directory, as the user named it.
        manifest: the ONNX's manifest (its image shape sets the profile's shapes).
        options: the build options.
    """
    profile = options.profile_shapes(manifest.image_shape, manifest.conditioning)
    precision = ["--stronglyTyped"] if options.strongly_typed else [
        f"--{flag.lower()}" for flag in options.builder_flags(WEAK_TYPING_FLAGS, "10")]
    mib, rest = divmod(options.workspace_bytes, 1 << 20)
    workspace = f"{mib}M" if not rest else f"{options.workspace_bytes}B"
    engine_dir = Path(engine_dir)
    parts = [
        "trtexec",
        f"--onnx={onnx_path}",
        *precision,
        *(f"--{which}Shapes={_shape_spec({n: s[i] for n, s in profile.items()})}"
          for i, which in enumerate(("min", "opt", "max"))),
        f"--memPoolSize=workspace:{workspace}",
        "--profilingVerbosity=detailed",
        f"--saveEngine={engine_dir / TRT_MODEL_FILE}",
        f"--exportLayerInfo={engine_dir / LAYER_REPORT_FILE}",
    ]
    return " ".join(shlex.quote(p) for p in parts)
