"""Draw docs/RESULTS.md's two plots from the measurement files, so the figures cannot drift from the numbers.

Why a script: every FID in the plot is read from the JSON that the measuring run wrote (the file and
row are listed in FID_POINTS below, the same files RESULTS.md cites), and the speed bars from
``benchmarks/speed.py``'s output; rerunning it after a new measurement redraws both.

    python -m scripts.plot_results --speed docs/measurements/issue6_speed_cpu.json --out docs/images

Writes ``fid_vs_bits.png`` (FID at 10k samples against the W/A bit widths, one line per method, log
scale) and ``cpu_speed.png`` (UNet latency at batch 8 and sampler images/s per row, with the ratios).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
M = ROOT / "docs" / "measurements"

BITS = ("W4A4", "W4A8", "W8A8")
# (series label, bits, measurement file, row) -> FID at 10k samples, same seeds within a series
FID_POINTS: tuple[tuple[str, str, str, str], ...] = (
    ("min-max PTQ, DDIM-100", "W4A4", "issue3_gpu_fid.json", "minmax_w4a4_ddim100"),
    ("min-max PTQ, DDIM-100", "W4A8", "issue3_gpu_fid.json", "minmax_w4a8_ddim100"),
    ("min-max PTQ, DDIM-100", "W8A8", "issue3_gpu_fid.json", "minmax_w8a8_ddim100"),
    ("BRECQ-style, DDIM-100", "W4A4", "issue4_gpu_fid_brecq.json", "brecq_w4a4_ddim100"),
    ("BRECQ-style, DDIM-100", "W4A8", "issue4_gpu_fid_brecq.json", "brecq_w4a8_ddim100"),
    ("BRECQ-style, DDIM-100", "W8A8", "issue4_gpu_fid_brecq.json", "brecq_w8a8_ddim100"),
    ("PQ (ours), DDIM-100", "W4A4", "issue4_5_gpu_fid_pqcad_w4a4_scale_check.json", "pqcad_w4a4_ddim100"),
    ("PQ (ours), DDIM-100", "W4A8", "issue4_gpu_fid_pqcad_w4a8_scale_check.json", "pqcad_w4a8_ddim100"),
    ("PQ (ours), DDIM-100", "W8A8", "issue4_5_gpu_fid_pqcad_w8a8_scale_check.json", "pqcad_w8a8_ddim100"),
    ("PQ (ours), 50 steps", "W4A8", "issue4_gpu_fid_pqcad_w4a8_scale_check.json", "pqcad_w4a8_ddim100_at_half_steps"),
    ("PQ (ours), 50 steps", "W8A8", "issue4_5_gpu_fid_pqcad_w8a8_scale_check.json", "pqcad_w8a8_ddim100_at_half_steps"),
    ("PQ + CAD (ours), 50 steps", "W4A4", "issue4_5_gpu_fid_pqcad_w4a4_scale_check.json", "pqcad_w4a4_ddim100_cad"),
    ("PQ + CAD (ours), 50 steps", "W4A8", "issue5_gpu_fid_pqcad_w4a8_cad.json", "pqcad_w4a8_ddim100_cad"),
    ("PQ + CAD (ours), 50 steps", "W8A8", "issue4_5_gpu_fid_pqcad_w8a8_scale_check.json", "pqcad_w8a8_ddim100_cad"),
    # through ONNX Runtime (numpy sampler, its own noise): the alternatives and ours in the same form
    ("ORT quantize_static (entropy), ONNX Runtime, 50 steps", "W8A8", "issue6_onnx_fid/results.json", "ort_entropy_cm_50"),
    ("ORT quantize_static (entropy), ONNX Runtime, 100 steps", "W8A8", "issue6_onnx_fid/results_2.json", "ort_entropy_cm_100"),
    ("NVIDIA ModelOpt INT8 (entropy), ONNX Runtime, 50 steps", "W8A8", "issue6_onnx_fid/results_2.json", "modelopt_entropy_50"),
    ("PQ (ours) ort-qlinear, ONNX Runtime, 50 steps", "W8A8", "issue6_onnx_fid/results.json", "ours_pq_w8a8_qlinear_50"),
    ("PQ + CAD (ours) ort-qlinear, ONNX Runtime, 50 steps", "W8A8", "issue6_onnx_fid/results.json", "ours_w8a8_qlinear"),
)
FP_LINES = (("FP32, DDIM-100", "fp_ddim100"), ("FP32, DDIM-50", "fp_ddim50"))


def fid(file: str, row: str) -> float:
    return float(json.loads((M / file).read_text())["rows"][row]["fid"])


def plot_fid(out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, float]] = {}
    for label, bits, file, row in FID_POINTS:
        series.setdefault(label, {})[bits] = fid(file, row)
    fig, ax = plt.subplots(figsize=(8, 5))
    markers = "osD^vPX*"
    singles = [label for label, points in series.items() if len(points) == 1]
    for i, (label, points) in enumerate(series.items()):
        # single points (the ONNX Runtime rows, all W8A8) side by side to the right of the column
        shift = 0.06 * (1 + singles.index(label)) if label in singles else 0.0
        xs = [BITS.index(b) + shift for b in BITS if b in points]
        ax.plot(xs, [points[b] for b in BITS if b in points], marker=markers[i % len(markers)],
                linestyle="-" if len(xs) > 1 else "none", markersize=8, label=label)
    for (label, row), style in zip(FP_LINES, ("--", ":")):
        ax.axhline(fid("issue3_gpu_fid.json", row), color="gray", linestyle=style, label=label)
    ax.set_xticks(range(len(BITS)), BITS)
    ax.set_xlim(-0.2, len(BITS) - 1 + 0.06 * (len(singles) + 2))
    ax.set_yscale("log")
    ax.set_ylabel("FID, 10,000 samples (lower is better)")
    ax.set_xlabel("weight / activation bits")
    ax.set_title("Embedded Fashion-MNIST DDPM: FID against bit width")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = out / "fid_vs_bits.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_speed(speed_json: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(speed_json.read_text())
    unet = [r for r in data["unet"] if r["batch"] == 8 and "error" not in r]
    sampler = [r for r in data["sampler"] if "error" not in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.8))
    labels = [r["label"] for r in unet]
    ms = [1e3 * r["median_s"] for r in unet]
    a.barh(labels, ms, color=["gray" if "FP32" in lab else "tab:blue" for lab in labels])
    for y, (v, r) in enumerate(zip(ms, unet)):
        a.text(v, y, f" {v:.1f} ms ({r['speedup_vs_ort_fp32']:.2f}x)", va="center", fontsize=8)
    a.invert_yaxis()
    a.set_xlabel("UNet call, batch 8, median ms (lower is better)")
    a.set_xlim(0, max(ms) * 1.45)
    names = [f"{r['label']}, {r['steps'] or 'student'} steps" for r in sampler]
    ips = [r["images_per_s"] for r in sampler]
    b.barh(names, ips, color=["gray" if "FP32" in n else "tab:green" for n in names])
    for y, (v, r) in enumerate(zip(ips, sampler)):
        b.text(v, y, f" {v:.2f}/s ({r.get('images_per_s_vs_diffusers') or 0:.2f}x diff., {r.get('images_per_s_vs_ort_fp32_100') or 0:.2f}x ORT-100)",
               va="center", fontsize=8)
    b.invert_yaxis()
    b.set_xlabel(f"sampler images/s, {data['sampler_batch']} images (higher is better)")
    b.set_xlim(0, max(ips) * 2.6)
    m = data["machine"]
    fig.suptitle(f"CPU speed: {m['cpu_model']}, {m['threads']} thread(s), onnxruntime {m['versions']['onnxruntime']}, "
                 f"{m['date'][:10]}", fontsize=10)
    fig.tight_layout()
    path = out / "cpu_speed.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--speed", type=Path, help="benchmarks/speed.py output JSON (speed bars); omit for the FID plot only")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"wrote {plot_fid(args.out)}")
    if args.speed:
        print(f"wrote {plot_speed(args.speed, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
