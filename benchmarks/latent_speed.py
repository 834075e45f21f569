"""Issue 17's CPU speed row for a class-embedding latent model: engines against diffusers' FP32 pipeline.

The issue asks for ``sample`` on the CPU for the latent model, in images/s, against diffusers' FP32
pipeline at the teacher's steps, measured in one run. The baseline is what a diffusers user runs:
``StableDiffusionPipeline`` (the cross-attention UNet, the VAE decode, classifier-free guidance) given the
class table's rows as ``prompt_embeds`` and the null row as ``negative_prompt_embeds`` (the table is
the model's text encoder); scripts/train_latent_reference.py checked that this is the model's own sampler.
Against it, in the same process and at the same thread count:

- the FP32 engine (``export --fp``) at the teacher's steps: what the torch-free runtime alone buys;
- the student engine (``export``'s default target) at its own (half) steps: what pqcad-deploy delivers.

Each row samples the same ``--n`` images (class i % 10) in batches of ``--batch``, guided at ``--scale``,
decode included; one warm-up run of each row, then ``--reps`` rounds in which every row runs once in turn, so a
drift of the machine's speed (a shared 2-core VM's is several per cent within minutes) falls on every row alike:
per row the median / min / max, and per round the speedups, whose median and spread are reported.

    python -m benchmarks.latent_speed --pipeline PIPE --fp-engine FP_ENGINE --engine ENGINE --steps 20 \\
        --scale 2 --n 32 --batch 16 --threads 2 --out latent_speed.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path


def _interleaved(runs: list, reps: int) -> list[list[float]]:
    """Seconds of each run in each of `reps` rounds (round-robin), after one warm-up of each (allocations, ONNX
    Runtime's first-call work)."""
    for run in runs:
        run()
    seconds: list[list[float]] = [[] for _ in runs]
    for _ in range(reps):
        for k, run in enumerate(runs):
            started = time.perf_counter()
            run()
            seconds[k].append(time.perf_counter() - started)
    return seconds


def diffusers_row(pipeline: Path, n: int, batch: int, steps: int, scale: float, threads: int) -> tuple[dict, object]:
    """(row, run): StableDiffusionPipeline in FP32 on the CPU with the class table as its prompt embeddings."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from pqcad_deploy.latent_parts import load_class_table

    torch.set_num_threads(threads)
    unet = UNet2DConditionModel.from_pretrained(str(pipeline / "unet"), torch_dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(str(pipeline / "vae"), torch_dtype=torch.float32).eval()
    scheduler = DDIMScheduler.from_pretrained(str(pipeline / "scheduler"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    table = load_class_table(pipeline)
    rows = table.embeddings[:table.num_classes]
    null = table.embeddings[table.null_class]

    def run() -> None:
        with torch.no_grad():
            for start in range(0, n, batch):
                count = min(batch, n - start)
                embeds = rows[torch.arange(start, start + count) % table.num_classes]
                pipe(prompt_embeds=embeds, negative_prompt_embeds=null.expand_as(embeds).contiguous(),
                     num_inference_steps=steps, guidance_scale=scale, eta=0.0, output_type="np",
                     generator=torch.Generator().manual_seed(start))

    return {"row": f"diffusers StableDiffusionPipeline FP32, {steps} steps", "steps": steps}, run


def engine_row(engine: Path, n: int, batch: int, steps: int | None, scale: float, threads: int, label: str,
               stack: contextlib.ExitStack) -> tuple[dict, object]:
    """(row, run): an engine through the runtime's own sampler (engines.sampler.sample_images), decode included;
    its runner stays open in `stack`."""
    from pqcad_deploy.engines.conditioning import sample_conditions
    from pqcad_deploy.engines.generate import open_runner
    from pqcad_deploy.engines.latent_parts import EngineParts
    from pqcad_deploy.engines.sampler import sample_images, sampling_timesteps

    runner, manifest = open_runner(engine, threads=threads)
    stack.enter_context(runner)
    parts = EngineParts(engine, manifest, threads)
    conditions = sample_conditions(manifest.onnx.conditioning, parts=parts, guidance_scale=scale)
    used = len(sampling_timesteps(manifest.onnx, steps))

    def run() -> None:
        sample_images(runner, manifest, n, 0, steps=steps, batch_size=batch, progress=False,
                      conditions=conditions, decode=parts.decoder())

    return {"row": f"{label}, {used} steps", "steps": used, "precision": manifest.onnx.precision}, run


def main() -> int:
    global REPS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", type=Path, required=True, help="the class-embedding pipeline folder")
    ap.add_argument("--fp-engine", type=Path, required=True, help="engine of `export --fp` (FP32)")
    ap.add_argument("--engine", type=Path, required=True, help="the student's engine")
    ap.add_argument("--steps", type=int, default=20, help="the teacher's steps (diffusers and the FP32 engine)")
    ap.add_argument("--scale", type=float, default=2.0)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with contextlib.ExitStack() as stack:
        made = [diffusers_row(args.pipeline, args.n, args.batch, args.steps, args.scale, args.threads),
                engine_row(args.fp_engine, args.n, args.batch, args.steps, args.scale, args.threads, "FP32 engine",
                           stack),
                engine_row(args.engine, args.n, args.batch, None, args.scale, args.threads, "student engine", stack)]
        seconds = _interleaved([run for _, run in made], args.reps)
    rows = [row for row, _ in made]
    for row, times in zip(rows, seconds):
        speedups = [base / mine for base, mine in zip(seconds[0], times)]  # per round: the same moment's machine
        row.update(seconds=times, median_s=statistics.median(times), min_s=min(times), max_s=max(times),
                   reps=args.reps, images_per_s=args.n / statistics.median(times),
                   speedup_vs_diffusers=statistics.median(speedups), speedup_min=min(speedups),
                   speedup_max=max(speedups))
        print(f"{row['row']:55s} {row['images_per_s']:8.2f} images/s  x{row['speedup_vs_diffusers']:.2f} "
              f"(rounds x{row['speedup_min']:.2f}-{row['speedup_max']:.2f}; median {row['median_s']:.2f} s, "
              f"min {row['min_s']:.2f}, max {row['max_s']:.2f})", flush=True)
    result = {"rows": rows, "n": args.n, "batch": args.batch, "guidance_scale": args.scale, "threads": args.threads,
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "python": platform.python_version(), "load_average": os.getloadavg()},
              "date": time.strftime("%Y-%m-%d")}
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
