"""Float-equivalent rewrites of the UNet that give static INT8 scales an easier job.

Each rewrite replaces one float layer by a small module whose float output is the same (up to float
rounding) but whose quantizable children see better-behaved inputs. The children are ordinary
Conv2d / Linear layers, so the quantizers, calibration, reconstruction, the artifact format and the
exported Q/DQ graph handle them as they handle any layer: one symmetric per-tensor INT8 scale per
activation, per-output-channel weight scales, nothing dynamic (TensorRT explicit quantization).

* **Concat split** (Q-Diffusion's split shortcut quantization). An up-block resnet reads
  ``cat([h, skip])``: the decoder's features and the encoder's skip features, whose ranges differ
  several-fold, so one per-tensor scale wastes most of its grid on one half. :class:`SplitInputConv2d`
  computes ``conv(cat([h, skip]))`` as ``conv_head(h) + conv_skip(skip)`` (the weight split along its
  input channels; the bias on the head). In ONNX that is two Slices, two Q/DQ'd Convs and an Add,
  which TensorRT runs in INT8 and fuses (Conv + Add). ``shortcut`` splits the resnet's 1x1
  ``conv_shortcut`` (raw concat); ``shortcut+conv1`` also its ``conv1``, whose input is the
  group-normalised concat.
* **SmoothQuant** for Linears. ``linear(x) == linear_s(x * m)`` with ``m = 1/s`` per input channel
  and the weight's columns multiplied by ``s``; ``s_j = max|x_j|^alpha / max|w_j|^(1-alpha)`` moves
  the activation's outlier channels into the weight, which is quantized per output channel.
  :class:`SmoothedLinear` holds ``m`` as a buffer; ONNX gets a Mul before the Q/DQ (ModelOpt's
  ``pre_quant_scale``), which TensorRT runs as a float element-wise op.

The artifact records the rewritten layer names (``...conv_shortcut.head`` / ``.skip``,
``...time_emb_proj.linear``) and the multipliers, so :func:`restore_rewrites` rebuilds the structure
from the layer list alone. The teacher stays the untouched FP model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from pqcad_deploy.calibration.trajectories import CalibrationSet
from pqcad_deploy.conditioning import conditions_on

__all__ = ["SPLIT_CONCAT_CHOICES", "SplitInputConv2d", "SmoothedLinear", "concat_input_layers",
           "split_concat_inputs", "smooth_linears", "fit_smoothing", "restore_rewrites", "RewriteResult"]

SPLIT_CONCAT_CHOICES: dict[str, tuple[str, ...]] = {
    "none": (),
    "shortcut": ("conv_shortcut",),
    "shortcut+conv1": ("conv_shortcut", "conv1"),
}
"""--split-concat value -> the resnet children that are split (choices.SPLIT_CONCAT holds the names)."""

_HEAD, _SKIP, _INNER = "head", "skip", "linear"


class SplitInputConv2d(nn.Module):
    """``conv(x)`` over a channel concat, computed as ``head(x[:, :split]) + skip(x[:, split:])``."""

    def __init__(self, conv: nn.Conv2d, split: int) -> None:
        super().__init__()
        if conv.groups != 1 or not 0 < split < conv.in_channels:
            raise ValueError(f"cannot split a conv with {conv.in_channels} input channels and groups={conv.groups} "
                             f"at channel {split}")
        self.split = split
        common = dict(kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding,
                      dilation=conv.dilation, device=conv.weight.device, dtype=conv.weight.dtype)
        self.head = nn.Conv2d(split, conv.out_channels, bias=conv.bias is not None, **common)
        self.skip = nn.Conv2d(conv.in_channels - split, conv.out_channels, bias=False, **common)
        with torch.no_grad():
            self.head.weight.copy_(conv.weight[:, :split])
            self.skip.weight.copy_(conv.weight[:, split:])
            if conv.bias is not None:
                self.head.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x[:, :self.split]) + self.skip(x[:, self.split:])

    def extra_repr(self) -> str:
        return f"split={self.split}"


class SmoothedLinear(nn.Module):
    """``linear(x * input_multiplier)``: SmoothQuant's migration, with the weight already scaled."""

    def __init__(self, linear: nn.Linear, multiplier: torch.Tensor | None = None) -> None:
        super().__init__()
        m = torch.ones(linear.in_features) if multiplier is None else multiplier.detach().float()
        if m.shape != (linear.in_features,) or not bool((m > 0).all()):
            raise ValueError(f"a SmoothQuant multiplier must be {linear.in_features} positive values")
        self.register_buffer("input_multiplier", m.to(linear.weight.device, linear.weight.dtype).clone())
        self.linear = linear
        # w * s, s = 1 / m: the product is unchanged. A new tensor, so the caller's weight (e.g. a state
        # dict taken before the rewrite) is left as it was.
        linear.weight = nn.Parameter(linear.weight.detach() / self.input_multiplier,
                                     requires_grad=linear.weight.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.input_multiplier)


@dataclass(frozen=True)
class RewriteResult:
    """Old layer name -> the names of the quantizable layers that replaced it."""

    renamed: dict[str, tuple[str, ...]]

    def translate_plan(self, plan: Mapping) -> dict:
        """A per-layer plan of the original names as a plan of the rewritten ones (same values)."""
        out = {}
        for name, value in plan.items():
            for new in self.renamed.get(name, (name,)):
                out[new] = value
        return out


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def concat_input_layers(unet: nn.Module, children: tuple[str, ...]) -> dict[str, int]:
    """Name -> split channel of every up-block resnet child in `children` that reads ``cat([h, skip])``.

    diffusers' up blocks concatenate the running hidden state with a skip tensor before each
    resnet: ``h`` has the previous block's output channels for the first resnet (the mid block's for
    up_blocks.0) and the block's own output channels after that.
    """
    up_blocks = getattr(unet, "up_blocks", None)
    if up_blocks is None or not children:
        return {}
    found: dict[str, int] = {}
    prev_channels = int(unet.config["block_out_channels"][-1])
    for b, block in enumerate(up_blocks):
        for r, resnet in enumerate(getattr(block, "resnets", [])):
            h_channels = prev_channels if r == 0 else int(resnet.out_channels)
            for child in children:
                conv = getattr(resnet, child, None)
                if isinstance(conv, nn.Conv2d) and conv.in_channels > h_channels:
                    found[f"up_blocks.{b}.resnets.{r}.{child}"] = h_channels
        if getattr(block, "resnets", None):
            prev_channels = int(block.resnets[-1].out_channels)
    return found


def split_concat_inputs(unet: nn.Module, choice: str, only: set[str] | None = None) -> RewriteResult:
    """Split the concat-reading convs of `choice` (restricted to the names in `only`), in place."""
    renamed = {}
    for name, split in concat_input_layers(unet, SPLIT_CONCAT_CHOICES[choice]).items():
        if only is not None and name not in only:
            continue
        _set(unet, name, SplitInputConv2d(unet.get_submodule(name), split))
        renamed[name] = (f"{name}.{_HEAD}", f"{name}.{_SKIP}")
    return RewriteResult(renamed)


def smooth_linears(unet: nn.Module, names: list[str]) -> RewriteResult:
    """Wrap the named Linears in SmoothedLinear with multipliers of 1 (:func:`fit_smoothing` sets them)."""
    renamed = {}
    for name in names:
        module = unet.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{name} is a {type(module).__name__}, not a Linear")
        _set(unet, name, SmoothedLinear(module))
        renamed[name] = (f"{name}.{_INNER}",)
    return RewriteResult(renamed)


@torch.no_grad()
def fit_smoothing(unet: nn.Module, calibration: CalibrationSet, alpha: float, batch_size: int,
                  device: str) -> dict[str, dict]:
    """Set every SmoothedLinear's multiplier from the calibration set's per-channel input maxima.

    Returns the report section: per layer, the activation's max/median channel range before and after
    (the outlier ratio the migration is for).
    """
    smoothed = {n: m for n, m in unet.named_modules() if isinstance(m, SmoothedLinear)}
    amax = {n: None for n in smoothed}
    hooks = []
    for name, module in smoothed.items():
        def hook(_module, args, name=name):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
            amax[name] = x if amax[name] is None else torch.maximum(amax[name], x)
        hooks.append(module.register_forward_pre_hook(hook))
    try:
        for x, t, cond in calibration.batches(batch_size):
            unet(x.to(device), t.to(device), **conditions_on(cond, device))
    finally:
        for h in hooks:
            h.remove()
    report = {}
    for name, module in smoothed.items():
        if amax[name] is None:
            raise RuntimeError(f"{name} did not run on the calibration set, so SmoothQuant has no ranges for it")
        a = amax[name].clamp_min(1e-5)
        weight = module.linear.weight * module.input_multiplier  # back to the FP weight
        w = weight.abs().amax(dim=0).float().clamp_min(1e-5)
        s = (a.pow(alpha) / w.pow(1.0 - alpha)).clamp_min(1e-5)
        module.linear.weight.copy_(weight * s.to(weight.dtype))
        module.input_multiplier.copy_((1.0 / s).to(module.input_multiplier.dtype))
        after = a / s
        report[name] = {"act_channel_max_over_median_before": float(a.max() / a.median()),
                        "act_channel_max_over_median_after": float(after.max() / after.median())}
    return report


def restore_rewrites(unet: nn.Module, layers: Mapping, multipliers: Mapping[str, torch.Tensor] | None = None) -> None:
    """Rebuild the rewritten structure from an artifact's layer list (names and weight shapes), in place.

    ``X.head`` / ``X.skip`` make X a SplitInputConv2d split at the head's input channels; ``X.linear``
    makes X a SmoothedLinear, with its multiplier from `multipliers` (``X.input_multiplier``) when
    given (a teacher rebuilt to match the student), else ones (the student's state is loaded next).
    """
    for name, record in layers.items():
        parent, _, leaf = name.rpartition(".")
        if not parent:
            continue
        try:
            module = unet.get_submodule(parent)
        except AttributeError:
            continue
        if leaf == _HEAD and isinstance(module, nn.Conv2d):
            _set(unet, parent, SplitInputConv2d(module, int(record.weight_shape[1])))
        elif leaf == _INNER and isinstance(module, nn.Linear):
            m = None if multipliers is None else multipliers[f"{parent}.input_multiplier"]
            _set(unet, parent, SmoothedLinear(module, m))
