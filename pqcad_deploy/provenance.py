"""Provenance recorded in every artifact: package versions, source model and its checksum.

No creation time: the same seed and the same inputs give a byte-identical artifact (and so the same
artifact digest in every ONNX exported from it); the directory's own mtime says when it was written.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
from pathlib import Path

__all__ = ["package_versions", "file_sha256", "provenance"]

_PACKAGES = ("pqcad-deploy", "torch", "diffusers", "numpy", "safetensors", "onnx", "onnxruntime")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["python"] = platform.python_version()
    return versions


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


PIPELINE_PART_FOLDERS = ("vae", "text_encoder", "tokenizer", "class_embeddings")
"""A latent pipeline's folders beside unet/ whose files export writes into the engine (or reads conditions from)."""


def provenance(seed: int, source: str, unet_dir: Path | None, pipeline_dir: Path | None = None) -> dict:
    """Where an artifact came from: the seed, the model, and the sha256 of the files it was made from.

    For a latent pipeline (`pipeline_dir`), every file of its VAE, text encoder, tokenizer and class-table
    folders is hashed too (``source_parts_sha256``, by path relative to the pipeline folder): export writes
    those parts beside the UNet from the folder the artifact names, and checks they are the ones it was
    compressed with.
    """
    weights = {}
    if unet_dir is not None:
        for path in sorted(Path(unet_dir).glob("diffusion_pytorch_model*")):
            weights[path.name] = file_sha256(path)
    record = {
        "seed": seed,
        "source_model": source,
        "source_weights_sha256": weights,
        "versions": package_versions(),
    }
    if pipeline_dir is not None:
        root = Path(pipeline_dir)
        record["source_parts_sha256"] = {
            path.relative_to(root).as_posix(): file_sha256(path)
            for folder in PIPELINE_PART_FOLDERS if (root / folder).is_dir()
            for path in sorted((root / folder).rglob("*")) if path.is_file()}
    return record
