"""A latent artifact's other parts, written beside its UNet ONNX by the same export call (issue 17).

A latent UNet alone cannot make an image: its samples are latents, and its condition is an embedding.
So export writes, into ``NAME.parts/`` beside ``NAME.onnx`` (engines.parts), the files a torch-free
engine needs: the VAE decoder ONNX (converters.vae_decoder), and for a Stable Diffusion pipeline the
CLIP text encoder ONNX (converters.text_encoder) and the tokenizer files engines.tokenizer reads, or for
a class-embedding pipeline its class table as ``class_table.npy`` (float32 [classes + null row, tokens,
width], the rows the UNet was calibrated on, so the engine looks them up with numpy). The UNet's ONNX
manifest lists each file with its sha256; build-engine carries them into the engine directory.

Which parts: the VAE decoder always, plus the conditioning spec's ``required_parts`` (one registry,
:data:`PART_WRITERS`, says how each role is written; :data:`PART_PARITY` how the graphs among them are
checked against PyTorch).

The VAE decoder's precision (``--vae-precision``): fp16 for the tensorrt target, fp32 otherwise. TensorRT
builds a strongly typed network from the graph's own types, so only an FP16 graph runs in FP16 there
(the VAE decoder is an SD sampler's largest graph after the UNet, issue 17 asks for FP16); ONNX
Runtime's CPU provider has few FP16 kernels and wraps the rest in Casts, so fp32 is both faster and
exact there, which the engine-vs-PyTorch image tests need.

Atomicity: the folder is assembled in a hidden sibling and published (engines._atomic.staged_directory,
marker kind "parts") only when the UNet ONNX is complete and has passed its parity gate; the ONNX is
renamed into place right after, so a failed export leaves neither. ``--overwrite`` replaces a parts
folder only when its marker says this tool wrote it and it holds nothing else.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np

from pqcad_deploy.converters.conditions import source_pipeline
from pqcad_deploy.engines.manifest import sha256_file
from pqcad_deploy.engines.parts import (CLASS_TABLE_NAME, PART_ROLES, PARTS_FOLDER_SUFFIX, TEXT_ENCODER_NAME,
                                        TOKENIZER_NAMES, VAE_DECODER_IO, VAE_DECODER_NAME, PartFile)
from pqcad_deploy.errors import ExportError, OutputPathError

if TYPE_CHECKING:  # pipeline_parts imports export_onnx, which imports this module
    from pqcad_deploy.converters.pipeline_parts import PartParity

__all__ = ["PART_PARITY", "PART_WRITERS", "VAE_PRECISION_CHOICES", "PartsPlan", "WrittenParts", "parts_folder",
           "plan_parts", "staged_parts", "vae_precision_for"]

VaePrecisionChoice = Literal["auto", "fp32", "fp16"]
VAE_PRECISION_CHOICES: tuple[str, ...] = get_args(VaePrecisionChoice)
"""``--vae-precision``: auto is fp16 for the tensorrt target, fp32 otherwise (module doc)."""
_AUTO_VAE_PRECISION: dict[str, str] = {"tensorrt": "fp16"}
"""Concrete export target -> the VAE decoder precision ``auto`` picks (fp32 where absent)."""


@dataclass(frozen=True)
class PartsPlan:
    """What to write: the pipeline folder, the part roles (engines.parts order), the VAE settings."""

    pipeline: Path
    roles: tuple[str, ...]
    vae_precision: str
    latent_side: int


@dataclass(frozen=True)
class WrittenParts:
    """What :func:`staged_parts` wrote (published once the export completes)."""

    folder: Path
    files: tuple[PartFile, ...]  # relative to the ONNX's folder, as the manifest lists them
    decoded_image_shape: tuple[int, int, int]
    vae_precision: str
    parity: tuple[PartParity, ...]  # empty when parity was not checked

    def describe(self) -> str:
        """``m.parts/: vae_decoder (fp32), text_encoder, tokenizer (4 files)``: export's summary line."""
        roles = []
        for role in dict.fromkeys(p.role for p in self.files):
            count = sum(p.role == role for p in self.files)
            extra = f" ({self.vae_precision})" if role == "vae_decoder" else f" ({count} files)" if count > 1 else ""
            roles.append(role + extra)
        c, h, w = self.decoded_image_shape
        return f"{self.folder.name}/: {', '.join(roles)}; images {c}x{h}x{w}"


def vae_precision_for(requested: str, target: str) -> str:
    """The VAE decoder precision for ``--vae-precision`` and the concrete target (module doc).

    Raises:
        ExportError: a value outside VAE_PRECISION_CHOICES.
    """
    if requested not in VAE_PRECISION_CHOICES:
        raise ExportError(f"--vae-precision must be one of {', '.join(VAE_PRECISION_CHOICES)}; got {requested!r}.")
    return _AUTO_VAE_PRECISION.get(target, "fp32") if requested == "auto" else requested


def parts_folder(onnx_path: Path | str) -> Path:
    """``NAME.parts/`` beside ``NAME.onnx``."""
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.stem + PARTS_FOLDER_SUFFIX)


def plan_parts(manifest, spec, target: str, *, vae_precision: str = "auto", pipeline: Path | str | None = None,
               artifact: object = "the artifact", onnx_path: Path, overwrite: bool = False) -> PartsPlan | None:
    """The parts a latent artifact's export writes (None for a pixel artifact), checked before any work.

    Args:
        manifest: the artifact's manifest. spec: its engines conditioning spec (its ``required_parts``).
        target: the concrete export target (the VAE precision's default).

    Raises:
        ExportError: ``--pipeline`` or ``--vae-precision`` for a pixel artifact, latents that are not square,
            or a pipeline folder that is not the artifact's (converters.conditions.source_pipeline).
        OutputPathError: ``NAME.parts/`` exists and may not be replaced.
    """
    from pqcad_deploy.engines._atomic import check_output_dir

    if manifest.unet_config.get("cross_attention_dim") is None:
        given = [flag for flag, value in (("--pipeline", pipeline), ("--vae-precision", None if vae_precision == "auto"
                                                                      else vae_precision)) if value is not None]
        if given:
            verb, pronoun = ("apply", "them") if len(given) > 1 else ("applies", "it")
            raise ExportError(f"{' and '.join(given)} {verb} to latent artifacts (a pipeline's UNet with a VAE); "
                              f"{artifact} is a pixel-space model: drop {pronoun}.")
        return None
    precision = vae_precision_for(vae_precision, target)
    _, h, w = manifest.image_shape
    if h != w:
        raise ExportError(f"{artifact} samples {h}x{w} latents; the VAE decoder export takes square latents only.")
    root = source_pipeline(manifest, artifact, pipeline)
    check_output_dir(parts_folder(onnx_path), overwrite=overwrite, kind="parts", error=OutputPathError)
    required = tuple(spec.required_parts) if spec is not None else ()
    roles = tuple(r for r in PART_ROLES if r == "vae_decoder" or r in required)
    return PartsPlan(pipeline=root, roles=roles, vae_precision=precision, latent_side=int(h))


def _write_vae_decoder(plan: PartsPlan, folder: Path) -> tuple[str, ...]:
    from pqcad_deploy.converters.vae_decoder import export_vae_decoder

    export_vae_decoder(plan.pipeline, folder / VAE_DECODER_NAME, precision=plan.vae_precision,
                       latent_size=plan.latent_side)
    return (VAE_DECODER_NAME,)


def _write_text_encoder(plan: PartsPlan, folder: Path) -> tuple[str, ...]:
    from pqcad_deploy.converters.text_encoder import export_text_encoder

    export_text_encoder(plan.pipeline, folder / TEXT_ENCODER_NAME)
    return (TEXT_ENCODER_NAME,)


def _write_tokenizer(plan: PartsPlan, folder: Path) -> tuple[str, ...]:
    """The pipeline's tokenizer files engines.tokenizer reads, checked to load there."""
    from pqcad_deploy.engines.errors import EngineError
    from pqcad_deploy.engines.tokenizer import load_clip_tokenizer

    written = []
    for name in TOKENIZER_NAMES:
        source = plan.pipeline / name
        if source.is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, folder / name)
            written.append(name)
        elif name in PART_ROLES["tokenizer"].required:
            raise ExportError(f"{plan.pipeline} has no {name}; a Stable Diffusion pipeline's tokenizer/ holds "
                              "vocab.json and merges.txt, which the engine tokenises prompts with.")
    try:
        load_clip_tokenizer(folder / "tokenizer")
    except EngineError as exc:
        raise ExportError(f"the tokenizer of {plan.pipeline} cannot be read without torch: {exc}") from None
    return tuple(written)


def _write_class_table(plan: PartsPlan, folder: Path) -> tuple[str, ...]:
    """The class table as float32 [num_classes (+ the null row, last), tokens, width]."""
    from pqcad_deploy.latent_parts import load_class_table

    table = load_class_table(plan.pipeline)
    np.save(folder / CLASS_TABLE_NAME, np.ascontiguousarray(table.embeddings.numpy(), dtype=np.float32),
            allow_pickle=False)
    return (CLASS_TABLE_NAME,)


PART_WRITERS: dict[str, Callable[[PartsPlan, Path], tuple[str, ...]]] = {
    "vae_decoder": _write_vae_decoder,
    "text_encoder": _write_text_encoder,
    "tokenizer": _write_tokenizer,
    "class_table": _write_class_table,
}
"""Part role (engines.parts.PART_ROLES) -> writes its files into a folder; returns their names."""


def _vae_parity(plan: PartsPlan, path: Path) -> PartParity:
    from pqcad_deploy.converters.vae_decoder import vae_decoder_parity

    return vae_decoder_parity(plan.pipeline, path)


def _text_encoder_parity(plan: PartsPlan, path: Path) -> PartParity:
    from pqcad_deploy.converters.text_encoder import text_encoder_parity

    return text_encoder_parity(plan.pipeline, path)


PART_PARITY: dict[str, tuple[str, Callable[[PartsPlan, Path], PartParity]]] = {
    "vae_decoder": (VAE_DECODER_NAME, _vae_parity),
    "text_encoder": (TEXT_ENCODER_NAME, _text_encoder_parity),
}
"""Part role -> (its graph's name, its parity against PyTorch); the other parts are data, not graphs."""


def _decoded_image_shape(path: Path) -> tuple[int, int, int]:
    import onnx

    output = next(o for o in onnx.load(str(path), load_external_data=False).graph.output if o.name == VAE_DECODER_IO[1])
    dims = [d.dim_value for d in output.type.tensor_type.shape.dim]
    return int(dims[1]), int(dims[2]), int(dims[3])


@contextlib.contextmanager
def staged_parts(onnx_path: Path | str, plan: PartsPlan | None, *, overwrite: bool,
                 parity: bool) -> Iterator[WrittenParts | None]:
    """Write the parts of ``plan`` into a hidden sibling of ``NAME.parts/``, yield what was written, and
    publish the folder when the block succeeds (nothing is left when it fails). None for a pixel artifact.

    Raises:
        OutputPathError: the folder may not be written. ExportError, ModelLoadError: a part cannot be exported.
    """
    if plan is None:
        yield None
        return
    from pqcad_deploy.engines._atomic import staged_directory

    folder = parts_folder(onnx_path)
    with staged_directory(folder, overwrite=overwrite, error=OutputPathError, kind="parts") as tmp:
        names = [name for role in plan.roles for name in PART_WRITERS[role](plan, tmp)]
        roles = {name: role for role in plan.roles for name in PART_ROLES[role].names}
        files = tuple(PartFile(roles[name], f"{folder.name}/{name}", sha256_file(tmp / name)) for name in names)
        checks = tuple(check(plan, tmp / name) for role, (name, check) in PART_PARITY.items()
                       if parity and role in plan.roles)
        yield WrittenParts(folder=folder, files=files, decoded_image_shape=_decoded_image_shape(tmp / VAE_DECODER_NAME),
                           vae_precision=plan.vae_precision, parity=checks)
