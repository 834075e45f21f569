"""Parity of an exported ONNX against the PyTorch fake-quant model it came from.

Comparing final outputs alone cannot tell an export bug from chaos: a quantized UNet rounds every
activation, so a 1e-7 float difference upstream can move one value across a rounding boundary and
the flipped code then spreads through the remaining layers (random-weight test models amplify this
strongly). The check therefore also compares the integer codes of every QuantizeLinear, in graph
order, with the codes PyTorch computes: an export bug (wrong scale, axis, rounding or range) makes
the first divergent layer differ in many places; a boundary flip makes it differ in a handful.

The `ort-qlinear` target adds an int8 rounding of each quantized Conv's output (and an int32 bias),
which the fake-quant model does not have; exact parity with the student then cannot hold. Its graph
names those roundings (converters.ort_qlinear.output_rounding), and the PyTorch side applies the same
ones through hooks (rounded_conv_outputs), so the check still compares like with like, at the same
tolerances, and the output codes are compared as well.

Why not Polygraphy's Comparator (an ONNX Runtime runner against a runner of the PyTorch student, with
per-output tolerances): it compares outputs, and in a quantized UNet an output difference cannot tell an
export bug from one value rounded the other way (above); what tells them apart is the integer codes of
every QuantizeLinear against the codes PyTorch computes at the same layer, which needs hooks on the
student's quantizers and probe outputs on the graph that Comparator has no notion of. The tensorrt
target, whose FP16 arithmetic flips codes by design, is judged by its output alone
(output_parity_verdict), which is what Comparator would do, at a stated tolerance, in ten lines here
without a dependency.

parity_verdict turns a report into pass / fail with the reason (export's gate, README "Parity, and
its tolerance"): non-finite values anywhere fail; every input whose codes all agree must match to
EXACT_REL_TOL relative L2; the first layer whose codes differ may differ in at most
FLIP_FRACTION_TOL of its codes, by at most MAX_CODE_STEP. When every input has a flip (the ort-qlinear
target rounds every Conv output, so on random-weight test UNets 4 of 4 inputs often do) the codes are
the whole check; the tests hold seeded inputs to the stricter rule that some input has no flip.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pqcad_deploy.engines.ort_session import ort_session
from pqcad_deploy.artifact import load_artifact
from pqcad_deploy.quant.replace import quant_layers

__all__ = ["EXACT_REL_TOL", "FLIP_FRACTION_TOL", "MAX_CODE_STEP", "LayerFlips", "ParityReport", "ParityVerdict",
           "output_parity_verdict", "parity_report", "parity_verdict"]

EXACT_REL_TOL = 1e-5
"""An input whose integer codes all agree with PyTorch's must match its output to this relative L2."""
FLIP_FRACTION_TOL = 1e-3
"""The first layer whose codes differ may differ in at most this fraction of its codes ..."""
MAX_CODE_STEP = 1
"""... each by at most this many steps (a value on a rounding boundary)."""


@dataclass(frozen=True)
class LayerFlips:
    layer: str
    flipped: int
    total: int
    max_code_difference: int

    @property
    def fraction(self) -> float:
        return self.flipped / max(self.total, 1)


@dataclass(frozen=True)
class ParityReport:
    """Per-sample relative L2 error of the output, and the first layer whose input codes differ."""

    sample_rel_errors: list[float]
    first_divergence: LayerFlips | None
    samples_without_flips: list[int]
    non_finite: str | None = None  # "ONNX Runtime output has 12 nan/inf values", or None when all finite

    @property
    def max_rel_error_without_flips(self) -> float:
        errs = [self.sample_rel_errors[i] for i in self.samples_without_flips]
        return max(errs) if errs else 0.0


@dataclass(frozen=True)
class ParityVerdict:
    """Pass or fail, the reason in words, and the measured value against its threshold when it failed."""

    passed: bool
    reason: str

    def __str__(self) -> str:
        return f"{'pass' if self.passed else 'fail'} ({self.reason})"


def parity_verdict(report: ParityReport) -> ParityVerdict:
    """The parity gate: pass or fail, with the numbers that decided it (module doc)."""
    n = len(report.sample_rel_errors)
    if report.non_finite is not None:
        return ParityVerdict(False, f"{report.non_finite}; every value must be finite")
    clean = report.samples_without_flips
    exact = report.max_rel_error_without_flips
    if clean and not exact <= EXACT_REL_TOL:
        return ParityVerdict(False, f"relative error {exact:.2e} on an input whose codes all agree, "
                                    f"threshold {EXACT_REL_TOL:.0e}")
    first = report.first_divergence
    if first is not None:
        if first.fraction > FLIP_FRACTION_TOL:
            return ParityVerdict(False, f"{first.layer} differs in {first.fraction:.2e} of its codes "
                                        f"({first.flipped}/{first.total}), threshold {FLIP_FRACTION_TOL:.0e}")
        if first.max_code_difference > MAX_CODE_STEP:
            return ParityVerdict(False, f"{first.layer}'s codes differ by up to {first.max_code_difference} steps, "
                                        f"threshold {MAX_CODE_STEP}")
    flips = "no rounding flips" if first is None else (
        f"first flip in {first.layer}: {first.flipped}/{first.total} codes = {first.fraction:.1e} <= "
        f"{FLIP_FRACTION_TOL:.0e}, by {first.max_code_difference} step")
    if not clean:
        return ParityVerdict(True, f"every input had a rounding flip, so outputs were compared through the codes "
                                   f"only; {flips}")
    return ParityVerdict(True, f"{len(clean)}/{n} inputs with identical codes, relative error {exact:.1e} <= "
                               f"{EXACT_REL_TOL:.0e}; {flips}")


def output_parity_verdict(report: ParityReport, tolerance: float) -> ParityVerdict:
    """Pass when every output is finite and within `tolerance` relative L2 of the student's.

    For a graph whose arithmetic differs from the student's by design (the tensorrt target: FP16, one
    scale per tensor, rounded residual inputs), integer codes flip wherever FP16 moves a value across a
    rounding boundary, so they cannot tell a bug from FP16; the outputs' error bound does, since an
    export bug (wrong scale, axis, layout) moves outputs by tens of percent, not by FP16's few.
    """
    if report.non_finite is not None:
        return ParityVerdict(False, f"{report.non_finite}; every value must be finite")
    worst = max(report.sample_rel_errors)
    if not worst <= tolerance:
        return ParityVerdict(False, f"relative error {worst:.2e} of the output, threshold {tolerance:.0e}")
    return ParityVerdict(True, f"relative error of the output at most {worst:.1e} <= {tolerance:.0e} "
                               f"(FP16 graph: codes not compared)")


def _torch_codes(student: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
                 rounding: dict | None = None, cond: dict[str, torch.Tensor] | None = None) -> tuple[np.ndarray, dict]:
    from pqcad_deploy.converters.ort_qlinear import rounded_conv_outputs

    codes: dict[str, np.ndarray] = {}
    output_codes: dict[str, np.ndarray] = {}
    hooks = []
    for name, layer in quant_layers(student).items():
        if layer.act_bits is None:
            continue  # a float input has no QuantizeLinear in the graph

        def hook(module, inputs, name=name):
            codes[name] = module.input_codes(inputs[0]).numpy()
        hooks.append(layer.register_forward_pre_hook(hook))
    try:
        with torch.no_grad(), rounded_conv_outputs(student, rounding or {}, output_codes):
            out = student(x, t, **(cond or {})).sample.numpy()
    finally:
        for h in hooks:
            h.remove()
    codes.update({f"{name}{_OUTPUT_SUFFIX}": c for name, c in output_codes.items()})
    return out, codes


_OUTPUT_SUFFIX = ":output"  # key of a layer's output codes (ort-qlinear)




def _onnx_codes(model, x: np.ndarray, t: np.ndarray, optimization_level: str = "disabled",
                cond: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, dict, list[str]]:
    """Run the loaded ONNX `model` (probe outputs are appended to it in place) and read its codes."""
    import onnx

    inits = {i.name: i for i in model.graph.initializer}
    q_outputs: dict[str, str] = {}
    zero_points: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.name.endswith(("/input_quantize", "/output_quantize")):
            layer, _, role = node.name.rpartition("/")
            name = layer if role == "input_quantize" else f"{layer}{_OUTPUT_SUFFIX}"
            q_outputs[name] = node.output[0]
            # Codes are compared on the symmetric grid: a uint8 code with zero-point 128 (ort-x86
            # target) is the int8 code + 128.
            zp = inits.get(node.input[2]) if len(node.input) > 2 else None
            zero_points[name] = 0 if zp is None else int(onnx.numpy_helper.to_array(zp).astype(np.int32))
    order = list(q_outputs)
    for name in order:
        # INT4 tensors have no numpy type in onnxruntime's Python API: read every code as INT32.
        probe = f"{q_outputs[name]}/parity_codes"
        model.graph.node.append(onnx.helper.make_node("Cast", [q_outputs[name]], [probe], to=onnx.TensorProto.INT32))
        model.graph.output.append(onnx.ValueInfoProto(name=probe))
    session = ort_session(model.SerializeToString(), optimization_level=optimization_level)
    results = session.run(None, {"sample": x, "timestep": t, **(cond or {})})
    out = results[0]
    codes = {name: results[1 + i].astype(np.int32) - zero_points[name] for i, name in enumerate(order)}
    return out, codes, order


def parity_report(artifact_path, onnx_path, n: int = 8, seed: int = 0,
                  optimization_level: str = "disabled", conditioning=None) -> ParityReport:
    """Run both models on `n` seeded inputs at timesteps spread over the schedule.

    optimization_level: ONNX Runtime's graph optimization for the ONNX side ("disabled" runs the
    graph as written; "extended" runs what an engine runs, with Q/DQ fused into integer kernels).

    A conditional model gets input i's condition as image i of a sampling run does (``class_labels``:
    class ``i % classes``; ``encoder_hidden_states``: row ``i % rows`` of the artifact's embeddings), on both
    sides. ``conditioning``: the artifact's PyTorch conditioning, when the caller has it already (None:
    converters.conditions.artifact_conditioning, which reads a latent artifact's pipeline folder).
    """
    import onnx

    from pqcad_deploy.converters.conditions import artifact_conditioning, torch_conditions
    from pqcad_deploy.converters.ort_qlinear import output_rounding

    artifact = load_artifact(artifact_path)
    student = artifact.build_student()
    c, h, w = artifact.manifest.image_shape
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((n, c, h, w), generator=generator)
    steps = artifact.manifest.student_timesteps
    t = torch.tensor([float(steps[int(i)]) for i in np.linspace(0, len(steps) - 1, n)])
    if conditioning is None:
        conditioning = artifact_conditioning(artifact.manifest, artifact_path, report=artifact.report)
    cond = torch_conditions(conditioning, n)  # {} for an unconditional model
    model = onnx.load(str(onnx_path))
    ref, t_codes = _torch_codes(student, x, t, output_rounding(model), cond)
    out, o_codes, order = _onnx_codes(model, x.numpy(), t.numpy(), optimization_level,
                                      {name: value.numpy() for name, value in cond.items()})
    diff = (out - ref).reshape(n, -1)
    norm = np.maximum(np.linalg.norm(ref.reshape(n, -1), axis=1), 1e-12)
    rel = (np.linalg.norm(diff, axis=1) / norm).tolist()
    first = None
    clean = set(range(n))
    for name in order:
        if name not in t_codes:
            continue  # a rounding only the graph has (the tensorrt target's residual Adds)
        a, b = t_codes[name].astype(np.int32), o_codes[name]
        mismatch = a != b
        if mismatch.any():
            flipped_samples = {int(i) for i in np.nonzero(mismatch.reshape(n, -1).any(axis=1))[0]}
            clean -= flipped_samples
            if first is None:
                first = LayerFlips(layer=name, flipped=int(mismatch.sum()), total=int(mismatch.size),
                                   max_code_difference=int(np.abs(a - b).max()))
    bad = [f"{side} output has {count} nan/inf values" for side, count in
           (("PyTorch", int((~np.isfinite(ref)).sum())), ("ONNX Runtime", int((~np.isfinite(out)).sum())))
           if count]
    return ParityReport(sample_rel_errors=rel, first_divergence=first, samples_without_flips=sorted(clean),
                        non_finite="; ".join(bad) or None)
