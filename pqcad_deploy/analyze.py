"""Where a quantized student's error comes from, measured on the student's own DDIM trajectories.

The student samples `n` images (DDIM, eta 0) at its own timesteps from one ``torch.Generator``
seeded with `seed`; every (x_t, t) it visits is kept. On that set:

* **error by timestep**: ||eps_student - eps_fp||^2 / ||eps_fp||^2 (summed over the images at that t),
  both models evaluated on the same student x_t, also as SQNR dB;
* **per-layer sensitivity**: the FP teacher with only one layer's weight (the student's dequantized
  weight copied in) or only its input (fake-quantized with the student's scale and bits, by a
  forward pre-hook) quantized, relative MSE against the plain FP eps over all points; plus every
  weight at once and every activation at once; for each, also the signed per-channel mean shift of
  eps it causes (what the sampler integrates into a brightness or colour drift), ranked apart;
* **x0 channel drift**: the clipped x0 each model implies at each t, per image channel,
  mean(x0_student) - mean(x0_fp) in 0-255 units; and the final images' per-channel mean, the
  student's samples against the teacher's from the same noise (teacher's own DDIM grid).

The stepping is the project's torch DDIM (:mod:`pqcad_deploy.distill.target`, float64, clipping as
the scheduler config says), with the next timestep taken from the list like the engines do, so any
student grid (distilled ones too) is stepped exactly. Only epsilon-prediction models are supported.

A latent artifact (a pipeline's cross-attention UNet) is measured the same way on its latents; its image
measures (the x0 drift and the final images' channel means) are taken on the images its pipeline's VAE decodes
them to, so they are in RGB like a pixel model's. The VAE and the embeddings its conditioning reads come from
the pipeline folder it was compressed from, checked against the artifact's record
(:mod:`pqcad_deploy.artifact_pipeline`).
The result is a directory with ``analysis.json`` and ``analysis.png``, published atomically.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from pqcad_deploy.conditioning import UNCONDITIONAL, Conditioning, guided_eps, select_rows
from pqcad_deploy.errors import ArtifactError, ConfigError, OutputPathError
from pqcad_deploy.eval.sqnr import sqnr_db_from_powers

__all__ = ["ANALYSIS_KIND", "AnalysisResult", "analyze_artifact", "measure", "summary_lines"]

ANALYSIS_KIND = "analysis"
JSON_FILE = "analysis.json"
PNG_FILE = "analysis.png"
_TO_255 = 127.5  # [-1, 1] model units -> 0-255 pixel units


@dataclass(frozen=True)
class AnalysisResult:
    out_dir: Path
    data: dict  # the contents of analysis.json
    seconds: float


def _rel(err: float, ref: float) -> dict:
    """{"rel_mse", "sqnr_db"}; sqnr_db is None where the error is exactly 0 (infinite SQNR)."""
    rel = err / ref if ref > 0 else (0.0 if err == 0 else math.inf)
    return {"rel_mse": rel, "sqnr_db": None if rel == 0 or not math.isfinite(rel) else sqnr_db_from_powers(ref, err)}


def _channel_shift(d: torch.Tensor) -> list[float]:
    """Per-channel mean of an eps difference [P, C, H, W]: the shift the sampler integrates into a
    brightness or colour drift (the squared error ranks layers by the noise they add instead)."""
    return d.mean(dim=(0, 2, 3)).tolist()


def _with_shift(d: torch.Tensor, ref: float) -> dict:
    """{"rel_mse", "sqnr_db", "eps_mean_shift"} of a perturbed pass's eps difference `d`."""
    return {**_rel(_sq(d), ref), "eps_mean_shift": _channel_shift(d)}


def _eps(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
         conditioning: Conditioning) -> torch.Tensor:
    """The (guided) noise prediction the sampler uses (pqcad_deploy.conditioning.guided_eps)."""
    return guided_eps(unet, x, t.to(x.dtype), cond, conditioning)


def _sample(unet, noise, timesteps, coeffs, batch_size, device, desc, progress, cond, conditioning):
    """DDIM (eta 0) from `noise` over `timesteps` with sample i conditioned on row i of `cond`; returns
    (final x, visited x_t as [T, N, ...] on the CPU)."""
    from pqcad_deploy.distill.grid import PAST_ZERO
    from pqcad_deploy.distill.target import ddim_step

    finals, visited = [], []
    for start in tqdm(range(0, len(noise), batch_size), desc=desc, unit="batch", disable=not progress):
        x = noise[start:start + batch_size].to(device)
        steps = []
        for i, t in enumerate(timesteps):
            steps.append(x.cpu())
            tt = torch.full((len(x),), int(t), dtype=torch.int64, device=device)
            nxt = torch.full_like(tt, timesteps[i + 1] if i + 1 < len(timesteps) else PAST_ZERO)
            eps = _eps(unet, x, tt, select_rows(cond, slice(start, start + batch_size)), conditioning)
            x = ddim_step(x.double(), eps.double(), *coeffs.alpha_sigma(tt), *coeffs.alpha_sigma(nxt),
                          coeffs.clip_range).to(noise.dtype)
        finals.append(x.cpu())
        visited.append(torch.stack(steps))
    return torch.cat(finals), torch.cat(visited, dim=1)


def _eps_all(unet, xs, ts, batch_size, device, cond, conditioning) -> torch.Tensor:
    """eps of `unet` at every point (xs [P, ...], ts [P], the conditions `cond` [P, ...]), float64 on the CPU,
    in fixed batches."""
    out = [_eps(unet, xs[s:s + batch_size].to(device), ts[s:s + batch_size].to(device),
                select_rows(cond, slice(s, s + batch_size)), conditioning).double().cpu()
           for s in range(0, len(xs), batch_size)]
    return torch.cat(out)


def _decoded(decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor, device: str) -> torch.Tensor:
    """Images in [-1, 1] (float64, CPU) of latents, through the VAE on `device`."""
    return decode(latents.float().to(device)).double().cpu()


def _sq(d: torch.Tensor) -> float:
    return float(d.pow(2).sum())


def _channel_means_255(x: torch.Tensor) -> list[float]:
    """Per-channel mean of [N, C, H, W] images in [-1, 1], as 0-255 pixel values."""
    return ((x.double().clamp(-1, 1) + 1.0) * _TO_255).mean(dim=(0, 2, 3)).tolist()


@torch.no_grad()
def measure(teacher: torch.nn.Module, student: torch.nn.Module, manifest, n: int = 16, seed: int = 0,
            batch_size: int = 16, device: str = "cpu", progress: bool = False,
            sensitivity_steps: int | None = None, conditioning: Conditioning = UNCONDITIONAL,
            decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Every measurement of the module docstring for `student` against `teacher` (see analysis.json).

    Per-layer sensitivity costs two passes over all points per layer; `sensitivity_steps` limits it
    (and the all-weights / all-activations totals) to that many of the student's timesteps, evenly
    spaced from the first to the last (None: all).

    `teacher` is modified during the run (one layer at a time) and restored before returning. A conditional
    artifact is measured as it samples: image i with its condition (class i % classes), guided at the
    artifact's scale. `decode` (a latent model's VAE: latents -> images in [-1, 1]) puts the image measures on
    the decoded images.

    Raises:
        ConfigError: a prediction type other than epsilon.
        ArtifactError: a quantized layer of the student has no matching layer in the teacher.
    """
    from pqcad_deploy.distill.target import DDIMCoefficients
    from pqcad_deploy.quant.layers import QuantConv2d
    from pqcad_deploy.quant.primitives import fake_quantize_activation
    from pqcad_deploy.quant.replace import quant_layers
    from pqcad_deploy.schedule import ddim_timesteps

    if manifest.prediction_type != "epsilon":
        raise ConfigError(f"analyze supports epsilon-prediction models only; this artifact predicts "
                          f"{manifest.prediction_type!r}.")
    coeffs = DDIMCoefficients.from_config(manifest.scheduler_config)
    teacher, student = teacher.to(device).eval(), student.to(device).eval()
    timesteps = [int(t) for t in manifest.student_timesteps]
    teacher_timesteps = ddim_timesteps(manifest.scheduler_config, manifest.teacher_steps)
    noise = torch.randn((n, *manifest.image_shape), generator=torch.Generator("cpu").manual_seed(seed))

    cond = conditioning.draw(torch.arange(n))
    final_student, visited = _sample(student, noise, timesteps, coeffs, batch_size, device, "student DDIM", progress,
                                     cond, conditioning)
    final_fp, _ = _sample(teacher, noise, teacher_timesteps, coeffs, batch_size, device, "teacher DDIM", progress,
                          cond, conditioning)
    if decode is not None:
        final_student, final_fp = (_decoded(decode, v, device) for v in (final_student, final_fp))
    T = len(timesteps)
    xs = visited.reshape(T * n, *visited.shape[2:])
    ts = torch.tensor(timesteps, dtype=torch.int64).repeat_interleave(n)
    point_cond = select_rows(cond, torch.arange(T * n) % n)  # point p is sample p % n at timestep p // n

    eps_fp = _eps_all(teacher, xs, ts, batch_size, device, point_cond, conditioning)
    eps_st = _eps_all(student, xs, ts, batch_size, device, point_cond, conditioning)
    ref = _sq(eps_fp)

    # 1. error by timestep
    per_t_err = (eps_st - eps_fp).pow(2).reshape(T, -1).sum(1)
    per_t_ref = eps_fp.pow(2).reshape(T, -1).sum(1)
    by_t = [{"t": t, **_rel(float(e), float(r))} for t, e, r in zip(timesteps, per_t_err, per_t_ref)]

    # 3. x0 drift per timestep and channel (same x_t for both models)
    a, s = (v.reshape(-1, 1, 1, 1) for v in coeffs.alpha_sigma(ts))
    x64 = xs.double()
    x0_st = (x64 - s * eps_st) / a
    x0_fp = (x64 - s * eps_fp) / a
    if decode is not None:  # the images the predicted latents decode to (in [-1, 1])
        x0_st, x0_fp = (_decoded(decode, v, device) for v in (x0_st, x0_fp))
    x0_st, x0_fp = x0_st.clamp(-1, 1), x0_fp.clamp(-1, 1)
    drift = ((x0_st - x0_fp) * _TO_255).reshape(T, n, *x0_st.shape[1:]).mean(dim=(1, 3, 4))
    del x0_st, x0_fp, x64

    # 2. per-layer sensitivity on the teacher, on all points or those of `sensitivity_steps` timesteps
    sens_t = timesteps
    if sensitivity_steps is not None and sensitivity_steps < T:
        picks = sorted({round(i * (T - 1) / max(sensitivity_steps - 1, 1)) for i in range(sensitivity_steps)})
        sens_t = [timesteps[i] for i in picks]
    keep = torch.isin(ts, torch.tensor(sens_t, dtype=torch.int64))
    s_xs, s_ts, s_cond = xs[keep], ts[keep], select_rows(point_cond, keep)
    # the reference in the same batches as the perturbed passes, so an unchanged model gives exactly 0
    s_fp = eps_fp if len(sens_t) == T else _eps_all(teacher, s_xs, s_ts, batch_size, device, s_cond, conditioning)
    s_ref = _sq(s_fp)
    t_modules = dict(teacher.named_modules())
    q_layers = quant_layers(student)
    for name, q in q_layers.items():
        layer = t_modules.get(name)
        if layer is None or getattr(layer, "weight", None) is None or layer.weight.shape != q.weight.shape:
            raise ArtifactError(f"the teacher has no layer {name} shaped like the student's; the artifact is "
                                "inconsistent.")

    def weights_err(names: list[str]) -> torch.Tensor:  # eps difference from FP
        saved = {nm: t_modules[nm].weight.detach().clone() for nm in names}
        try:
            for nm in names:
                t_modules[nm].weight.copy_(q_layers[nm].quantized_weight())
            return _eps_all(teacher, s_xs, s_ts, batch_size, device, s_cond, conditioning) - s_fp
        finally:
            for nm, w in saved.items():
                t_modules[nm].weight.copy_(w)

    def acts_err(names: list[str]) -> torch.Tensor:  # eps difference from FP
        handles = []
        try:
            for nm in names:
                quantizer = q_layers[nm].input_quantizer
                scale, bits = quantizer.scale.detach().to(device), quantizer.bits

                def hook(_module, args, scale=scale, bits=bits):
                    return (fake_quantize_activation(args[0], scale, bits), *args[1:])

                handles.append(t_modules[nm].register_forward_pre_hook(hook))
            return _eps_all(teacher, s_xs, s_ts, batch_size, device, s_cond, conditioning) - s_fp
        finally:
            for h in handles:
                h.remove()

    act_names = [nm for nm, q in q_layers.items() if q.input_quantizer.quantizes and q.input_quantizer.enabled]
    layers = {}
    for name in tqdm(list(q_layers), desc="layer sensitivity", unit="layer", disable=not progress):
        q = q_layers[name]
        w_diff = weights_err([name])
        a_diff = acts_err([name]) if name in act_names else None
        w_shift = _channel_shift(w_diff)
        a_shift = None if a_diff is None else _channel_shift(a_diff)
        layers[name] = {"kind": "conv2d" if isinstance(q, QuantConv2d) else "linear",
                        "weight_bits": q.weight_bits, "act_bits": q.act_bits,
                        "weight_rel_mse": _rel(_sq(w_diff), s_ref)["rel_mse"],
                        "act_rel_mse": None if a_diff is None else _rel(_sq(a_diff), s_ref)["rel_mse"],
                        "weight_eps_mean_shift": w_shift,
                        "act_eps_mean_shift": a_shift,
                        "max_abs_eps_mean_shift": max(abs(v) for v in w_shift + (a_shift or []))}

    def ranking(key: str) -> list[str]:
        return sorted((nm for nm in layers if layers[nm][key] is not None), key=lambda nm: (-layers[nm][key], nm))

    return {
        "n": n, "seed": seed, "timesteps": timesteps, "teacher_timesteps": teacher_timesteps,
        "image_shape": list(manifest.image_shape), "num_points": T * n,
        "overall": _rel(_sq(eps_st - eps_fp), ref),
        "error_by_timestep": by_t,
        "layers": layers,
        "ranking": {"weight": ranking("weight_rel_mse"), "activation": ranking("act_rel_mse"),
                    "mean_shift": ranking("max_abs_eps_mean_shift")},
        "sensitivity_timesteps": sens_t, "sensitivity_points": int(keep.sum()),
        "all_weights_only": _with_shift(weights_err(list(q_layers)), s_ref),
        "all_activations_only": _with_shift(acts_err(act_names), s_ref),
        "x0_channel_drift": [{"t": t, "drift_255": row} for t, row in zip(timesteps, drift.tolist())],
        "final_channel_mean": {"student_255": _channel_means_255(final_student),
                               "fp_255": _channel_means_255(final_fp),
                               "drift_255": [a_ - b_ for a_, b_ in zip(_channel_means_255(final_student),
                                                                       _channel_means_255(final_fp))]},
        "image_measures_on": "pixels" if decode is None else "VAE-decoded images",
    }


_READS = "analyze decodes its samples through its VAE and reads the embeddings its conditioning uses"
"""What analyze reads from a latent artifact's pipeline folder (the message when there is none)."""


def analyze_artifact(artifact: str | Path, out: str | Path, *, n: int = 8, seed: int = 0, batch_size: int = 16,
                     device: str = "cpu", overwrite: bool = False, progress: bool = True,
                     sensitivity_steps: int | None = 10, pipeline: str | Path | None = None) -> AnalysisResult:
    """Analyse `artifact` and publish `out` (analysis.json, analysis.png) atomically.

    `pipeline`: a latent artifact's pipeline folder (default: the one it records).

    Raises:
        ArtifactError: the artifact is missing or unreadable; a latent artifact whose pipeline folder is
            missing or is not the one it was compressed from.
        ConfigError: a bad count, batch size or device; `pipeline` for a pixel-space artifact.
        OutputPathError: `out` may not be written (see :func:`engines._atomic.check_output_dir`).
    """
    from pqcad_deploy.engines._atomic import staged_directory
    from pqcad_deploy.artifact import artifact_digest, load_artifact
    from pqcad_deploy.choices import DEVICES, check_choice
    from pqcad_deploy.artifact_pipeline import artifact_sampling, is_cross_attention

    for name, value in (("n", n), ("batch_size", batch_size), ("sensitivity_steps", sensitivity_steps)):
        if (value is not None or name != "sensitivity_steps") and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be a positive integer; got {value!r}.")
    check_choice("device", device, DEVICES)
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was given but no CUDA GPU is visible to PyTorch; use --device cpu.")
    started = time.perf_counter()
    art = load_artifact(artifact)
    if pipeline is not None and not is_cross_attention(art.manifest):
        raise ConfigError(f"--pipeline applies to latent artifacts only; {artifact} holds a pixel-space "
                          f"{art.manifest.unet_class}: drop it.")
    conditioning, decode = artifact_sampling(art, artifact, pipeline=pipeline, device=device, reads=_READS)
    with staged_directory(out, overwrite=overwrite, error=OutputPathError, kind=ANALYSIS_KIND) as tmp:
        data = measure(art.build_teacher(like_student=True), art.build_student(), art.manifest, n=n, seed=seed,
                       batch_size=batch_size, device=device, progress=progress, sensitivity_steps=sensitivity_steps,
                       conditioning=conditioning, decode=decode)
        data.update(artifact=str(Path(artifact)), artifact_digest=artifact_digest(Path(artifact)),
                    method=art.manifest.method, device=device, batch_size=batch_size,
                    seconds=round(time.perf_counter() - started, 3))
        (tmp / JSON_FILE).write_text(json.dumps(data, sort_keys=True, indent=1) + "\n")
        plot_analysis(data, tmp / PNG_FILE)
    return AnalysisResult(Path(out), data, time.perf_counter() - started)


def plot_analysis(data: dict, path: Path, top: int = 20) -> Path:
    """analysis.png: error by timestep, the top-`top` layers by weight and by activation sensitivity,
    and the per-channel x0 mean drift against the timestep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(16, 11))
    ax = axes[0, 0]
    ts = [e["t"] for e in data["error_by_timestep"]]
    ax.plot(ts, [e["rel_mse"] for e in data["error_by_timestep"]], marker=".")
    ax.set(yscale="log", xlabel="timestep t (sampling runs right to left)", ylabel="rel. MSE of eps vs FP",
           title=f"1. student error by timestep (overall SQNR {_db(data['overall'])})")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    for ax, key, label, total in ((axes[0, 1], "weight_rel_mse", "weight", "all_weights_only"),
                                  (axes[1, 0], "act_rel_mse", "activation", "all_activations_only")):
        names = data["ranking"][label][:top][::-1]
        ax.barh(range(len(names)), [data["layers"][nm][key] for nm in names],
                color="tab:blue" if label == "weight" else "tab:orange")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set(xlabel="rel. MSE of eps vs FP (only this layer quantized)",
               title=f"2. top {len(names)} layers by {label} sensitivity (all at once: rel. MSE "
                     f"{data[total]['rel_mse']:.3g})")
    ax = axes[1, 1]
    drift = [e["drift_255"] for e in data["x0_channel_drift"]]
    for c in range(len(drift[0]) if drift else 0):
        ax.plot(ts, [row[c] for row in drift], label=f"channel {c} (final images "
                f"{data['final_channel_mean']['drift_255'][c]:+.2f})")
    ax.axhline(0.0, color="k", lw=0.5)
    ax.set(xlabel="timestep t", ylabel="mean x0 drift, student - FP (0-255)", title="3. per-channel x0 mean drift")
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def _db(entry: dict) -> str:
    return "inf dB" if entry["sqnr_db"] is None else f"{entry['sqnr_db']:.1f} dB"


def _shift(values: list[float] | None) -> str:
    return "-" if values is None else ",".join(f"{v:+.2e}" for v in values)


def summary_lines(data: dict, top: int = 5) -> list[str]:
    """A short human summary: totals, the top layers each way, the worst timestep, the final drift."""
    lines = [f"student vs FP over {data['num_points']} points ({data['n']} images x {len(data['timesteps'])} "
             f"steps): rel. MSE {data['overall']['rel_mse']:.4g} (SQNR {_db(data['overall'])})",
             f"sensitivity on {data['sensitivity_points']} points ({len(data['sensitivity_timesteps'])} timesteps); "
             f"all weights only: rel. MSE {data['all_weights_only']['rel_mse']:.4g} "
             f"({_db(data['all_weights_only'])}); all activations only: rel. MSE "
             f"{data['all_activations_only']['rel_mse']:.4g} ({_db(data['all_activations_only'])})"]
    for label, key, bits in (("weight", "weight_rel_mse", "weight_bits"), ("activation", "act_rel_mse", "act_bits")):
        lines.append(f"top {top} layers by {label} sensitivity:")
        lines += [f"  {data['layers'][nm][key]:.3e}  {nm} ({data['layers'][nm]['kind']}, {bits.split('_')[0]} bits "
                  f"{data['layers'][nm][bits]})" for nm in data["ranking"][label][:top]]
    shifts = data["ranking"].get("mean_shift", [])[:top]
    if shifts:
        lines.append(f"top {top} layers by mean shift of eps (the drift the sampler integrates), weight / input:")
        lines += [f"  {_shift(data['layers'][nm]['weight_eps_mean_shift'])} / "
                  f"{_shift(data['layers'][nm]['act_eps_mean_shift'])}  {nm}" for nm in shifts]
    worst = max(data["error_by_timestep"], key=lambda e: e["rel_mse"])
    lines.append(f"worst timestep: t={worst['t']} rel. MSE {worst['rel_mse']:.4g} (SQNR {_db(worst)})")
    fm = data["final_channel_mean"]
    lines.append("final images, per-channel mean (0-255) student - FP: " + ", ".join(
        f"c{c} {d:+.2f} ({s:.1f} vs {f:.1f})" for c, (d, s, f) in enumerate(zip(fm["drift_255"], fm["student_255"],
                                                                            fm["fp_255"]))))
    return lines
