"""Which layers quantize at all: named precision policies plus the user's own name patterns.

A layer a policy keeps in float is not swapped for a quantized one: its weight stays in the artifact
as a float parameter, and the exported graph has no Q/DQ around it (TensorRT runs it in FP16). The
first and last convolution are governed separately by ``--first-last`` (layer_precision.py).

Policies live in :data:`PRECISION_POLICIES` (one registry; ``choices.PRECISION_POLICY_NAMES`` holds the
same names torch-free for the CLI, and a test keeps the two equal):

- ``all`` (default): every Conv2d and Linear quantizes (the plain baseline of earlier releases).
- ``tensorrt-safe``: keeps float what NVIDIA ModelOpt's diffusers INT8 recipe leaves
  unquantized in a UNet (its ``filter_func``: ``time_emb_proj|time_embedding|conv_in|conv_out|
  conv_shortcut|add_embedding``), the layers whose FLOP share is small (reported per artifact in
  ``report.json`` -> ``precision_policy``, measured for the builtin models in docs/RESULTS.md). The
  time embedding path feeds every resnet, so one shared error shifts the whole network at a given
  t (QuEST: the most sensitive part of the UNet); a shortcut conv's input is the skip-concat whose two
  halves have very different ranges (Q-Diffusion), and it is a 1x1 conv.

Why ``all`` stays the default: measured at 10,000-sample FID (docs/RESULTS.md section 15), PQ with
``tensorrt-safe`` scored 20.08 against 17.44 on the Fashion-MNIST model at W8A8 (19.44 against 20.46
at W4A8) and 24.00 against 24.15 on the CIFAR-10 model at W8A8: not better on both models.

``--keep-float PATTERN`` (repeatable) adds shell-style patterns (``fnmatch``, matched against the
whole module name, e.g. ``'up_blocks.*.attentions.*'``); a pattern that matches no layer is refused,
since a typo would otherwise silently quantize the layer the user meant to protect.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from pqcad_deploy.conditioning import dry_run_conditions
from pqcad_deploy.errors import ConfigError
from pqcad_deploy.quant.replace import LayerBits, quantizable_layers

__all__ = ["PrecisionPolicy", "PRECISION_POLICIES", "DEFAULT_PRECISION_POLICY", "float_layers",
           "apply_precision_policy", "layer_macs", "precision_policy_report"]


@dataclass(frozen=True)
class PrecisionPolicy:
    """A named set of layer-name patterns kept in floating point, and why."""

    name: str
    keep_float: tuple[str, ...]
    why: str


PRECISION_POLICIES: dict[str, PrecisionPolicy] = {p.name: p for p in (
    PrecisionPolicy("all", (), "every Conv2d and Linear quantizes"),
    PrecisionPolicy("tensorrt-safe", ("time_embedding.*", "*time_emb_proj", "*conv_shortcut", "*add_embedding*"),
                    "NVIDIA ModelOpt's diffusers INT8 exclusions: the time-embedding path and the shortcut convs "
                    "(conv_in / conv_out follow --first-last)"),
)}
DEFAULT_PRECISION_POLICY = "all"


def _matching(names: Iterable[str], pattern: str) -> list[str]:
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def float_layers(layer_names: Iterable[str], policy: str, keep_float: Iterable[str] = ()) -> list[str]:
    """The names of `layer_names` kept in float by `policy` plus the user's `keep_float` patterns.

    Raises:
        ConfigError: an unknown policy, or a user pattern that matches no layer.
    """
    names = list(layer_names)
    if policy not in PRECISION_POLICIES:
        raise ConfigError(f"--precision-policy must be one of {', '.join(PRECISION_POLICIES)}; got {policy!r}.")
    kept: set[str] = set()
    for pattern in PRECISION_POLICIES[policy].keep_float:
        kept.update(_matching(names, pattern))
    for pattern in keep_float:
        hits = _matching(names, pattern)
        if not hits:
            example = ", ".join(names[:3])
            raise ConfigError(f"--keep-float {pattern!r} matches no quantizable layer; layer names look like "
                              f"{example} (shell patterns over the whole name, e.g. '*attentions*').")
        kept.update(hits)
    return [n for n in names if n in kept]


def apply_precision_policy(plan: Mapping[str, LayerBits], policy: str,
                           keep_float: Iterable[str] = ()) -> dict[str, LayerBits]:
    """`plan` without the layers kept in float (they stay unswapped, float weights and inputs)."""
    dropped = set(float_layers(plan, policy, keep_float))
    return {name: bits for name, bits in plan.items() if name not in dropped}


@torch.no_grad()
def layer_macs(unet: nn.Module, image_shape: tuple[int, int, int]) -> dict[str, int]:
    """Multiply-accumulates per image of every quantizable layer, from one batch-1 forward.

    Conv2d: output elements x (in_channels / groups) x kernel area; Linear: output elements x
    in_features. Measured with hooks on a real forward so that attention token counts and
    up-sampled sizes are what the model actually computes.
    """
    layers = quantizable_layers(unet)
    macs: dict[str, int] = {}
    hooks = []

    def hook(name: str, module: nn.Module, _inputs, output) -> None:
        out = output[0] if isinstance(output, tuple) else output
        if isinstance(module, nn.Conv2d):
            per_out = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            per_out = module.in_features
        macs[name] = macs.get(name, 0) + int(out.numel()) * int(per_out)

    for name, module in layers.items():
        hooks.append(module.register_forward_hook(lambda m, i, o, name=name: hook(name, m, i, o)))
    try:
        param = next(unet.parameters())
        x = torch.zeros((1, *image_shape), dtype=param.dtype, device=param.device)
        unet(x, torch.tensor([500], device=param.device), **dry_run_conditions(unet.config, 1, param.device))
    finally:
        for h in hooks:
            h.remove()
    return {name: macs.get(name, 0) for name in layers}


def precision_policy_report(unet: nn.Module, image_shape: tuple[int, int, int], plan: Mapping[str, LayerBits],
                            policy: str, keep_float: Iterable[str] = ()) -> dict:
    """The ``precision_policy`` report section: what stays float and its share of the UNet's MACs.

    Shares are of the MACs of all Conv2d and Linear layers (the attention score matmuls and the
    norms are not counted; they are not quantized by any policy).
    """
    macs = layer_macs(unet, image_shape)
    total = max(sum(macs.values()), 1)
    kept = float_layers(plan, policy, keep_float)
    kept_set = set(kept)
    return {
        "policy": policy,
        "policy_patterns": list(PRECISION_POLICIES[policy].keep_float),
        "keep_float_patterns": list(keep_float),
        "why": PRECISION_POLICIES[policy].why,
        "total_macs_per_image": sum(macs.values()),
        "float_layers": {name: {"macs_per_image": macs[name], "mac_share": macs[name] / total} for name in kept},
        "float_mac_share": sum(macs[name] for name in kept) / total,
        "quantized_mac_share": sum(macs[n] for n in plan if n not in kept_set) / total,
    }
