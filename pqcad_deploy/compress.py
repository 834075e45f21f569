"""`compress`: FP diffusers UNet -> compressed artifact.

Steps: load the model, draw the data-free calibration set from its own DDIM trajectories, quantize
with the chosen method, measure the damage, write the artifact atomically.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pqcad_deploy.artifact import ArtifactManifest, LayerRecord, save_artifact, student_state_from_model
from pqcad_deploy.calibration.trajectories import CalibrationSet, collect_trajectory_calibration
from pqcad_deploy.config import CompressConfig, config_to_dict
from pqcad_deploy.errors import ConfigError
from pqcad_deploy.fsutil import check_output_dir
from pqcad_deploy.methods.minmax import minmax_quantize
from pqcad_deploy.models import load_model
from pqcad_deploy.provenance import provenance
from pqcad_deploy.quant.layers import QuantConv2d
from pqcad_deploy.quant.replace import LayerBits, quant_layers, quantizable_layers
from pqcad_deploy.schedule import ddim_timesteps

__all__ = ["CompressResult", "compress", "uniform_plan", "quantization_report"]


@dataclass(frozen=True)
class CompressResult:
    """What compress produced and how long it took."""

    artifact: Path
    seconds: float
    noise_pred_sqnr_db: float
    num_quantized_layers: int


def uniform_plan(unet: torch.nn.Module, weight_bits: int, act_bits: int) -> dict[str, LayerBits]:
    """Every Conv2d and Linear at the same bits (the fixed-bit baselines)."""
    return {name: LayerBits(weight_bits, act_bits) for name in quantizable_layers(unet)}


def _resolve_device(device: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was given but no CUDA GPU is visible to PyTorch; use --device cpu.")
    return device


@torch.no_grad()
def quantization_report(fp_unet: torch.nn.Module, student: torch.nn.Module,
                        calibration: CalibrationSet, batch_size: int, device: str) -> dict:
    """Per-layer weight error and the student's noise-prediction error against the FP model."""
    layers = {}
    for name, layer in quant_layers(student).items():
        w = layer.weight.detach()
        err = (layer.quantized_weight().detach() - w).pow(2).sum() / w.pow(2).sum().clamp_min(1e-30)
        layers[name] = {
            "kind": "conv2d" if isinstance(layer, QuantConv2d) else "linear",
            "weight_bits": layer.weight_bits, "act_bits": layer.act_bits,
            "weight_rel_mse": float(err),
            "act_scale": float(layer.input_quantizer.scale),
            "act_amax": float(layer.input_quantizer.observed_amax),
        }
    signal = noise = 0.0
    count = 0
    for x, t in calibration.batches(batch_size):
        x, t = x.to(device), t.to(device)
        ref = fp_unet(x, t).sample
        out = student(x, t).sample
        signal += float(ref.double().pow(2).sum())
        noise += float((out - ref).double().pow(2).sum())
        count += ref.numel()
    sqnr = 10.0 * torch.log10(torch.tensor(signal / max(noise, 1e-30))).item()
    return {"layers": layers, "noise_pred_sqnr_db": sqnr, "noise_pred_mse": noise / max(count, 1)}


def _run_method(config: CompressConfig, fp_unet, plan, calibration, batch_size: int, device: str,
                progress: bool) -> tuple[torch.nn.Module, dict]:
    """Quantize with the configured method; returns the student and the method's own report."""
    if config.method == "minmax":
        return minmax_quantize(fp_unet, plan, calibration, batch_size, device, progress), {}
    from pqcad_deploy.reconstruct import PRESET_RECONSTRUCTION

    rcfg = dataclasses.replace(PRESET_RECONSTRUCTION[config.preset], seed=config.seed)
    if config.method == "brecq":
        from pqcad_deploy.methods.brecq import brecq_quantize

        return brecq_quantize(fp_unet, plan, calibration, rcfg, device, progress, capture_batch_size=batch_size)
    from pqcad_deploy.methods.pqcad import PRESET_PQ_RULE, PQConfig, first_last_at_8_bits, pq_quantize

    return pq_quantize(fp_unet, first_last_at_8_bits(plan), calibration,
                       PQConfig(reconstruction=rcfg, rule=PRESET_PQ_RULE[config.preset]), device, progress,
                       capture_batch_size=batch_size)


def compress(config: CompressConfig, out: Path, overwrite: bool = False, progress: bool = True) -> CompressResult:
    """Compress `config.model` into an artifact at `out`."""
    out = Path(out)
    check_output_dir(out, overwrite)  # fail before the slow part
    device = _resolve_device(config.device)
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    loaded = load_model(config.model)
    fp_unet = loaded.unet.to(device).eval()
    ucfg = dict(fp_unet.config)
    sample_size = ucfg["sample_size"]
    h, w = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
    image_shape = (int(ucfg["in_channels"]), int(h), int(w))
    cal_cfg = config.calibration_config
    if config.method == "pqcad" and config.calibration is None:
        # C_QC: normally distributed timestep calibration (method.md section 1)
        cal_cfg = dataclasses.replace(cal_cfg, timestep_sampling="normal")
    calibration = collect_trajectory_calibration(
        fp_unet, loaded.scheduler_config, image_shape, config.teacher_steps, cal_cfg,
        seed=config.seed, device=device, progress=progress)
    plan = uniform_plan(fp_unet, config.weight_bits, config.act_bits)
    student, method_report = _run_method(config, fp_unet, plan, calibration, cal_cfg.batch_size, device, progress)
    report = quantization_report(fp_unet, student, calibration, cal_cfg.batch_size, device)
    report.update(method_report)
    report["method"] = config.method
    timesteps = ddim_timesteps(loaded.scheduler_config, config.teacher_steps)
    layers = {name: LayerRecord(kind=r["kind"], weight_bits=r["weight_bits"], act_bits=r["act_bits"],
                                weight_shape=list(quant_layers(student)[name].weight.shape))
              for name, r in report["layers"].items()}
    unet_config = {k: v for k, v in ucfg.items() if not k.startswith("_")}
    manifest = ArtifactManifest(
        method=config.method,
        options=config_to_dict(config),
        unet_class=type(fp_unet).__name__,
        unet_config=_jsonable(unet_config),
        scheduler_config=loaded.scheduler_config,
        prediction_type=loaded.scheduler_config.get("prediction_type", "epsilon"),
        image_shape=list(image_shape),
        teacher_steps=config.teacher_steps,
        student_steps=config.teacher_steps,
        student_timesteps=timesteps,
        distilled=False,
        layers=layers,
        calibration=calibration.description,
        provenance=provenance(config.seed, loaded.source, loaded.unet_dir),
    )
    save_artifact(out, manifest, student_state_from_model(student),
                  {k: v for k, v in fp_unet.state_dict().items()}, report, overwrite=overwrite)
    return CompressResult(artifact=out, seconds=time.perf_counter() - started,
                          noise_pred_sqnr_db=report["noise_pred_sqnr_db"], num_quantized_layers=len(layers))


def _jsonable(value):
    import json

    return json.loads(json.dumps(value, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))
