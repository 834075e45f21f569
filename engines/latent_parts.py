"""A latent engine's parts at build and sample time, torch-free (issue 17; what they are: engines.parts).

build-engine (:func:`carry_parts`) checks each part export listed against its sha256 and copies it into
the engine directory under its role's name (``vae_decoder.onnx``, ``tokenizer/vocab.json``, ...), so one
directory under one engine.json holds everything ``sample`` runs. The parts stay as export wrote them:
float graphs ONNX Runtime optimises when it loads them (a second), on either backend.

``sample`` (:class:`EngineParts`) reads them lazily: the class table (``.npy``, a row lookup), the CLIP
tokenizer (engines.tokenizer) and text encoder ONNX (prompts -> ``encoder_hidden_states``, once per
distinct prompt), and the VAE decoder ONNX (the sampler's final latents -> images in [-1, 1],
:class:`VaeDecoder`). The text encoder and the VAE decoder run on ONNX Runtime: on the engine's own
provider for an onnxruntime engine (cpu or cuda; a ``tensorrt``-provider engine runs them on cuda, since
they are float graphs with nothing for INT8), and on ONNX Runtime's cuda provider beside a TensorRT plan
(TensorRT plans of the parts are not built yet, docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BackendUnavailableError, EngineDirectoryError, RunnerError
from .manifest import EngineManifest, OnnxManifest, verify_parts
from .ort_session import ort_session
from .parts import CLASS_TABLE_NAME, TEXT_ENCODER_IO, TEXT_ENCODER_NAME, VAE_DECODER_IO, VAE_DECODER_NAME, PartFile

__all__ = ["PART_PROVIDERS", "EngineParts", "VaeDecoder", "carry_parts"]

PART_PROVIDERS: dict[tuple[str, str | None], str] = {
    ("onnxruntime", "cpu"): "cpu",
    ("onnxruntime", "cuda"): "cuda",
    ("onnxruntime", "tensorrt"): "cuda",
    ("tensorrt", None): "cuda",
}
"""(engine backend, its ONNX Runtime provider) -> the ONNX Runtime provider the parts run on (module doc)."""


def carry_parts(onnx_path: str | os.PathLike[str], manifest: OnnxManifest,
                engine_dir: str | os.PathLike[str]) -> OnnxManifest:
    """Copy the parts ``manifest`` lists (beside ``onnx_path``) into ``engine_dir``; return the manifest
    listing them there (their names inside the engine directory, the same checksums).

    Raises:
        EngineDirectoryError: a part export listed is missing or was modified since.
    """
    source = Path(onnx_path).parent
    verify_parts(source, manifest.parts, remedy=f"export {Path(onnx_path).name} again (its parts folder must "
                                                "travel with it)")
    carried = []
    for part in manifest.parts:
        target = Path(engine_dir) / str(part.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / part.file, target)
        carried.append(PartFile(part.role, str(part.name), part.sha256))
    return dataclasses.replace(manifest, parts=tuple(carried))


@dataclass(frozen=True)
class VaeDecoder:
    """The VAE decoder part: float32 latents [n, C, h, w] -> images [n, *image_shape] in [-1, 1].

    The graph divides by the VAE's scaling factor and clamps itself (converters.vae_decoder), so the
    sampler's final latents go in as they are and the images go to engines.images.to_uint8.
    """

    session: Any
    image_shape: tuple[int, int, int]
    path: Path

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        name_in, name_out = VAE_DECODER_IO
        try:
            (images,) = self.session.run([name_out], {name_in: np.ascontiguousarray(latents, dtype=np.float32)})
        except Exception as exc:  # shapes the graph refuses, out of memory ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise RunnerError(f"ONNX Runtime failed to decode latents of shape {list(latents.shape)} with {self.path} "
                              f"({type(exc).__name__}: {first[:300]}); rebuild the engine.") from exc
        if tuple(images.shape) != (len(latents), *self.image_shape):
            raise RunnerError(f"{self.path} decoded {len(latents)} latents into shape {list(images.shape)}, but the "
                              f"engine promises images of {list(self.image_shape)}; re-export the ONNX.")
        return images


class EngineParts:
    """The parts of one engine directory, loaded when first used (:class:`~engines.conditioning.EmbeddingSource`).

    Args:
        engine_dir: the engine directory (``verify_engine`` has checked the parts' checksums).
        manifest: its engine.json.
        threads: ONNX Runtime intra-op threads for the parts (None: ONNX Runtime's default).
    """

    def __init__(self, engine_dir: str | os.PathLike[str], manifest: EngineManifest,
                 threads: int | None = None) -> None:
        self.folder = Path(engine_dir)
        self.manifest = manifest.onnx
        self.provider = PART_PROVIDERS[(manifest.backend, manifest.ort_provider)]
        self.threads = threads
        self._loaded: dict[str, Any] = {}

    def _path(self, name: str) -> Path:
        part = self.manifest.part(name)
        if part is None:
            raise EngineDirectoryError(f"{self.folder} lists no {name}; this engine's model does not use one.")
        return self.folder / part.file

    def _session(self, name: str) -> Any:
        if name not in self._loaded:
            path = self._path(name)
            try:
                self._loaded[name] = ort_session(path, threads=self.threads,
                                                 provider=self.provider)  # type: ignore[arg-type]
            except (BackendUnavailableError, EngineDirectoryError):
                raise
            except Exception as exc:
                raise RunnerError(f"ONNX Runtime cannot load {path} ({type(exc).__name__}: {exc}); rebuild the "
                                  "engine.") from exc
        return self._loaded[name]

    def embed_prompts(self, prompts: Sequence[str]) -> np.ndarray:
        """float32 [len(prompts), tokens, width]: the text encoder part on the tokenised prompts.

        Raises:
            RunnerError: the text encoder does not run. EngineDirectoryError: its tokenizer files do not load.
        """
        from .tokenizer import load_clip_tokenizer

        if "tokenizer" not in self._loaded:
            self._loaded["tokenizer"] = load_clip_tokenizer(self._path("tokenizer/vocab.json").parent)
        ids = self._loaded["tokenizer"](list(prompts))
        name_in, name_out = TEXT_ENCODER_IO
        try:
            (states,) = self._session(TEXT_ENCODER_NAME).run([name_out], {name_in: ids})
        except (RunnerError, EngineDirectoryError):
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise RunnerError(f"ONNX Runtime failed to run the text encoder {self._path(TEXT_ENCODER_NAME)} on "
                              f"{len(ids)} prompts ({type(exc).__name__}: {first[:300]}); rebuild the engine.") from exc
        return states

    def class_table(self) -> np.ndarray:
        """The class table part: float32 [classes (+ null row), tokens, width] (shape checked by the spec).

        Raises:
            EngineDirectoryError: the file is not a plain numpy array.
        """
        if CLASS_TABLE_NAME not in self._loaded:
            path = self._path(CLASS_TABLE_NAME)
            try:
                self._loaded[CLASS_TABLE_NAME] = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise EngineDirectoryError(f"{path} is not a numpy array file ({exc}); rebuild the engine.") from exc
        return self._loaded[CLASS_TABLE_NAME]

    def decoder(self) -> VaeDecoder | None:
        """The VAE decoder of a latent engine, or None for a pixel engine (its samples are the images)."""
        shape = self.manifest.decoded_image_shape
        if shape is None:
            return None
        return VaeDecoder(self._session(VAE_DECODER_NAME), shape, self._path(VAE_DECODER_NAME))

