"""The compression report's picture: per-block reconstruction loss curves and the bit transitions.

Blocks are laid end to end along the x axis in execution order (cumulative iterations), the loss on
a log scale; each ladder level is drawn in its own colour (8, 6, 4 bits) so every transition shows
as a colour change, and block boundaries are marked. Written as report.png in the artifact.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["has_curves", "plot_reconstruction_report"]

_COLOURS = {8: "tab:blue", 6: "tab:orange", 4: "tab:red"}


def _segments(report: dict) -> list[dict]:
    if "pq" in report:
        return report["pq"]["weights"]
    if "reconstruction" in report:
        return report["reconstruction"]["weights"]
    return []


def _distillation_losses(report: dict) -> list[float]:
    return list((report.get("distillation") or {}).get("losses") or [])


def _distillation_heldout(report: dict) -> list[list[float]]:
    return list((report.get("distillation") or {}).get("heldout") or [])


def has_curves(report: dict) -> bool:
    return any(seg.get("losses") for seg in _segments(report)) or bool(_distillation_losses(report))


def plot_reconstruction_report(report: dict, path: Path) -> Path:
    """Draw the report's curves into `path` (PNG): one 12 x 4 in panel each for the weight-stage
    reconstruction (brecq, pqcad) and the CAD distillation loss, stacked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reconstruction = any(seg.get("losses") for seg in _segments(report))
    distillation = _distillation_losses(report)
    panels = int(reconstruction) + int(bool(distillation))
    fig, axes = plt.subplots(panels, 1, figsize=(12, 4 * panels), dpi=100, squeeze=False)
    if reconstruction:
        _plot_reconstruction(axes[0][0], report)
    if distillation:
        _plot_distillation(axes[-1][0], distillation, _distillation_heldout(report))
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return Path(path)


def _plot_distillation(ax, losses: list[float], heldout: list[list[float]]) -> None:
    ax.plot(range(len(losses)), [max(v, 1e-12) for v in losses], color="tab:green", linewidth=0.8,
            label="per-batch loss")
    if heldout:
        ax.plot([h[0] for h in heldout], [max(h[1], 1e-12) for h in heldout], color="tab:red", marker="o",
                linewidth=1.2, label="held-out pairs")
    window = max(1, len(losses) // 50)
    if window > 1:
        smooth = [sum(losses[i:i + window]) / window for i in range(len(losses) - window + 1)]
        ax.plot(range(window - 1, len(losses)), [max(v, 1e-12) for v in smooth], color="black", linewidth=1.0,
                label=f"mean of {window}")
    ax.set_yscale("log")
    ax.set_xlabel("distillation iterations")
    ax.set_ylabel("truncated-SNR weighted x0 loss")
    ax.set_title("CAD distillation: one student step against two FP teacher steps")
    ax.legend(loc="upper right")


def _plot_reconstruction(ax, report: dict) -> None:
    x0 = 0
    previous_block = None
    seen_bits: set[int] = set()
    for seg in _segments(report):
        losses = seg.get("losses") or []
        if not losses:
            continue
        if seg["name"] != previous_block and previous_block is not None:
            ax.axvline(x0, color="0.85", linewidth=0.6, zorder=0)
        previous_block = seg["name"]
        bits = seg.get("bits")
        label = f"{bits}-bit weights" if bits not in seen_bits else None
        seen_bits.add(bits)
        ax.plot(range(x0, x0 + len(losses)), [max(v, 1e-12) for v in losses],
                color=_COLOURS.get(bits, "tab:gray"), linewidth=0.8, label=label)
        x0 += len(losses)
    ax.set_yscale("log")
    ax.set_xlabel("reconstruction iterations, blocks in execution order (grey lines: block boundaries)")
    ax.set_ylabel("block loss (relative MSE)")
    ax.set_title(f"{report.get('method', '')} weight reconstruction" +
                 (": colour changes are bit transitions" if "pq" in report else ""))
    ax.legend(loc="upper right")
