"""GPU speed of the embedded model in PyTorch: FP32 and FP16, eager and CUDA graphs, 100 and 50 steps.

Issue 6's GPU figures. What is compared, and what is not claimed:
- UNet evaluation latency (ms per call) and throughput (images per second) at batch 1, 8 and 64,
  FP32 and FP16 (``unet.half()``), eager PyTorch and replayed CUDA graphs.
- Whole-sampler images per second: diffusers' DDIMPipeline at 100 steps (the FP baseline users
  run) and a hand loop of the same DDIM update (CUDA graph of the UNet call) at 100 and 50 steps.
  The half-step student has the FP model's architecture, so at FP16 it runs at the 50-step row's
  speed; its integer kernels need TensorRT, which cannot be installed here.
- The fake-quant student (``artifact.build_student()``) is timed too, labelled as such: it runs
  float kernels plus quantize/dequantize arithmetic, so it is slower than FP and is *not* a speed
  claim; it shows what the PyTorch stage costs to evaluate.

Every figure: one warm-up round, then --reps timed repetitions (median, min, max), CUDA
synchronised around each. Writes results.json to --out and prints one line per figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn, reps: int) -> dict:
    """benchmarks.speed.time_calls with the GPU synchronised after every call (one warm-up call)."""
    import torch

    from benchmarks.speed import time_calls

    torch.cuda.synchronize()
    return time_calls(lambda: (fn(), torch.cuda.synchronize()), reps)


def graphed(unet, x, t):
    """A CUDA graph of one UNet call on static (x, t); returns (replay, static_out)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            unet(x, t).sample
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = unet(x, t).sample
    return graph.replay, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--artifact", default=None, help="an artifact whose fake-quant student is timed too")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--sampler-batch", type=int, default=64)
    args = ap.parse_args()

    import torch
    from diffusers import DDIMPipeline, DDIMScheduler

    from pqcad_deploy.models import load_model

    torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fp = load_model("builtin")
    c, s = int(fp.unet.config.in_channels), int(fp.unet.config.sample_size)
    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "reps": args.reps,
               "date": time.strftime("%Y-%m-%d"), "unet": [], "sampler": []}

    def save() -> None:
        (out / "results.json").write_text(json.dumps(results, indent=1))

    models = {"fp32": fp.unet.to("cuda").eval(),
              "fp16": load_model("builtin").unet.to("cuda").half().eval()}
    if args.artifact:
        from pqcad_deploy.artifact import load_artifact

        models["fakequant_student_fp32"] = load_artifact(args.artifact).build_student().to("cuda").eval()
    for name, unet in models.items():
        dtype = next(unet.parameters()).dtype
        for batch in (1, 8, 64):
            x = torch.randn(batch, c, s, s, device="cuda", dtype=dtype)
            t = torch.full((batch,), 500, device="cuda", dtype=torch.int64)
            with torch.no_grad():
                eager = timed(lambda: unet(x, t).sample, args.reps)
            row = {"model": name, "batch": batch, "mode": "eager", **eager,
                   "images_per_s": batch / eager["median_s"]}
            results["unet"].append(row)
            print(json.dumps(row), flush=True)
            try:
                replay, _ = graphed(unet, x, t)
                g = timed(replay, args.reps)
                row = {"model": name, "batch": batch, "mode": "cuda_graph", **g, "images_per_s": batch / g["median_s"]}
            except Exception as exc:  # a model that cannot be captured is reported, not fatal
                row = {"model": name, "batch": batch, "mode": "cuda_graph", "error": f"{type(exc).__name__}: {exc}"}
            results["unet"].append(row)
            print(json.dumps(row), flush=True)
            save()

    n = args.sampler_batch
    scheduler = DDIMScheduler.from_config(fp.scheduler_config)
    pipe = DDIMPipeline(unet=models["fp32"], scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    gen = lambda: pipe(batch_size=n, generator=torch.Generator("cpu").manual_seed(0),  # noqa: E731
                       num_inference_steps=100, eta=0.0, output_type="np")
    r = timed(gen, max(3, args.reps // 2))
    row = {"sampler": "diffusers DDIMPipeline fp32", "steps": 100, "batch": n, **r, "images_per_s": n / r["median_s"]}
    results["sampler"].append(row)
    print(json.dumps(row), flush=True)
    for name in models:
        unet = models[name]
        dtype = next(unet.parameters()).dtype
        for steps in (100, 50):
            sched = DDIMScheduler.from_config(fp.scheduler_config)
            sched.set_timesteps(steps)
            x = torch.randn(n, c, s, s, device="cuda", dtype=dtype)
            t_static = torch.zeros(n, device="cuda", dtype=torch.int64)
            try:
                replay, eps = graphed(unet, x, t_static)
                mode = "cuda_graph"
            except Exception:
                replay, eps, mode = None, None, "eager"

            def loop(replay=replay, eps=eps, x=x, t_static=t_static, sched=sched, unet=unet):
                sample = torch.randn(x.shape, device="cuda", dtype=x.dtype)
                for t in sched.timesteps:
                    if replay is not None:
                        x.copy_(sample)
                        t_static.fill_(int(t))
                        replay()
                        e = eps
                    else:
                        with torch.no_grad():
                            e = unet(sample, t_static.fill_(int(t))).sample
                    sample = sched.step(e, t, sample, eta=0.0).prev_sample
                return sample

            r = timed(loop, max(3, args.reps // 2))
            row = {"sampler": f"DDIM loop {name} ({mode})", "steps": steps, "batch": n, **r,
                   "images_per_s": n / r["median_s"]}
            results["sampler"].append(row)
            print(json.dumps(row), flush=True)
            save()
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
