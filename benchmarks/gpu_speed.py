"""GPU speed of a builtin model in PyTorch: FP32 and FP16, eager and CUDA graphs, at several step counts.

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

- Issue 14's comparison: diffusers' DDIMPipeline in FP16 at the teacher's steps (``--pipeline-steps``,
  100 and 20) against the DDIM loop at the distilled students' steps (``--steps``, e.g. 50, 10, 5),
  at each ``--sampler-batches`` size (64 and 512), for ``--model builtin`` or ``builtin:cifar10``.

Every figure: one warm-up round, then --reps timed repetitions (median, min, max), CUDA
synchronised around each. Writes results.json to --out and prints one line per figure.
``--device cpu`` runs the same code paths eagerly (a smoke test; not a speed claim).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def timed(fn, reps: int) -> dict:
    """benchmarks.speed.time_calls with the GPU synchronised after every call (one warm-up call)."""
    import torch

    from benchmarks.speed import time_calls

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    return time_calls(lambda: (fn(), sync()), reps)


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
    ap.add_argument("--model", default="builtin", help="builtin (Fashion-MNIST) or builtin:cifar10")
    ap.add_argument("--sampler-batches", default="64", help="comma-separated batch sizes of the sampler rows")
    ap.add_argument("--steps", default="100,50", help="comma-separated step counts of the DDIM-loop rows")
    ap.add_argument("--pipeline-steps", default="100", help="comma-separated step counts of the DDIMPipeline rows")
    ap.add_argument("--unet-batches", default="1,8,64")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = ap.parse_args()
    ints = lambda text: [int(v) for v in text.split(",") if v]  # noqa: E731

    import torch
    from diffusers import DDIMPipeline, DDIMScheduler

    from pqcad_deploy.models import load_model

    torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = args.device
    fp = load_model(args.model)
    c, s = int(fp.unet.config.in_channels), int(fp.unet.config.sample_size)
    results = {"gpu": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
               "reps": args.reps, "model": args.model, "date": time.strftime("%Y-%m-%d"), "unet": [], "sampler": []}

    def save() -> None:
        (out / "results.json").write_text(json.dumps(results, indent=1))

    models = {"fp32": fp.unet.to(device).eval()}
    if device == "cuda":  # FP16 convolutions are a GPU figure
        models["fp16"] = load_model(args.model).unet.to(device).half().eval()
    if args.artifact:
        from pqcad_deploy.artifact import load_artifact

        models["fakequant_student_fp32"] = load_artifact(args.artifact).build_student().to(device).eval()
    for name, unet in models.items():
        dtype = next(unet.parameters()).dtype
        for batch in ints(args.unet_batches):
            x = torch.randn(batch, c, s, s, device=device, dtype=dtype)
            t = torch.full((batch,), 500, device=device, dtype=torch.int64)
            with torch.no_grad():
                eager = timed(lambda: unet(x, t).sample, args.reps)
            row = {"model": name, "batch": batch, "mode": "eager", **eager,
                   "images_per_s": batch / eager["median_s"]}
            results["unet"].append(row)
            print(json.dumps(row), flush=True)
            if device == "cuda":
                try:
                    replay, _ = graphed(unet, x, t)
                    g = timed(replay, args.reps)
                    row = {"model": name, "batch": batch, "mode": "cuda_graph", **g,
                           "images_per_s": batch / g["median_s"]}
                except Exception as exc:  # a model that cannot be captured is reported, not fatal
                    row = {"model": name, "batch": batch, "mode": "cuda_graph",
                           "error": f"{type(exc).__name__}: {exc}"}
                results["unet"].append(row)
                print(json.dumps(row), flush=True)
            save()

    for n in ints(args.sampler_batches):
        for name in models:  # diffusers' own pipeline: the baseline users run (FP16 is issue 14's)
            pipe = DDIMPipeline(unet=models[name], scheduler=DDIMScheduler.from_config(fp.scheduler_config))
            pipe.set_progress_bar_config(disable=True)
            for steps in ints(args.pipeline_steps):
                gen = lambda steps=steps, pipe=pipe: pipe(  # noqa: E731
                    batch_size=n, generator=torch.Generator("cpu").manual_seed(0), num_inference_steps=steps, eta=0.0,
                    output_type="np")
                r = timed(gen, max(3, args.reps // 2))
                row = {"sampler": f"diffusers DDIMPipeline {name}", "steps": steps, "batch": n, **r,
                       "images_per_s": n / r["median_s"]}
                results["sampler"].append(row)
                print(json.dumps(row), flush=True)
        for name in models:
            _sampler_rows(models[name], name, fp.scheduler_config, ints(args.steps), n, (c, s), device, args.reps,
                          results)
            save()
    save()
    return 0


def _sampler_rows(unet, name: str, scheduler_config: dict, step_counts: list[int], n: int, shape: tuple[int, int],
                  device: str, reps: int, results: dict) -> None:
    """The hand DDIM loop (a CUDA graph of the UNet call where it captures) at each step count."""
    import torch
    from diffusers import DDIMScheduler

    c, s = shape
    dtype = next(unet.parameters()).dtype
    for steps in step_counts:
        sched = DDIMScheduler.from_config(scheduler_config)
        sched.set_timesteps(steps)
        x = torch.randn(n, c, s, s, device=device, dtype=dtype)
        t_static = torch.zeros(n, device=device, dtype=torch.int64)
        replay, eps, mode = None, None, "eager"
        if device == "cuda":
            try:
                replay, eps = graphed(unet, x, t_static)
                mode = "cuda_graph"
            except Exception:
                replay, eps, mode = None, None, "eager"

        def loop(replay=replay, eps=eps, x=x, t_static=t_static, sched=sched, unet=unet):
            sample = torch.randn(x.shape, device=x.device, dtype=x.dtype)
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

        r = timed(loop, max(3, reps // 2))
        row = {"sampler": f"DDIM loop {name} ({mode})", "steps": steps, "batch": n, **r,
               "images_per_s": n / r["median_s"]}
        results["sampler"].append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
