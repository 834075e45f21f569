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


def provenance(seed: int, source: str, unet_dir: Path | None) -> dict:
    weights = {}
    if unet_dir is not None:
        for path in sorted(Path(unet_dir).glob("diffusion_pytorch_model*")):
            weights[path.name] = file_sha256(path)
    return {
        "seed": seed,
        "source_model": source,
        "source_weights_sha256": weights,
        "versions": package_versions(),
    }
