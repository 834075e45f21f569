"""Build an ONNX Runtime engine directory from our ONNX, for one execution provider (cpu, cuda, tensorrt).

cpu: the build is ONNX Runtime's offline graph optimization: the fused graph (QDQ folded into integer
kernels, constant folding, node fusions) is saved once so every ``sample`` run skips that work. The
default level is EXTENDED, not ALL: ALL adds layout transformations (NCHWc) specific to the CPU the
build ran on, and an engine directory must run on any machine with the same onnxruntime.

cuda, tensorrt: the engine stores the exported graph unchanged. ONNX Runtime's documentation says an
offline-optimized model must be run with the execution providers, optimization level and hardware it
was optimized for, and its extended fusions run after the graph is partitioned between providers: a
graph fused for the CPU holds CPU-only kernels, so a GPU session must optimize the original online,
for its own provider, which ONNX Runtime does when ``sample`` loads it (a second or so). The TensorRT
provider compiles its part of the graph into TensorRT engines; they are cached in ENGINE/trt_cache/
(:func:`tensorrt_provider_options`), filled by the build's smoke test, so on the device that built it
``sample`` starts without TensorRT's build. The cache is not covered by engine.json's checksum: it is
the provider's own, and it rebuilds what does not match (another GPU, TensorRT or ONNX Runtime
version, a batch size outside the shapes it was built for) and writes it there when it can.

A latent model's parts (engines.parts: the VAE decoder, the text encoder and tokenizer or the class
table, listed with their checksums in the ONNX manifest) are checked and copied into the engine
directory (engines.latent_parts.carry_parts), and engine.json lists them there.

The directory is assembled in a temporary sibling and renamed into place at the end, so a failed
build never leaves a valid-looking engine.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ._atomic import staged_directory
from ._lazy import ORT_HINT, lazy_import
from .ort_session import (
    OPTIMIZATION_LEVELS,
    OptimizationLevel,
    TensorRTProviderOptions,
    check_provider_available,
    ort_session,
)
from .ddim import DDIMConfig
from .errors import BackendUnavailableError, BuildError, ConfigError
from .manifest import (
    ORT_PROVIDERS,
    EngineManifest,
    OnnxManifest,
    OrtProvider,
    check_graph_file,
    read_onnx_manifest,
    sha256_file,
    verify_parts,
    write_engine_manifest,
)
from .latent_parts import carry_parts
from .runner import zero_feed

__all__ = ["OptimizationLevel", "OPTIMIZATION_LEVELS", "ORT_MODEL_FILE", "DEFAULT_OPTIMIZATION_LEVEL",
           "TRT_PROVIDER_CACHE_DIR", "build_onnxruntime_engine", "check_buildable", "tensorrt_provider_options"]

ORT_MODEL_FILE = "model.onnx"
DEFAULT_OPTIMIZATION_LEVEL: OptimizationLevel = "extended"
TRT_PROVIDER_CACHE_DIR = "trt_cache"
"""ENGINE/trt_cache/: the TensorRT provider's engine cache of a ``--provider tensorrt`` engine."""


def tensorrt_provider_options(manifest: OnnxManifest, engine_dir: str | os.PathLike[str]) -> TensorRTProviderOptions:
    """The TensorRT provider's options for an engine (the same at build and at ``sample``).

    INT8 is on exactly when the graph is quantized (it holds Q/DQ nodes, see
    :class:`~engines.ort_session.TensorRTProviderOptions`), FP16 stays off, and the engine cache is
    ENGINE/:data:`TRT_PROVIDER_CACHE_DIR`. They are derived, not stored in engine.json, so they cannot
    disagree with the graph they run.
    """
    return TensorRTProviderOptions(int8=manifest.precision != "fp32", fp16=False,
                                   engine_cache_dir=str(Path(engine_dir) / TRT_PROVIDER_CACHE_DIR))


def check_buildable(onnx_path: str | os.PathLike[str]) -> OnnxManifest:
    """Read our manifest from ``onnx_path`` and check that the runtime can sample with it.

    Failing here (a foreign ONNX, an unsupported scheduler config) is cheaper than failing after a
    long build or at the first ``sample``.

    The manifest is also checked against the graph it describes (input/output names, the sample's
    C/H/W, fp32 vs quantized nodes): a manifest claiming w4a4 on a float graph is refused here; and a
    latent model's parts must be beside it as export wrote them.

    Raises:
        ManifestError: not our ONNX, an invalid manifest, or one that disagrees with its graph.
        EngineDirectoryError: a part the manifest lists is missing or was modified.
        BuildError: the scheduler config is one the numpy sampler refuses.
    """
    manifest = read_onnx_manifest(onnx_path)
    check_graph_file(onnx_path, manifest)
    verify_parts(Path(onnx_path).parent, manifest.parts,
                 remedy=f"export {Path(onnx_path).name} again (its parts folder must travel with it)")
    try:
        DDIMConfig.from_dict(manifest.scheduler_config)
    except ConfigError as exc:
        raise BuildError(f"{onnx_path}: {exc}") from exc
    return manifest


def build_onnxruntime_engine(
    onnx_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    optimization_level: OptimizationLevel | None = None,
    provider: OrtProvider = "cpu",
    overwrite: bool = False,
    smoke_test: bool = True,
) -> EngineManifest:
    """Build ``out_dir/{model.onnx, engine.json}`` for ONNX Runtime's ``provider``.

    Args:
        onnx_path: our ONNX (with ``pqcad.manifest`` metadata).
        out_dir: the engine directory to create.
        optimization_level: ONNX Runtime graph optimization level saved into a cpu engine;
            None: :data:`DEFAULT_OPTIMIZATION_LEVEL` (see module doc). cuda and tensorrt engines store
            the exported graph (module doc), so a level is refused for them.
        provider: one of ORT_PROVIDERS; recorded in engine.json (``ort_provider``) so ``sample`` uses it.
        overwrite: replace an existing non-empty ``out_dir``.
        smoke_test: run the model once on a batch of one, on ``provider``, and check the output shape,
            so a graph that loads but cannot run is caught at build time (for tensorrt this also
            fills ENGINE/trt_cache/).

    Returns:
        The engine manifest that was written.

    Raises:
        ManifestError: ``onnx_path`` is missing, unreadable or not written by pqcad-deploy export.
        BuildError: bad arguments, an existing ``out_dir``, an unwritable parent, or ONNX Runtime failing.
        BackendUnavailableError: onnxruntime is not installed, or it lacks ``provider`` (checked before
            anything is written) or cannot start it.
    """
    if provider not in ORT_PROVIDERS:
        raise BuildError(f"provider={provider!r} is not one of {', '.join(ORT_PROVIDERS)}.")
    if provider != "cpu" and optimization_level is not None:
        raise BuildError(f"optimization_level={optimization_level!r} applies to provider 'cpu' only: a {provider} "
                         "engine stores the exported graph, which ONNX Runtime optimizes for its provider when "
                         "sample loads it; leave the level out.")
    level = DEFAULT_OPTIMIZATION_LEVEL if optimization_level is None else optimization_level
    if level not in OPTIMIZATION_LEVELS:
        raise BuildError(f"optimization_level={level!r} is not one of {', '.join(OPTIMIZATION_LEVELS)}.")
    onnx_path = Path(onnx_path)
    manifest = check_buildable(onnx_path)
    lazy_import("onnxruntime", ORT_HINT)  # before staging anything: the clear error when it is missing
    check_provider_available(provider)
    with staged_directory(out_dir, overwrite=overwrite, error=BuildError, kind="engine") as tmp:
        model_path = tmp / ORT_MODEL_FILE
        if provider == "cpu":
            _save_cpu_optimized(onnx_path, model_path, level, out_dir, tmp)
        else:
            _copy_exported(onnx_path, model_path, out_dir, tmp)
        if provider == "tensorrt":  # the provider's engine cache lives in the engine (module doc)
            (tmp / TRT_PROVIDER_CACHE_DIR).mkdir()
        carried = carry_parts(onnx_path, manifest, tmp)  # a latent model's VAE decoder, text encoder, ...
        if smoke_test:
            trt_options = tensorrt_provider_options(manifest, tmp) if provider == "tensorrt" else None
            try:
                _smoke_test(model_path, manifest, provider, trt_options)
            except BuildError as exc:  # a truncated write reads as a broken model
                if _disk_full(tmp):
                    raise _write_failure(out_dir, tmp, exc) from exc
                raise
        engine = EngineManifest(
            backend="onnxruntime",
            model_file=ORT_MODEL_FILE,
            model_sha256=sha256_file(model_path),
            source_onnx_sha256=sha256_file(onnx_path),
            onnx=carried,
            ort_provider=provider,
        )
        write_engine_manifest(tmp, engine)
    return engine


def _save_cpu_optimized(onnx_path: Path, model_path: Path, level: OptimizationLevel, out_dir: str | os.PathLike[str],
                        tmp: Path) -> None:
    """ONNX Runtime's offline optimization for the CPU provider, saved as the engine's model."""
    try:
        ort_session(onnx_path, optimization_level=level, optimized_model_path=model_path)
    except Exception as exc:
        if _input_loads(onnx_path):  # so it was saving the optimized model that failed
            raise _write_failure(out_dir, tmp, exc) from exc
        raise BuildError(f"ONNX Runtime could not load {onnx_path} ({type(exc).__name__}: {exc}); check the export.") from exc
    if not model_path.is_file():
        raise _write_failure(out_dir, tmp, None)


def _copy_exported(onnx_path: Path, model_path: Path, out_dir: str | os.PathLike[str], tmp: Path) -> None:
    """The exported graph itself, for the GPU providers (module doc). Export writes no external data."""
    try:
        shutil.copyfile(onnx_path, model_path)
    except OSError as exc:
        free = _free_bytes(tmp)
        raise BuildError(f"cannot write the engine to {out_dir}: copying {onnx_path} failed "
                         f"({exc.strerror or exc}; {free} bytes free there); free space or choose another -o "
                         "location.") from exc


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _disk_full(path: Path, margin: int = 1 << 20) -> bool:
    free = _free_bytes(path)
    return free is not None and free < margin


def _input_loads(onnx_path: Path) -> bool:
    """Whether ONNX Runtime loads the input when it writes nothing (tells a bad input from a bad output)."""
    try:
        ort_session(onnx_path, optimization_level="disabled")
    except Exception:
        return False
    return True


def _write_failure(out_dir: str | os.PathLike[str], tmp: Path, exc: BaseException | None) -> BuildError:
    """The error for an optimized model that could not be written where the engine goes."""
    free = _free_bytes(tmp)
    where = f"the disk holding {Path(out_dir).resolve().parent}"
    state = (f"{where} is full ({free} bytes free)" if free is not None and free < (1 << 20)
             else f"{where} has {free} bytes free" if free is not None else f"{where} cannot be inspected")
    detail = "" if exc is None else f" ({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})"
    return BuildError(f"cannot write the engine to {out_dir}: ONNX Runtime failed to save the optimized model"
                      f"{detail} although it loads the input ONNX fine, and {state}; free space or choose "
                      "another -o location.")


def _smoke_test(model_path: Path, manifest: OnnxManifest, provider: OrtProvider = "cpu",
                tensorrt_options: TensorRTProviderOptions | None = None) -> None:
    c, h, w = manifest.image_shape
    feed = zero_feed(manifest)  # with a conditional model's input
    try:
        session = ort_session(model_path, provider=provider, tensorrt_options=tensorrt_options)
        (out,) = session.run([manifest.output_name], feed)
    except BackendUnavailableError:
        raise
    except Exception as exc:
        if provider == "cpu":
            raise BuildError(f"The optimized model does not run ({type(exc).__name__}: {exc}); try optimization_level='basic'.") from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise BuildError(f"ONNX Runtime's {provider} provider cannot run {model_path.name} ({type(exc).__name__}: "
                         f"{first[:300]}); build with --provider cpu, or for the GPU use --backend tensorrt.") from exc
    if tuple(out.shape) != (1, c, h, w):
        raise BuildError(f"The model's {manifest.output_name!r} has shape {list(out.shape)}, expected [1, {c}, {h}, {w}]; check the export.")
