"""Where does the activation-quantization damage come from? FID of students with parts switched off.

A diagnostic for issue 4 (docs/RESULTS.md section 5): each row compresses the embedded model (one
artifact per method/bits, made once) and samples its fake-quant student with some activation
quantizers switched off, then computes FID on --n images against the shipped reference statistics.
Row syntax: ``method:weight_bits:act_bits[:option,...]`` with options

- ``fpact=layer+layer``: these layers' inputs stay unquantized (e.g. ``fpact=conv_in``);
- ``noact``: no activation quantization at all (weights-only);
- ``tmin=N``: activations quantized only at timesteps t >= N (FP activations for the last steps);

and ``fp`` for the FP model. FID at a few thousand samples is biased upward; compare rows within a run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", required=True, help="';'-separated rows, see the module docstring")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--budget-s", type=float, default=500.0)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()

    import torch

    from pqcad_deploy.artifact import load_artifact
    from pqcad_deploy.compress import compress
    from pqcad_deploy.config import CompressConfig
    from pqcad_deploy.eval.fid import FidStatistics, compute_statistics
    from pqcad_deploy.eval.fid_sources import default_reference_path
    from pqcad_deploy.eval.pipeline_sampling import generate_images
    from pqcad_deploy.eval.inception import InceptionFeatures
    from pqcad_deploy.models import load_model
    from pqcad_deploy.quant.replace import quant_layers

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = args.device
    results = {"gpu": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "n": args.n, "steps": args.steps, "preset": args.preset,
               "rows": {}, "compress_seconds": {}, "skipped": [], "errors": []}
    save = lambda: (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))  # noqa: E731
    ref = FidStatistics.load(default_reference_path())
    extractor = InceptionFeatures(dev, weights=args.weights, batch_size=500)
    fp = load_model("builtin")
    artifacts: dict[str, Path] = {}
    for row in args.rows.split(";"):
        if time.perf_counter() - t0 > args.budget_s:
            results["skipped"].append(row)
            continue
        try:
            parts = row.split(":")
            hook = None
            if parts[0] == "fp":
                unet = fp.unet.to(dev).eval()
            else:
                method, wb, ab = parts[:3]
                options = parts[3].split(",") if len(parts) > 3 else []
                key = f"{method}_w{wb}a{ab}"
                if key not in artifacts:
                    t = time.perf_counter()
                    compress(CompressConfig(method=method, weight_bits=int(wb), act_bits=int(ab),
                                            teacher_steps=args.steps, preset=args.preset, device=dev, seed=0,
                                            distill=False),
                             Path(f"/tmp/{key}"), overwrite=True, progress=False)
                    results["compress_seconds"][key] = time.perf_counter() - t
                    artifacts[key] = Path(f"/tmp/{key}")
                unet = load_artifact(artifacts[key]).build_student().to(dev).eval()
                layers = quant_layers(unet)
                for option in options:
                    if option == "noact":
                        for layer in layers.values():
                            layer.input_quantizer.enabled = False
                    elif option.startswith("fpact="):
                        for name in option.split("=", 1)[1].split("+"):
                            layers[name].input_quantizer.enabled = False
                    elif option.startswith("tmin="):
                        tmin = int(option.split("=", 1)[1])

                        def pre_hook(_module, hook_args, hook_kwargs, tmin=tmin, layers=layers):
                            t = hook_args[1] if len(hook_args) > 1 else hook_kwargs["timestep"]
                            on = bool(torch.as_tensor(t).reshape(-1)[0] >= tmin)
                            for layer in layers.values():
                                layer.input_quantizer.enabled = on

                        hook = unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
                    else:
                        raise ValueError(f"unknown option {option!r}")
            gen = generate_images(unet, fp.scheduler_config, args.n, args.steps, seed=0, batch_size=1000,
                                  device=dev, progress=False)
            if hook is not None:
                hook.remove()
            stats = compute_statistics(gen.images, device=dev, batch_size=500, progress=False, source=row,
                                       extractor=extractor)
            results["rows"][row] = {"fid": stats.frechet_distance(ref), "generate_seconds": gen.seconds}
            print(row, json.dumps(results["rows"][row]), flush=True)
        except Exception as exc:  # one failing row must not cost the others
            results["errors"].append(f"{row}: {type(exc).__name__}: {exc}")
            print("failed", results["errors"][-1], flush=True)
        save()
    results["total_seconds"] = time.perf_counter() - t0
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
