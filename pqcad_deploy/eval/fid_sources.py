"""FID of one image source against reference statistics: what ``pqcad-deploy eval fid`` runs.

A source is whatever the rest of the tool writes or reads: images already on disk (a PNG folder or
the ``.npz`` of ``sample --npz``), an engine directory (sampled with the numpy DDIM loop on its
runtime, as deployed), a compressed artifact (its fake-quant student, or with ``fp`` its FP teacher,
through diffusers' DDIMPipeline) or an FP diffusers model (``builtin`` or a model directory).
Resolving the kind is cheap and happens first, and the reference is loaded and checked against the
current Inception pipeline before anything is generated, so a wrong argument fails in a second
rather than after hours of sampling.

Generated sources default to 10,000 images, the count a reported FID uses (FID is biased for small
sets, so only numbers of equal N compare). On a 2-core CPU the Inception network runs about 6
images/s, so a 10,000-image run takes hours there; use a GPU (``device="cuda"``) or a small N for a
quick look.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pqcad_deploy.eval.errors import FidError, StatisticsError

__all__ = [
    "SourceKind",
    "SOURCE_KINDS",
    "IMAGE_KINDS",
    "DEFAULT_GENERATED_N",
    "DEFAULT_MODEL_STEPS",
    "RESULT_FORMAT",
    "RESULT_VERSION",
    "FidSourceError",
    "SourceInfo",
    "FidResult",
    "default_reference_path",
    "reference_label",
    "resolve_source",
    "images_from_source",
    "evaluate_fid",
]

SourceKind = Literal["npz", "png-folder", "engine", "artifact", "model"]
SOURCE_KINDS: tuple[str, ...] = ("npz", "png-folder", "engine", "artifact", "model")
IMAGE_KINDS: tuple[str, ...] = ("npz", "png-folder")
"""Kinds whose images are read as they are (no sampling: no steps, no seed)."""

DEFAULT_GENERATED_N = 10_000
"""Images generated when ``n`` is not given: the count every reported FID uses."""
DEFAULT_MODEL_STEPS = 100
"""DDIM steps of an FP model source when ``steps`` is not given (the teacher's usual grid)."""

RESULT_FORMAT = "pqcad-fid-result"
RESULT_VERSION = 1

_ENGINE_FILE = "engine.json"  # engines.manifest.ENGINE_MANIFEST_FILE (not imported: keep this light)
_ARTIFACT_FILE = "artifact.json"  # pqcad_deploy.artifact.MANIFEST_FILE (imports torch)
_MODEL_MARKERS = ("config.json", "model_index.json", "unet/config.json")
_LATENT_READS = "eval fid decodes its samples through its VAE and reads the embeddings its conditioning uses"
_EXPECTED = ("a folder of .png files, an .npz with key 'images', an engine directory (engine.json), "
             "an artifact directory (artifact.json), a diffusers model directory (config.json) or 'builtin'")


class FidSourceError(FidError):
    """The SOURCE of an FID evaluation is none of the accepted kinds, or the options do not fit it."""


@dataclass(frozen=True)
class SourceInfo:
    """Where a set of images came from.

    Attributes:
        kind: one of :data:`SOURCE_KINDS`.
        source: the SOURCE as given (a path or ``builtin``).
        n: number of images.
        steps: DDIM steps they were sampled with; None for image sources.
        seed: seed of the first image; None for image sources.
        fp: for artifacts, True when the FP teacher was sampled instead of the student; else None.
        seconds: time spent loading or generating the images.
    """

    kind: str
    source: str
    n: int
    steps: int | None
    seed: int | None
    fp: bool | None
    seconds: float

    @property
    def label(self) -> str:
        """The source as shown in the summary line (an artifact's teacher is marked)."""
        return f"{self.source} (FP teacher)" if self.fp else self.source


@dataclass(frozen=True)
class FidResult:
    """One FID number with everything needed to reproduce or compare it.

    Attributes:
        fid: the Frechet Inception Distance.
        info: the evaluated images' :class:`SourceInfo`.
        reference_path: the reference statistics file.
        reference_description: a short label, e.g. ``"fashion-mnist train 60000 images"``.
        reference_count: number of images of the reference.
        device: where the Inception network ran.
        seconds: wall time of the whole evaluation (generation, features, distance).
        images_npz: where the images were saved, if asked.
    """

    fid: float
    info: SourceInfo
    reference_path: str
    reference_description: str
    reference_count: int
    device: str
    seconds: float
    images_npz: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-able record (sorted when written) with a format and a version."""
        info = asdict(self.info)
        return {
            "format": RESULT_FORMAT,
            "version": RESULT_VERSION,
            "fid": self.fid,
            "n": info["n"],
            "steps": info["steps"],
            "seed": info["seed"],
            "fp": info["fp"],
            "source": info["source"],
            "source_kind": info["kind"],
            "reference_path": self.reference_path,
            "reference_description": self.reference_description,
            "reference_count": self.reference_count,
            "device": self.device,
            "images_seconds": info["seconds"],
            "seconds": self.seconds,
            "images_npz": self.images_npz,
        }


def default_reference_path() -> Path:
    """The shipped statistics of the 60,000 Fashion-MNIST training images (zero-padded to 32x32)."""
    return Path(__file__).resolve().parent / "data" / "fashion_mnist_train_fid_stats.npz"


def reference_label(description: dict[str, Any], count: int) -> str:
    """Short name of a reference set: ``"fashion-mnist train 60000 images"`` for ours."""
    if description.get("dataset") and description.get("split"):
        return f"{description['dataset']} {description['split']} {count} images"
    return f"{description.get('source', 'unspecified source')} ({count} images)"


def resolve_source(source: str | os.PathLike[str]) -> SourceKind:
    """Which kind of SOURCE this is, from the path alone (nothing is loaded).

    A directory is an engine if it holds ``engine.json``, an artifact if it holds ``artifact.json``,
    a diffusers model if it holds ``config.json`` (or a pipeline's ``model_index.json`` /
    ``unet/config.json``), and an image folder if it holds ``.png`` files, in that order.

    Raises:
        FidSourceError: the path does not exist or is none of the kinds.
    """
    from pqcad_deploy.models import is_builtin

    if is_builtin(str(source)):
        return "model"
    path = Path(source)
    if not path.exists():
        raise FidSourceError(f"SOURCE {path} does not exist; expected {_EXPECTED}.")
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return "npz"
        raise FidSourceError(f"SOURCE {path} is a file but not an .npz; expected {_EXPECTED}.")
    if (path / _ENGINE_FILE).is_file():
        return "engine"
    if (path / _ARTIFACT_FILE).is_file():
        return "artifact"
    if any((path / marker).is_file() for marker in _MODEL_MARKERS):
        return "model"
    from pqcad_deploy.eval.images_io import check_image_folder

    if check_image_folder(path) is not None:  # a finished `sample` folder (an unfinished one is refused)
        return "png-folder"
    if any(p.is_file() and p.suffix.lower() == ".png" for p in path.iterdir()):
        return "png-folder"
    raise FidSourceError(f"SOURCE {path} is a directory with no .png files, engine.json, artifact.json "
                         f"or config.json; expected {_EXPECTED}.")


def _check_options(kind: str, n: int | None, steps: int | None, seed: int, fp: bool) -> None:
    """Refuse option values and combinations that cannot apply to this kind of source."""
    for name, value, low in (("-n", n, 2), ("--steps", steps, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                  or value < low):
            raise FidSourceError(f"{name} must be an integer >= {low}; got {value!r}.")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise FidSourceError(f"--seed must be a non-negative integer; got {seed!r}.")
    if kind in IMAGE_KINDS and steps is not None:
        raise FidSourceError(f"--steps applies to generated sources; this SOURCE ({kind}) is used as it is.")
    if fp and kind != "artifact":
        raise FidSourceError(f"--fp applies to artifact sources only (its FP teacher); this SOURCE is of kind {kind}.")


def images_from_source(source: str | os.PathLike[str], n: int | None = None, steps: int | None = None,
                       seed: int = 0, device: str = "cpu", batch_size: int = 64, fp: bool = False,
                       progress: bool = True, kind: SourceKind | None = None) -> tuple[np.ndarray, SourceInfo]:
    """Load or generate the images to evaluate.

    Args:
        source: see :func:`resolve_source`.
        n: number of images. Image sources: the first ``n`` (default all; an error if fewer
            exist). Generated sources: default :data:`DEFAULT_GENERATED_N`; image ``i`` comes from
            seed ``seed + i`` (torch sources) or the engine's noise of ``seed`` (engines).
        steps: DDIM steps of generated sources; default the engine's own timesteps, the
            artifact's ``student_steps``, or :data:`DEFAULT_MODEL_STEPS` for a model.
        seed: seed of the initial noise (generated sources).
        device: torch device for artifact and model sources (engines run on their own runtime).
        batch_size: images per model call.
        fp: sample an artifact's FP teacher instead of its fake-quant student.
        progress: show progress bars.
        kind: the already resolved kind (default: :func:`resolve_source`).

    Returns:
        uint8 ``N x H x W x C`` images and their :class:`SourceInfo`.

    Raises:
        FidSourceError: bad source, options that do not fit it, or too few images.
        ImageInputError, ArtifactError, ModelLoadError, EngineError: from the loaders and samplers.
    """
    kind = resolve_source(source) if kind is None else kind
    _check_options(kind, n, steps, seed, fp)
    started = time.perf_counter()
    if kind in IMAGE_KINDS:
        from pqcad_deploy.eval.images_io import load_images

        images = load_images(source)
        if n is not None:
            if len(images) < n:
                raise FidSourceError(f"-n {n} asks for more images than {source} holds ({len(images)}).")
            images = images[:n]
        return images, SourceInfo(kind, str(source), len(images), None, None, None,
                                  time.perf_counter() - started)
    n = DEFAULT_GENERATED_N if n is None else int(n)
    if kind == "engine":
        from pqcad_deploy.engines.generate import open_runner
        from pqcad_deploy.engines.sampler import sample_images

        from pqcad_deploy.engines.conditioning import sample_conditions
        from pqcad_deploy.engines.latent_parts import EngineParts

        runner, manifest = open_runner(source)
        parts = EngineParts(source, manifest)  # a latent engine's VAE decoder and class table or text encoder
        # the engine's defaults (image i of class i % classes, the calibrated guidance scale); a text engine
        # has no default prompts and is refused in one line
        conditions = sample_conditions(manifest.onnx.conditioning, parts=parts)
        with runner:
            result = sample_images(runner, manifest, n, seed, steps=steps, batch_size=batch_size,
                                   progress=progress, conditions=conditions, decode=parts.decoder())
        images, used_steps = result.images, len(result.timesteps)
    else:
        from pqcad_deploy.eval.pipeline_sampling import generate_images

        from pqcad_deploy.conditioning import conditioning_for

        if kind == "artifact":
            from pqcad_deploy.artifact import load_artifact
            from pqcad_deploy.artifact_pipeline import artifact_sampling

            artifact = load_artifact(source)
            unet = artifact.build_teacher() if fp else artifact.build_student()
            scheduler_config = artifact.manifest.scheduler_config
            used_steps = artifact.manifest.student_steps if steps is None else int(steps)
            # sampled as it was calibrated: class i % classes (or prompt i % prompts), its guidance scale; a latent
            # artifact decoded by its pipeline's VAE
            conditioning, decode = artifact_sampling(artifact, source, device=device, reads=_LATENT_READS,
                                                     error=FidSourceError)
        else:
            from pqcad_deploy.models import load_model

            loaded = load_model(str(source))
            unet, scheduler_config = loaded.unet.to(device), loaded.scheduler_config
            used_steps = DEFAULT_MODEL_STEPS if steps is None else int(steps)
            if loaded.kind == "text-conditional-latent":
                raise FidSourceError(f"{source} is a text-conditional pipeline: FID needs prompts; sample its engine "
                                     "with --prompt-file, then eval fid the image folder.")
            conditioning, decode = conditioning_for(loaded), loaded.to(device).decode  # class i % classes, unguided
        images = generate_images(unet, scheduler_config, n, used_steps, seed=seed, batch_size=batch_size,
                                 device=device, progress=progress, conditioning=conditioning, decode=decode).images
    return images, SourceInfo(kind, str(source), len(images), used_steps, int(seed),
                              bool(fp) if kind == "artifact" else None, time.perf_counter() - started)


INCEPTION_CPU_IMAGES_PER_SECOND = 6.0
"""Measured Inception-v3 rate on a 2-core CPU (used only for the up-front estimate)."""
ANNOUNCE_FROM = 500
"""Generated sources of at least this many images get the up-front line (a minute or more on a CPU)."""


def _note(message: str) -> None:
    """One line on stderr (stdout stays the result line)."""
    print(message, file=sys.stderr, flush=True)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


class _TimedExtractor:
    """Wraps an Inception extractor: times its first batch, then says how long the rest will take.

    The first batch is exactly the first batch an all-at-once call would run, so the features (and
    the FID) do not change.
    """

    def __init__(self, extractor: Any, default_batch_size: int) -> None:
        self._extractor = extractor
        self._batch_size = default_batch_size

    def description(self) -> dict[str, str]:
        return self._extractor.description()

    def __call__(self, images: np.ndarray, batch_size: int | None = None, progress: bool = True) -> np.ndarray:
        bs = int(batch_size or self._batch_size)
        if len(images) <= 2 * bs:
            return self._extractor(images, batch_size=bs, progress=progress)
        started = time.perf_counter()
        first = self._extractor(images[:bs], batch_size=bs, progress=False)
        rate = bs / max(time.perf_counter() - started, 1e-9)
        _note(f"Inception features of {len(images)} images: about {_minutes(len(images) / rate)} at the measured "
              f"{rate:.1f} images/s.")
        rest = self._extractor(images[bs:], batch_size=bs, progress=progress)
        return np.concatenate([first, rest])


def _announce(kind: str, source: str, n: int | None, device: str) -> None:
    """Say up front how many images a generated source means and roughly how long the features take."""
    count = DEFAULT_GENERATED_N if n is None else int(n)
    if kind in IMAGE_KINDS or count < ANNOUNCE_FROM:
        return
    rate_note = ""
    if device == "cpu":
        rough = count / INCEPTION_CPU_IMAGES_PER_SECOND
        rate_note = (f"; the Inception features alone take about {_minutes(rough)} on a 2-core CPU "
                     f"(~{INCEPTION_CPU_IMAGES_PER_SECOND:.0f} images/s)")
        if rough >= 600:
            rate_note += "; pass a smaller -n or --device cuda for a quick look"
    _note(f"evaluating {count} images generated from {source} (sampled first, then Inception features on "
          f"{device}){rate_note}.")


def _check_reference(reference: Any) -> None:
    """Refuse a reference computed with another preprocessing, other weights or feature size.

    Reads the current pipeline's description from the weights file, without loading the network,
    so a wrong ``--ref`` fails at once.
    """
    from pqcad_deploy.eval.fid import COMPATIBILITY_KEYS
    from pqcad_deploy.eval.inception import FEATURE_DIM, PREPROCESSING, file_sha256, find_fid_weights

    if reference.mu.shape != (FEATURE_DIM,):
        raise StatisticsError(f"the reference has {reference.mu.shape[0]}-d features; "
                              f"the Inception pool3 features are {FEATURE_DIM}-d.")
    mine = {"preprocessing": PREPROCESSING, "weights_sha256": file_sha256(find_fid_weights())}
    for key in COMPATIBILITY_KEYS:
        if reference.description.get(key) != mine.get(key):
            raise StatisticsError(
                f"the reference statistics are not comparable: {key} is {reference.description.get(key)!r}, "
                f"the current pipeline has {mine.get(key)!r}; recompute them with "
                "python -m pqcad_deploy.eval.reference_stats."
            )


def _is_our_fid_json(path: Path) -> bool:
    """A JSON file written by `eval fid --json` (the only JSON --overwrite may replace)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"fid", "n", "source_kind", "reference_path"} <= set(data)


def _check_output(path: Path, overwrite: bool, flag: str) -> None:
    """Checked now, not after hours of generation; only our own files are ever replaced."""
    from pqcad_deploy.engines._atomic import check_output_file
    from pqcad_deploy.engines.images import is_images_npz

    is_ours, what = ((is_images_npz, "pqcad-deploy image npz") if flag == "--save-npz"
                     else (_is_our_fid_json, "pqcad-deploy FID JSON"))
    try:
        check_output_file(path, overwrite=overwrite, error=FidError, is_ours=is_ours, what=what)
    except FidError as exc:
        raise FidError(f"{flag}: {exc}") from None


def _write_json(data: dict[str, Any], path: Path) -> None:
    """Write sorted JSON atomically (temporary file in the same folder, then rename)."""
    from pqcad_deploy.engines._atomic import atomic_file

    with atomic_file(path, error=FidError) as tmp:
        tmp.write_text(json.dumps(data, sort_keys=True, indent=1) + "\n")


def evaluate_fid(source: str | os.PathLike[str], reference: str | os.PathLike[str] | None = None,
                 n: int | None = None, steps: int | None = None, seed: int = 0, device: str = "cpu",
                 batch_size: int = 64, fp: bool = False, save_npz: str | os.PathLike[str] | None = None,
                 json_path: str | os.PathLike[str] | None = None, overwrite: bool = False,
                 progress: bool = True) -> FidResult:
    """FID of a source's images against reference statistics.

    Order matters for long runs: the source kind, the options, the output paths and the reference's
    compatibility with the current Inception pipeline are all checked before any image is made.

    Args:
        source, n, steps, seed, fp: see :func:`images_from_source`.
        reference: statistics ``.npz`` (:class:`~pqcad_deploy.eval.fid.FidStatistics`); default
            :func:`default_reference_path`.
        device: torch device of the Inception network (and of torch-based generation).
        batch_size: images per model call and per Inception forward pass.
        save_npz: also save the images (uint8, key ``images``) here, for reuse as a SOURCE.
        json_path: also write :meth:`FidResult.to_dict` here as JSON.
        overwrite: replace existing ``save_npz`` / ``json_path`` files.
        progress: progress bars for generation and features.

    Returns:
        The :class:`FidResult`.

    Raises:
        FidSourceError, StatisticsError, WeightsNotFoundError, ImageInputError, FidError: user errors
            of this package; ArtifactError, ModelLoadError, EngineError: from the loaders.
    """
    from pqcad_deploy.choices import DEVICES
    from pqcad_deploy.eval.fid import FidStatistics, compute_statistics
    from pqcad_deploy.eval.inception import InceptionFeatures

    started = time.perf_counter()
    kind = resolve_source(source)
    _check_options(kind, n, steps, seed, fp)
    if device not in DEVICES:
        raise FidError(f"--device must be one of {', '.join(DEVICES)}; got {device!r}.")
    outputs = [(Path(p), flag) for p, flag in ((save_npz, "--save-npz"), (json_path, "--json")) if p is not None]
    for path, flag in outputs:
        _check_output(path, overwrite, flag)
    ref_path = Path(reference) if reference is not None else default_reference_path()
    ref = FidStatistics.load(ref_path)
    _check_reference(ref)

    def get_images() -> tuple[np.ndarray, SourceInfo]:
        return images_from_source(source, n=n, steps=steps, seed=seed, device=device,
                                  batch_size=batch_size, fp=fp, progress=progress, kind=kind)

    # images on disk are read before the network is loaded (cheap, and a bad file fails at once);
    # generated ones after it, so a bad --device fails before hours of sampling
    images, info = get_images() if kind in IMAGE_KINDS else (None, None)
    extractor = _TimedExtractor(InceptionFeatures(device=device, batch_size=batch_size), batch_size)
    _announce(kind, str(source), n, device)
    if images is None:
        images, info = get_images()
    if len(images) < 2:
        raise FidSourceError(f"{source} holds {len(images)} image; FID needs at least 2.")
    npz_path = None
    if save_npz is not None:
        from pqcad_deploy.engines.images import save_npz as write_npz

        npz_path = str(write_npz(images, save_npz))
    stats = compute_statistics(images, batch_size=batch_size, progress=progress,
                               source=f"{info.kind} {info.label}", extractor=extractor)
    stats.check_compatible(ref)
    fid = stats.frechet_distance(ref)
    result = FidResult(fid=fid, info=info, reference_path=str(ref_path),
                       reference_description=reference_label(ref.description, ref.count),
                       reference_count=ref.count, device=device, seconds=time.perf_counter() - started,
                       images_npz=npz_path)
    if json_path is not None:
        _write_json(result.to_dict(), Path(json_path))
    return result
