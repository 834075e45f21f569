"""What exporting a latent pipeline's other parts (VAE decoder, text encoder) has in common.

A latent sampler needs, besides the UNet, the VAE decoder that turns its final latents into pixels and,
for text-conditioned pipelines, the text encoder that turns token ids into the UNet's
`encoder_hidden_states` (issue 17). Neither is quantized: each is a plain float graph traced from the
diffusers / transformers module in a pipeline folder, so the UNet export's machinery (artifact,
Q/DQ twins, targets, the UNet's ONNX manifest) does not apply. What they share is here: reading a part's
folder with one clear error, tracing it atomically (the same TorchScript exporter and opset as
converters.export_onnx; nothing half-written is left at the path), a small metadata entry that says
which part a file is (so ``overwrite`` replaces only files this tool wrote, and the engine side can tell
the files apart without torch), and the parity measure (relative L2 of ONNX Runtime against PyTorch).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pqcad_deploy.converters.export_onnx import DEFAULT_OPSET
from pqcad_deploy.errors import ExportError, OutputPathError
from pqcad_deploy.latent_parts import part_config  # re-exported: the loaders live in the PyTorch stage

__all__ = ["PART_METADATA_KEY", "PART_OPSET", "PartParity", "export_part", "part_config", "part_parity",
           "read_part_metadata", "relative_l2", "rename_tensor", "set_value_shape"]

PART_METADATA_KEY = "pqcad.pipeline_part"
"""ONNX metadata key holding ``{"kind": "vae_decoder" | "text_encoder", ...}`` as sorted JSON."""
PART_OPSET = DEFAULT_OPSET
"""The UNet export's default opset (17): the ONNX Runtime targets' and one every TensorRT 10 parses."""


def _is_part(path: Path, kind: str) -> bool:
    try:
        return read_part_metadata(path).get("kind") == kind
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


def read_part_metadata(path: Path | str) -> dict:
    """The part metadata of an ONNX file written by export_part (an empty dict when it has none)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == PART_METADATA_KEY:
            return json.loads(prop.value)
    return {}


def rename_tensor(model, old: str, new: str) -> None:
    """Rename graph input / output / node tensor `old` to `new`, and names starting `old/` alike.

    The FP16 rewrite (converters.tensorrt.to_float16) knows the UNet's input as `sample` and names its
    Cast `sample/fp16`; a part traced with that input name is renamed afterwards.
    """
    def renamed(name: str) -> str:
        if name == old:
            return new
        return new + name[len(old):] if name.startswith(old + "/") else name

    graph = model.graph
    for value in (*graph.input, *graph.output):
        value.name = renamed(value.name)
    for node in graph.node:
        node.input[:] = [renamed(i) for i in node.input]
        node.output[:] = [renamed(o) for o in node.output]
        node.name = renamed(node.name)


def set_value_shape(model, name: str, dims: Sequence[int | str]) -> None:
    """Give graph input or output `name` the shape `dims` (a str is a symbolic axis, e.g. "batch").

    The TorchScript exporter names an axis it could not follow symbolically (the text encoder's token
    axis leaves LayerNormalization as "LayerNormalizationencoder_hidden_states_dim_1"); the engines
    read the fixed sizes from the graph, so they are stated.
    """
    from onnx import helper

    for value in (*model.graph.input, *model.graph.output):
        if value.name == name:
            elem_type = value.type.tensor_type.elem_type
            value.CopyFrom(helper.make_tensor_value_info(name, elem_type, list(dims)))
            return
    raise KeyError(f"the graph has no input or output {name!r}")


def export_part(module: nn.Module, example: tuple[torch.Tensor, ...], out_path: Path | str, *,
                input_names: Sequence[str], output_names: Sequence[str], metadata: dict, overwrite: bool = False,
                rewrite: Callable[[object], None] | None = None, opset: int = PART_OPSET) -> Path:
    """Trace `module` on `example` to ONNX at `out_path`, batch axis dynamic, written atomically.

    Args:
        input_names, output_names: the graph's names, in the module's argument / return order. Every
            input and output gets a dynamic axis 0 named "batch".
        metadata: stored under PART_METADATA_KEY; must hold "kind" (what `overwrite` recognises).
        rewrite: applied to the traced ModelProto in place before it is checked and saved (FP16).

    Returns:
        The written path.

    Raises:
        OutputPathError: `out_path` exists (without `overwrite`, or not a part of this kind written by
            pqcad-deploy), or cannot be written.
        ExportError: the traced graph fails onnx.checker.
    """
    import onnx

    from pqcad_deploy.engines._atomic import atomic_file, check_output_file

    kind = metadata["kind"]
    out_path = check_output_file(out_path, overwrite=overwrite, error=OutputPathError,
                                 is_ours=lambda p: _is_part(p, kind), what=f"pqcad-deploy {kind} ONNX")
    parent = out_path.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise OutputPathError(f"cannot write {out_path}: {parent} is not a writable directory.")
    dynamic = {name: {0: "batch"} for name in (*input_names, *output_names)}
    with atomic_file(out_path, error=OutputPathError) as tmp:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TorchScript tracer warnings about Python control flow
            torch.onnx.export(module.eval(), example, str(tmp), dynamo=False, opset_version=opset,
                              input_names=list(input_names), output_names=list(output_names),
                              dynamic_axes=dynamic, do_constant_folding=True)
        model = onnx.load(str(tmp))
        if rewrite is not None:
            rewrite(model)
        model.producer_name = "pqcad-deploy"
        onnx.helper.set_model_props(model, {PART_METADATA_KEY: json.dumps(metadata, sort_keys=True)})
        try:
            onnx.checker.check_model(model, full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"the exported {kind} graph failed onnx.checker: {str(exc).splitlines()[0]}") from None
        onnx.save(model, str(tmp))
    return out_path


def relative_l2(actual: np.ndarray, reference: np.ndarray) -> float:
    """||actual - reference|| / ||reference|| over the whole array, in float64."""
    a = np.asarray(actual, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    return float(np.linalg.norm(a - r) / max(np.linalg.norm(r), np.finfo(np.float64).tiny))


@dataclass(frozen=True)
class PartParity:
    """ONNX Runtime (CPU) against PyTorch on the same seeded inputs, for one exported part."""

    kind: str
    precision: str
    batch: int
    rel_l2: float
    max_abs: float
    tolerance: float
    non_finite: int  # nan / inf values in ONNX Runtime's output

    @property
    def passed(self) -> bool:
        return self.non_finite == 0 and self.rel_l2 <= self.tolerance

    def __str__(self) -> str:
        if self.non_finite:
            return f"fail ({self.kind} {self.precision}: {self.non_finite} nan/inf values in the ONNX output)"
        verdict = "pass" if self.passed else "fail"
        relation = "<=" if self.passed else ">"
        return (f"{verdict} ({self.kind} {self.precision}, batch {self.batch}: relative L2 {self.rel_l2:.2e} "
                f"{relation} {self.tolerance:.0e}, max |difference| {self.max_abs:.2e})")


def part_parity(kind: str, precision: str, onnx_out: np.ndarray, torch_out: np.ndarray,
                tolerance: float) -> PartParity:
    """The PartParity of two outputs of the same inputs."""
    non_finite = int((~np.isfinite(onnx_out)).sum())
    rel_l2 = max_abs = float("nan")
    if non_finite == 0:
        rel_l2 = relative_l2(onnx_out, torch_out)
        max_abs = float(np.abs(onnx_out.astype(np.float64) - torch_out).max())
    return PartParity(kind=kind, precision=precision, batch=int(onnx_out.shape[0]), rel_l2=rel_l2, max_abs=max_abs,
                      tolerance=tolerance, non_finite=non_finite)
