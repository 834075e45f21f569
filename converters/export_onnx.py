"""Artifact -> our QDQ ONNX (docs/CONTRACTS.md section 2).

The student's integer codes and learned scales are written into the graph as they are (never
re-calibrated): the fake-quant layers are swapped for export twins (converters.qdq) and the model is
traced by PyTorch's TorchScript exporter, which honours the twins' `symbolic` methods. The result is
then tidied (names from converters.naming, INT4 zero-points where needed), stamped with the manifest
that engines read, checked with `onnx.checker.check_model(full_check=True)`, optionally held to the
parity gate (converters.parity.parity_verdict, on the temporary file) and only then moved into place.
The bytes depend only on the artifact and the options (no timestamps; the ort-qlinear calibration is
seeded), so the same artifact exported twice gives the same file.

A latent artifact (a pipeline's cross-attention UNet) takes ``encoder_hidden_states`` as its third input
and gets its other parts (VAE decoder, text encoder + tokenizer or class table) written beside it in
``NAME.parts/`` by the same call, listed in its manifest and published with it (converters.export_parts).
"""

from __future__ import annotations

import os
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pqcad_deploy.converters.conditions import artifact_conditioning, condition_spec, torch_conditions
from pqcad_deploy.converters.export_parts import WrittenParts, plan_parts, staged_parts
from pqcad_deploy.converters.naming import qdq_names
from pqcad_deploy.converters.parity import ParityVerdict
from pqcad_deploy.converters.qdq import to_export_layer
from pqcad_deploy.converters.targets import EXPORT_TARGETS, RewriteContext, export_target
from pqcad_deploy.engines.manifest import OnnxManifest, output_name_for, write_onnx_manifest
from pqcad_deploy.artifact import CompressedArtifact, artifact_digest, load_artifact
from pqcad_deploy.errors import ExportError, OutputPathError
from pqcad_deploy.layer_precision import FIRST_LAYER, LAST_LAYER
from pqcad_deploy.quant.replace import quant_layers

__all__ = ["DEFAULT_OPSET", "DEFAULT_TARGET", "SUPPORTED_OPSETS", "TARGETS", "WEIGHT_STORAGES", "ExportResult",
           "ParityGateError", "export_onnx", "precision_name", "resolve_target"]

DEFAULT_OPSET = 17  # the ONNX Runtime targets'; each target's own is ExportTarget.default_opset
# 13: per-axis QuantizeLinear/DequantizeLinear. 21: INT4 Q/DQ (4-bit activations).
SUPPORTED_OPSETS: tuple[int, ...] = tuple(range(13, 22))
_TORCHSCRIPT_MAX_OPSET = 20
# The concrete targets are converters.targets.EXPORT_TARGETS (qdq, ort-x86, ort-qlinear). onnxruntime:
# whichever of these ONNX Runtime runs fastest for the artifact (resolve_target): ort-qlinear when every
# quantized layer has 8-bit activations, else qdq (ONNX Runtime has no 4-bit kernels).
TARGETS: tuple[str, ...] = ("onnxruntime", *EXPORT_TARGETS)
DEFAULT_TARGET = "onnxruntime"  # the CLI's default; export_onnx's own default stays "qdq"
# How 4-bit weight codes are stored. int4: ONNX INT4 initializers, two codes a byte (opset >= 21).
# int8: the codes in an INT8 container (any opset). auto: int4 where the target and opset allow it.
WEIGHT_STORAGES: tuple[str, ...] = ("auto", "int4", "int8")
_INT4_MIN_OPSET = 21
_EXPORT_PREFIX = "unet."


@dataclass(frozen=True)
class ExportResult:
    path: Path
    precision: str
    opset: int
    num_quantized_layers: int
    size_bytes: int
    target: str = "qdq"
    int4_weight_layers: int = 0  # layers whose weight codes are INT4 initializers
    calibration_seconds: float = 0.0  # ort-qlinear: time spent calibrating the Conv output scales
    requested_target: str = "qdq"  # what was asked for ("onnxruntime" resolves to `target`)
    target_reason: str = ""  # why "onnxruntime" resolved to `target`
    parity: ParityVerdict | None = None  # None when parity was not checked
    rewrite: object = None  # the target rewrite's summary (converters.tensorrt.TensorRTRewrite), if any
    conditioning: object = None  # a conditional model's engines.conditioning.ConditioningSpec (its graph input)
    parts: WrittenParts | None = None  # a latent model's NAME.parts/ (converters.export_parts), with its parity


class ParityGateError(ExportError):
    """The exported graph failed the parity gate; nothing was written."""


class _UNetForExport(nn.Module):
    """(sample, timestep[batch], *conditions) -> the UNet's prediction tensor.

    A conditional model's inputs (``class_labels`` [batch]) follow as positional graph inputs and reach
    the UNet as the keyword arguments it takes (``condition_names``, in graph order).
    """

    def __init__(self, unet: nn.Module, condition_names: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.unet = unet
        self.condition_names = condition_names

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *conditions: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, **dict(zip(self.condition_names, conditions))).sample


def precision_name(artifact: CompressedArtifact, fp: bool) -> str:
    """'fp32', 'w8a8', 'w4a8', 'w4a4', or 'mixed' when layers differ.

    The first and last conv (conv_in, conv_out) do not count: the learned methods keep them at 8-bit
    weights with float inputs by default (--first-last), and a W4A8 model with those two layers is
    what users call W4A8. The manifest's bit histograms show them.
    """
    if fp:
        return "fp32"
    layers = artifact.manifest.layers
    inner = [r for n, r in layers.items() if n not in (FIRST_LAYER, LAST_LAYER)] or list(layers.values())
    pairs = {(r.weight_bits, r.act_bits) for r in inner}
    if len(pairs) == 1:
        w, a = pairs.pop()
        return f"w{w}a{'fp' if a is None else a}"
    return "mixed"


def _act_bit_histogram(layers: list) -> dict[str, int]:
    """{"8": n, "fp": m}: layers per activation bit-width, "fp" for float inputs (first/last conv)."""
    counts = Counter("fp" if r.act_bits is None else str(r.act_bits) for r in layers)
    return dict(sorted(counts.items()))


def _swap_in_export_twins(unet: nn.Module, artifact: CompressedArtifact) -> int:
    """Replace each quantized layer by its export twin, carrying the artifact's stored codes and scales."""
    layers = quant_layers(unet)
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        setattr(parent, child, to_export_layer(layer, artifact.layer_tensors(name)))
    return len(layers)


def _check_opset(opset: int, artifact: CompressedArtifact, fp: bool, target: str) -> None:
    if opset not in SUPPORTED_OPSETS:
        raise ExportError(f"--opset must be one of {SUPPORTED_OPSETS[0]}..{SUPPORTED_OPSETS[-1]}; got {opset}.")
    if opset < (lowest := export_target(target).min_opset):
        raise ExportError(f"--target {target} needs --opset {lowest} or newer; got {opset}.")
    if not fp and opset < 21 and any(r.act_bits == 4 for r in artifact.manifest.layers.values()):
        raise ExportError(
            "this artifact has 4-bit activations, which need INT4 QuantizeLinear: pass --opset 21 "
            "(ONNX Runtime only; TensorRT has no 4-bit activations)."
        )


def resolve_target(target: str, layer_act_bits: dict[str, int | None], weight_storage: str = "auto",
                   fp: bool = False) -> tuple[str, str]:
    """(concrete target, reason): "onnxruntime" becomes the target ONNX Runtime runs fastest.

    ort-qlinear (QLinearConv) when every quantized layer has 8-bit (or float) inputs and the weights
    may be stored as int8; otherwise qdq (ONNX Runtime has no 4-bit kernels; INT4 initializers are a
    qdq layout). Other targets are returned as they are, with an empty reason.
    """
    if target not in TARGETS:
        raise ExportError(f"--target must be one of {', '.join(TARGETS)}; got {target!r}.")
    if target != "onnxruntime":
        return target, ""
    if fp:
        return "qdq", "the FP model has no quantized layers"
    four = sorted(name for name, bits in layer_act_bits.items() if bits == 4)
    if four:
        return "qdq", f"{len(four)} layers have 4-bit activations, which ONNX Runtime has no integer kernels for"
    if weight_storage == "int4":
        return "qdq", "--weight-storage int4 is a qdq layout"
    return "ort-qlinear", "every quantized layer has 8-bit activations: QLinearConv kernels"


def _weight_storage(storage: str, target: str, opset: int, fp: bool) -> str:
    """Resolve --weight-storage to int4 or int8 (refusing what the target or opset cannot hold)."""
    if storage not in WEIGHT_STORAGES:
        raise ExportError(f"--weight-storage must be one of {', '.join(WEIGHT_STORAGES)}; got {storage!r}.")
    if storage == "int4":
        if opset < _INT4_MIN_OPSET:
            raise ExportError(f"--weight-storage int4 needs --opset {_INT4_MIN_OPSET} (INT4 DequantizeLinear); "
                              f"got {opset}.")
        if (refusal := export_target(target).int4_refusal) is not None:
            raise ExportError(refusal)
    if storage == "auto":
        holds_int4 = export_target(target).int4_refusal is None
        return "int4" if opset >= _INT4_MIN_OPSET and holds_int4 and not fp else "int8"
    return storage


def pack_int4(codes: np.ndarray) -> bytes:
    """ONNX INT4 raw data: two's-complement nibbles, two a byte, the first element in the low nibble."""
    nibbles = (codes.astype(np.int8).ravel() & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()


def _store_int4_weights(model, layer_weight_bits: dict[str, int]) -> int:
    """Retype the weight codes (and weight zero-points) of 4-bit layers to INT4, packed two a byte."""
    from onnx import TensorProto, helper, numpy_helper

    from pqcad_deploy.converters.naming import qdq_names

    inits = {i.name: i for i in model.graph.initializer}
    n = 0
    for layer, bits in layer_weight_bits.items():
        if bits != 4:
            continue
        names = qdq_names(layer)
        for name in (names.weight_codes, names.weight_zero_point):
            codes = numpy_helper.to_array(inits[name])
            if codes.dtype != np.int8 or codes.size and (codes.min() < -8 or codes.max() > 7):
                raise ExportError(f"{name}: not 4-bit int8 codes, cannot store as INT4")
            inits[name].CopyFrom(helper.make_tensor(name, TensorProto.INT4, codes.shape, pack_int4(codes), raw=True))
        n += 1
    return n


def _rename(model, old_to_new: dict[str, str]) -> None:
    graph = model.graph
    for init in graph.initializer:
        init.name = old_to_new.get(init.name, init.name)
    for node in graph.node:
        node.input[:] = [old_to_new.get(i, i) for i in node.input]
        node.output[:] = [old_to_new.get(o, o) for o in node.output]
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        value.name = old_to_new.get(value.name, value.name)


def _undo_initializer_sharing(model) -> None:
    """Give back each layer its own scale / zero-point tensors.

    The TorchScript exporter de-duplicates equal initializers (to_q, to_k and to_v see the same
    input and get the same activation scale) and re-creates the copies with Identity nodes. Each
    consumer should own its Q/DQ parameters (TensorRT and ONNX Runtime fuse per node unit, and the
    names must say which layer a scale belongs to), so the Identity nodes become initializers again.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = type(inits[node.input[0]])()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def _tidy_graph(model, layer_bits: dict[str, int]) -> None:
    """Strip the wrapper prefix, name Q/DQ nodes per layer, make zero-points named initializers."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    _undo_initializer_sharing(model)
    _rename(model, {i.name: i.name[len(_EXPORT_PREFIX):] for i in graph.initializer
                    if i.name.startswith(_EXPORT_PREFIX)})
    constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    producers = {o: n for n in graph.node for o in n.output}
    used_constants: set[str] = set()
    new_inits = []
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        src = node.input[0]
        if node.op_type == "QuantizeLinear" or (src in producers and producers[src].op_type == "QuantizeLinear"):
            layer = node.input[1][: -len(".act_scale")] if node.input[1].endswith(".act_scale") else None
            if layer is None:
                continue
            names = qdq_names(layer)
            node.name = names.input_quantize if node.op_type == "QuantizeLinear" else names.input_dequantize
            zp = node.input[2]
            if zp in constants:
                used_constants.add(zp)
                node.input[2] = names.act_zero_point
                if not any(i.name == names.act_zero_point for i in new_inits):
                    if layer_bits.get(layer) == 4:
                        new_inits.append(helper.make_tensor(names.act_zero_point, TensorProto.INT4, [], [0]))
                    else:
                        new_inits.append(numpy_helper.from_array(
                            onnx.numpy_helper.to_array(constants[zp].attribute[0].t), names.act_zero_point))
        elif src.endswith(".weight_codes"):
            node.name = qdq_names(src[: -len(".weight_codes")]).weight_dequantize
    still_used = {i for n in graph.node if n.op_type != "Constant" and n.output[0] not in used_constants
                  for i in n.input}
    keep = [n for n in graph.node if not (n.op_type == "Constant" and n.output[0] in used_constants
                                          and n.output[0] not in still_used)]
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(new_inits)


def _set_opset(model, opset: int) -> None:
    """Raise the default-domain opset after tracing (the TorchScript exporter stops at 20)."""
    if any(n.op_type == "GroupNormalization" for n in model.graph.node):
        raise ExportError("the graph uses GroupNormalization, whose meaning changed in opset 21; use --opset 20 or lower.")
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = opset


def export_onnx(artifact_path: Path | str, out_path: Path | str, *, fp: bool = False,
                opset: int | None = None, overwrite: bool = False, target: str = "qdq",
                weight_storage: str = "auto", output_statistic: str = "max", parity: bool = False,
                parity_gate: bool = True, parity_samples: int = 4, pipeline: Path | str | None = None,
                vae_precision: str = "auto") -> ExportResult:
    """Write the artifact's student (or, with fp=True, its FP teacher) as our ONNX at `out_path`.

    target: "qdq" (int8 symmetric Q/DQ on every quantized layer, float32), "tensorrt" (converters.tensorrt:
        FP16, shared Q/DQ, quantized residual Adds), "ort-x86" (converters.ort_x86), "ort-qlinear"
        (converters.ort_qlinear), or "onnxruntime" (the fastest of the ONNX Runtime ones for this
        artifact, resolve_target; the CLI's default).
    opset: None: the target's default_opset (19 for tensorrt, else DEFAULT_OPSET).
    weight_storage: how 4-bit weight codes are stored, see WEIGHT_STORAGES.
    output_statistic: ort-qlinear only, the Conv output range its scales come from
        (converters.ort_qlinear.OUTPUT_STATISTICS; "max" measured best).
    parity: compare the written graph with the PyTorch fake-quant model on `parity_samples` seeded
        inputs before it is moved into place (converters.parity; not for fp). The verdict is in the
        result. parity_gate: a failed verdict raises ParityGateError and nothing is written;
        without the gate the ONNX is written anyway. A latent model's VAE decoder and text encoder are
        checked too (converters.export_parts.PART_PARITY), also for fp, under the same gate.
    pipeline: a latent artifact's pipeline folder (default: the one it records having been compressed
        from); its VAE decoder, and text encoder + tokenizer or class table, go into ``NAME.parts/``.
    vae_precision: the VAE decoder's, converters.export_parts.VAE_PRECISION_CHOICES ("auto": fp16 for the
        tensorrt target, fp32 otherwise).
    """
    import onnx

    from pqcad_deploy.engines._atomic import atomic_file, check_output_file

    out_path = check_output_file(out_path, overwrite=overwrite, error=OutputPathError, is_ours=_is_our_onnx,
                                 what="pqcad-deploy ONNX")
    parent = out_path.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise OutputPathError(f"cannot write {out_path}: {parent} is not a writable directory.")
    if target not in TARGETS:
        raise ExportError(f"--target must be one of {', '.join(TARGETS)}; got {target!r}.")
    if weight_storage not in WEIGHT_STORAGES:
        raise ExportError(f"--weight-storage must be one of {', '.join(WEIGHT_STORAGES)}; got {weight_storage!r}.")
    artifact = load_artifact(artifact_path)
    conditioning = artifact_conditioning(artifact.manifest, artifact_path, report=artifact.report, pipeline=pipeline)
    cond_spec = condition_spec(conditioning)  # the engines' manifest entry; None for an unconditional model
    requested_target = target
    target, target_reason = resolve_target(target, {n: r.act_bits for n, r in artifact.manifest.layers.items()},
                                           weight_storage, fp)
    spec = export_target(target)
    opset = spec.default_opset if opset is None else opset
    m = artifact.manifest
    layer_act_bits = {name: r.act_bits for name, r in m.layers.items()}
    if spec.check is not None and not fp:  # first: what the target cannot express at any opset
        spec.check(layer_act_bits, output_statistic)
    storage = _weight_storage(weight_storage, target, opset, fp)
    _check_opset(opset, artifact, fp, target)
    parts_plan = plan_parts(m, cond_spec, target, vae_precision=vae_precision, pipeline=pipeline,
                            artifact=artifact_path, onnx_path=out_path, overwrite=overwrite)  # None: a pixel model
    unet = artifact.build_teacher() if fp else artifact.build_student()
    calibration_seconds, target_state = 0.0, None
    if spec.calibrate is not None and not fp:
        started = time.perf_counter()
        target_state = spec.calibrate(unet, m, output_statistic, conditioning)
        calibration_seconds = time.perf_counter() - started
    n_quant = 0 if fp else _swap_in_export_twins(unet, artifact)
    example_conditions = torch_conditions(conditioning, 2)  # {} for an unconditional model
    wrapper = _UNetForExport(unet, tuple(example_conditions)).eval()
    output_name = output_name_for(m.prediction_type)
    c, h, w = m.image_shape
    example = (torch.zeros(2, c, h, w), torch.full((2,), float(m.student_timesteps[0])),
               *example_conditions.values())
    input_names = ["sample", "timestep", *example_conditions]  # the manifest's graph_inputs, in order

    verdict = None
    # both moved into place only if all of this passes: the parts folder first, then the ONNX
    with atomic_file(out_path, error=OutputPathError) as tmp, \
            staged_parts(out_path, parts_plan, overwrite=overwrite, parity=parity) as parts:
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    wrapper, example, str(tmp), dynamo=False, opset_version=min(opset, _TORCHSCRIPT_MAX_OPSET),
                    input_names=input_names, output_names=[output_name],
                    dynamic_axes={name: {0: "batch"} for name in (*input_names, output_name)},
                    do_constant_folding=True,
                )
            model = onnx.load(str(tmp))
            _tidy_graph(model, {} if fp else layer_act_bits)
            n_int4, summary = 0, None
            if fp and spec.fp_rewrite is not None:
                spec.fp_rewrite(model)
            elif not fp and spec.rewrite is not None:
                context = RewriteContext(opset=opset, int4=storage == "int4",
                                         layer_weight_bits={name: r.weight_bits for name, r in m.layers.items()})
                summary = spec.rewrite(model, layer_act_bits, target_state, context)
                n_int4 = len(getattr(summary, "int4_layers", ()))
            elif not fp and storage == "int4":
                n_int4 = _store_int4_weights(model, {name: r.weight_bits for name, r in m.layers.items()})
            if opset > _TORCHSCRIPT_MAX_OPSET:
                _set_opset(model, opset)
            model.producer_name = "pqcad-deploy"
            layers = [] if fp else list(m.layers.values())
            manifest = OnnxManifest(
                precision=precision_name(artifact, fp),
                image_shape=tuple(m.image_shape),
                scheduler_config=m.scheduler_config,
                prediction_type=m.prediction_type,
                teacher_steps=m.teacher_steps,
                student_timesteps=tuple(_teacher_timesteps(m) if fp else m.student_timesteps),
                artifact_sha256=artifact_digest(artifact.path),
                weight_bits={str(k): v for k, v in sorted(Counter(r.weight_bits for r in layers).items())},
                act_bits=_act_bit_histogram(layers),
                conditioning=cond_spec,
                parts=() if parts is None else parts.files,
                decoded_image_shape=None if parts is None else parts.decoded_image_shape,
            )
            write_onnx_manifest(model, manifest)
            onnx.checker.check_model(model, full_check=True)
            onnx.save(model, str(tmp))
            if parity and not fp:
                verdict = _check_parity(artifact.path, tmp, target, parity_samples, conditioning)
                if not verdict.passed and parity_gate:
                    raise ParityGateError(f"parity vs PyTorch failed: {verdict.reason}; {out_path} was not written "
                                          "(an export bug, or an artifact that does not compute finite values; "
                                          "--no-parity-gate writes it anyway).")
            failed = [p for p in (() if parts is None else parts.parity) if not p.passed]
            if failed and parity_gate:
                raise ParityGateError(f"parity of the {failed[0].kind} vs PyTorch failed: {failed[0]}; {out_path} and "
                                      "its parts were not written (--no-parity-gate writes them anyway).")
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"the exported graph failed onnx.checker: {str(exc).splitlines()[0]}") from None
    return ExportResult(path=out_path, precision=manifest.precision, opset=opset,
                        num_quantized_layers=n_quant, size_bytes=out_path.stat().st_size,
                        target="qdq" if fp and spec.fp_rewrite is None else target,
                        int4_weight_layers=n_int4, calibration_seconds=calibration_seconds,
                        requested_target=requested_target, target_reason=target_reason, parity=verdict,
                        rewrite=summary, conditioning=cond_spec, parts=parts)


def _is_our_onnx(path: Path) -> bool:
    """An existing file --overwrite may replace: an ONNX carrying our manifest."""
    from pqcad_deploy.engines.manifest import read_onnx_manifest

    try:
        read_onnx_manifest(path)
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False
    return True


def _check_parity(artifact_path: Path, onnx_path: Path, target: str, n: int, conditioning) -> ParityVerdict:
    """The parity verdict of the graph at `onnx_path`: as written for qdq, as ONNX Runtime optimizes
    it (what an engine runs) for the ONNX Runtime targets; conditioned as the export was."""
    from pqcad_deploy.converters.parity import output_parity_verdict, parity_report, parity_verdict

    spec = export_target(target)
    report = parity_report(artifact_path, onnx_path, n=n, optimization_level=spec.parity_level,
                           conditioning=conditioning)
    if spec.parity_output_tolerance is not None:
        return output_parity_verdict(report, spec.parity_output_tolerance)
    return parity_verdict(report)


def _teacher_timesteps(m) -> list[int]:
    from pqcad_deploy.schedule import ddim_timesteps

    return ddim_timesteps(m.scheduler_config, m.teacher_steps)
