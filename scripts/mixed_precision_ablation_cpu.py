"""Which layer score and which greedy rule should --avg-weight-bits use? (issue 4, CPU, minutes)

On the embedded model, min-max students (no learning, so the plan is the only variable):
1. per layer: the mean and max weight-channel kurtosis, the weight count, the layer's own 4-bit
   min-max weight error, and the held-out SQNR gain of raising that one layer to 8 bits with every
   other layer at 4 (first/last conv at 8);
2. Spearman correlations between the scores and (1)'s error and gain;
3. the held-out SQNR of the plans that several rules give at a few budgets: score per weight (mean
   or max kurtosis, what compress uses is mean), the score alone, 1 / weights (size only), random
   (5 seeds), and the measured single-layer gain as an oracle ranking.
Everything with activation quantization off ("weights") and on at 8 bits ("w4a8"). Held-out set:
8 FP trajectories (seed 123), 8 uniform timesteps of a 20-step DDIM grid; calibration: the same
from seed 0. Writes one JSON file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _spearman(a, b) -> float:
    import numpy as np

    rank = lambda v: np.argsort(np.argsort(np.asarray(v, dtype=np.float64)))  # noqa: E731
    return float(np.corrcoef(rank(a), rank(b))[0, 1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--budgets", default="4.25,4.5,5.0")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import numpy as np
    import torch

    from pqcad_deploy.calibration.trajectories import collect_trajectory_calibration
    from pqcad_deploy.schedule import make_ddim_scheduler
    from pqcad_deploy.compress import uniform_plan
    from pqcad_deploy.config import CalibrationConfig
    from pqcad_deploy.eval.sqnr import sqnr_db
    from pqcad_deploy.methods.minmax import minmax_quantize
    from pqcad_deploy.models import load_model
    from pqcad_deploy.quant import primitives as P
    from pqcad_deploy.quant.mixed_precision import FIRST_LAST_LAYERS, allocate_weight_bits, channel_kurtosis
    from pqcad_deploy.quant.replace import LayerBits, quant_layers, quantizable_layers

    torch.set_num_threads(1)
    started = time.perf_counter()
    fp = load_model("builtin")
    unet = fp.unet.eval()
    cal_cfg = CalibrationConfig(num_trajectories=8, timesteps_kept=8, batch_size=8)
    scheduler = make_ddim_scheduler(fp.scheduler_config, 20)
    calibration = collect_trajectory_calibration(unet, scheduler, (1, 32, 32), cal_cfg, seed=0,
                                                 progress=False)
    held_out = collect_trajectory_calibration(unet, scheduler, (1, 32, 32), cal_cfg, seed=123,
                                              progress=False)
    with torch.no_grad():
        ref = unet(held_out.x, held_out.t).sample.double()

    def sqnr(plan, acts: bool) -> float:
        student = minmax_quantize(unet, plan, calibration, 64, progress=False)
        for layer in quant_layers(student).values():
            layer.input_quantizer.enabled = acts
        with torch.no_grad():
            out = student(held_out.x, held_out.t).sample.double()
        return sqnr_db(ref.numpy(), out.numpy())

    layers = quantizable_layers(unet)
    base = uniform_plan(unet, 4, 8)
    for name in FIRST_LAST_LAYERS:
        base[name] = LayerBits(8, 8)
    result: dict = {"torch": torch.__version__, "layers": {}, "modes": {}}
    for name, layer in layers.items():
        w = layer.weight.detach()
        k = channel_kurtosis(w)
        err = P.fake_quantize_weight(w, P.minmax_weight_scale(w, 4), 4) - w
        result["layers"][name] = {"mean_kurtosis": float(k.mean()), "max_kurtosis": float(k.max()),
                                  "params": int(w.numel()),
                                  "weight_rel_mse_4bit": float(err.pow(2).sum() / w.pow(2).sum())}
    params = {n: r["params"] for n, r in result["layers"].items()}
    for mode, acts in (("weights", False), ("w4a8", True)):
        m: dict = {"uniform_w4": sqnr(base, acts), "uniform_w8": sqnr(uniform_plan(unet, 8, 8), acts),
                   "gain": {}, "spearman": {}, "plans": {}}
        for name in layers:
            if name not in FIRST_LAST_LAYERS:
                m["gain"][name] = sqnr({**base, name: LayerBits(8, 8)}, acts) - m["uniform_w4"]
        body = list(m["gain"])
        gain = [m["gain"][n] for n in body]
        for key in ("mean_kurtosis", "max_kurtosis"):
            score = [result["layers"][n][key] for n in body]
            m["spearman"][key] = {
                "vs_own_4bit_weight_error": _spearman(
                    score, [result["layers"][n]["weight_rel_mse_4bit"] for n in body]),
                "vs_gain": _spearman(score, gain),
                "per_weight_vs_gain": _spearman(np.array(score) / np.array([params[n] for n in body]), gain)}
        m["spearman"]["params_vs_gain"] = _spearman([params[n] for n in body], gain)
        rules = {
            "mean_kurtosis_per_weight (compress)": {n: r["mean_kurtosis"] for n, r in result["layers"].items()},
            "max_kurtosis_per_weight": {n: r["max_kurtosis"] for n, r in result["layers"].items()},
            "size_only (1 per weight)": dict.fromkeys(layers, 1.0),
            "oracle_gain_per_weight": {n: m["gain"].get(n, 0.0) for n in layers},
        }
        for budget in (float(b) for b in args.budgets.split(",")):
            row = {}
            for rule, scores in rules.items():
                bits = allocate_weight_bits(scores, params, 4, budget, FIRST_LAST_LAYERS)
                row[rule] = sqnr({n: LayerBits(bits[n], 8) for n in layers}, acts)
            # the score alone: scaled by the weight count, so that score per weight = score
            for key in ("mean_kurtosis", "max_kurtosis"):
                scores = {n: r[key] * r["params"] for n, r in result["layers"].items()}
                bits = allocate_weight_bits(scores, params, 4, budget, FIRST_LAST_LAYERS)
                row[f"{key}_alone"] = sqnr({n: LayerBits(bits[n], 8) for n in layers}, acts)
            rand = []
            for seed in range(5):
                r = np.random.default_rng(seed).random(len(layers))
                order = dict(zip(layers, r.tolist()))
                bits = allocate_weight_bits({n: order[n] * params[n] for n in layers}, params, 4, budget,
                                            FIRST_LAST_LAYERS)
                rand.append(sqnr({n: LayerBits(bits[n], 8) for n in layers}, acts))
            row["random (5 seeds, mean)"] = float(np.mean(rand))
            row["random (5 seeds, std)"] = float(np.std(rand))
            m["plans"][str(budget)] = row
            print(mode, budget, json.dumps({k: round(v, 2) for k, v in row.items()}), flush=True)
        result["modes"][mode] = m
    result["seconds"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True))
    print(json.dumps({mode: {"uniform_w4": m["uniform_w4"], "uniform_w8": m["uniform_w8"], "spearman": m["spearman"]}
                      for mode, m in result["modes"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
