"""The files a latent engine needs beside its UNet, as the manifests list them (issue 17).

A latent model's UNet samples latents and is conditioned through cross-attention on
``encoder_hidden_states``, so sampling it torch-free needs more than the UNet graph: the VAE decoder
that turns the final latents into images and, by conditioning source, the CLIP text encoder with its
tokenizer files (prompts -> embeddings) or the learned class table (a row lookup). export writes them
beside the UNet ONNX, in the folder ``NAME.parts/`` next to ``NAME.onnx``; the ONNX manifest lists each
file (its role, its path relative to the ONNX's folder, its sha256); build-engine copies them into the
engine directory under :attr:`PartRole.names` and engine.json lists them again, relative to the engine
directory, so ``sample`` checks every byte it runs (engines.latent_parts).

Which parts a manifest must list is not decided here: the VAE decoder comes with a latent manifest
(``decoded_image_shape``), the others with its conditioning spec (``ConditioningSpec.required_parts``).
This module only says what each role is and checks one manifest entry; it reads no files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from .errors import ManifestError

__all__ = ["CLASS_TABLE_NAME", "PARTS_FOLDER_SUFFIX", "PART_ROLES", "PartFile", "PartRole", "TEXT_ENCODER_IO",
           "TEXT_ENCODER_NAME", "TOKENIZER_NAMES", "VAE_DECODER_IO", "VAE_DECODER_NAME", "parts_from_json",
           "role_names"]

PARTS_FOLDER_SUFFIX = ".parts"
"""export writes the parts of ``NAME.onnx`` into ``NAME.parts/`` beside it."""
VAE_DECODER_NAME = "vae_decoder.onnx"
TEXT_ENCODER_NAME = "text_encoder.onnx"
CLASS_TABLE_NAME = "class_table.npy"
TOKENIZER_NAMES: tuple[str, ...] = ("tokenizer/vocab.json", "tokenizer/merges.txt",
                                    "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json")
"""What engines.tokenizer.load_clip_tokenizer reads: the first two always, the configs where the pipeline has them."""
VAE_DECODER_IO: tuple[str, str] = ("latents", "images")
"""The VAE decoder graph's input (float32 [batch, C, h, w], the sampler's final latents) and output (float32
[batch, 3, H, W] in [-1, 1]): converters.vae_decoder writes these names."""
TEXT_ENCODER_IO: tuple[str, str] = ("input_ids", "encoder_hidden_states")
"""The text encoder graph's input (int64 [batch, 77], engines.tokenizer's ids) and output (float32
[batch, 77, width]): converters.text_encoder writes these names."""
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class PartRole:
    """One kind of part: the names its files have inside a parts folder or an engine directory.

    Attributes:
        names: every name a file of this role may have (relative POSIX paths).
        required: the names that must all be listed when the role is (the rest are optional).
        what: a few words for messages.
    """

    names: tuple[str, ...]
    required: tuple[str, ...]
    what: str


PART_ROLES: dict[str, PartRole] = {
    "vae_decoder": PartRole((VAE_DECODER_NAME,), (VAE_DECODER_NAME,),
                            "the VAE decoder ONNX (latents -> images in [-1, 1])"),
    "text_encoder": PartRole((TEXT_ENCODER_NAME,), (TEXT_ENCODER_NAME,),
                             "the CLIP text encoder ONNX (input_ids -> encoder_hidden_states)"),
    "tokenizer": PartRole(TOKENIZER_NAMES, TOKENIZER_NAMES[:2], "the CLIP tokenizer's files"),
    "class_table": PartRole((CLASS_TABLE_NAME,), (CLASS_TABLE_NAME,),
                            "the class table (float32 [classes + null row, tokens, width])"),
}
"""role -> what its files are. A manifest's ``parts`` entry names one of these roles per file."""


def role_names(role: str) -> tuple[str, ...]:
    """The names a file of ``role`` may have (KeyError for an unknown role)."""
    return PART_ROLES[role].names


@dataclass(frozen=True)
class PartFile:
    """One listed file: its role, its path relative to the manifest's folder, its sha256.

    ``file`` is ``NAME.parts/vae_decoder.onnx`` in an ONNX manifest and ``vae_decoder.onnx`` in
    engine.json: it always ends with one of its role's :attr:`PartRole.names`, which is :attr:`name`.

    Raises:
        ManifestError: an unknown role, a path that leaves the folder or does not end with a name of
            its role, or a malformed sha256.
    """

    role: str
    file: str
    sha256: str

    def __post_init__(self) -> None:
        field = "Manifest field parts"
        if self.role not in PART_ROLES:
            raise ManifestError(f"{field}: role {self.role!r} is not one of {', '.join(PART_ROLES)}.")
        path = PurePosixPath(self.file) if isinstance(self.file, str) else None
        if (path is None or not self.file or path.is_absolute() or "\\" in self.file or ".." in path.parts
                or self.name is None):
            raise ManifestError(f"{field}: {self.role} file {self.file!r} must be a relative path inside the "
                                f"manifest's folder ending with {' or '.join(role_names(self.role))}.")
        if not isinstance(self.sha256, str) or not _SHA256.fullmatch(self.sha256):
            raise ManifestError(f"{field}: {self.file} needs a 64-character lowercase sha256 hex digest, got "
                                f"{self.sha256!r}.")

    @property
    def name(self) -> str | None:
        """The role's name this file has (``tokenizer/vocab.json``, ``vae_decoder.onnx``), or None."""
        for name in role_names(self.role):
            if self.file == name or self.file.endswith("/" + name):
                return name
        return None

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "file": self.file, "sha256": self.sha256}


def parts_from_json(value: object) -> tuple[PartFile, ...]:
    """The ``parts`` entry of a manifest: a JSON list of ``{"role", "file", "sha256"}`` objects.

    Raises:
        ManifestError: not a list of such objects, or a file listed twice.
    """
    if isinstance(value, tuple) and all(isinstance(v, PartFile) for v in value):
        parts: list[Any] = list(value)
    else:
        if not isinstance(value, (list, tuple)):
            raise ManifestError(f"Manifest field parts must be a list of {{role, file, sha256}} objects, got "
                                f"{value!r}.")
        parts = []
        for entry in value:
            if isinstance(entry, PartFile):
                parts.append(entry)
                continue
            if not isinstance(entry, dict) or set(entry) != {"role", "file", "sha256"}:
                raise ManifestError(f"Manifest field parts: every entry must be an object with exactly the keys "
                                    f"role, file and sha256, got {entry!r}.")
            parts.append(PartFile(**entry))
    names = [p.name for p in parts]  # the same name twice: one would overwrite the other in an engine
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ManifestError(f"Manifest field parts lists {twice[0]} twice.")
    return tuple(sorted(parts, key=lambda p: (list(PART_ROLES).index(p.role), p.file)))
