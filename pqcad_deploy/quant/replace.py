"""Swap float layers for quantized ones through a type registry.

Only layers whose type is a key of :data:`QUANT_LAYER_REGISTRY` (or a subclass of one) are swapped;
the chosen bits come from a per-layer plan so that mixed precision stays per layer and deployable.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pqcad_deploy.quant.layers import QuantConv2d, QuantLayer, QuantLinear

__all__ = ["QUANT_LAYER_REGISTRY", "LayerBits", "is_quant_layer", "quantizable_layers", "swap_in_quant_layers",
           "quant_layers"]

QUANT_LAYER_REGISTRY: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: QuantConv2d,
    nn.Linear: QuantLinear,
}


def is_quant_layer(module: nn.Module) -> bool:
    """Whether `module` is one of the registry's quantized types (already swapped)."""
    return isinstance(module, tuple(QUANT_LAYER_REGISTRY.values()))


@dataclass(frozen=True)
class LayerBits:
    """Bits of one quantized layer; act_bits None keeps its input in floating point."""

    weight_bits: int
    act_bits: int | None


def _registry_target(module: nn.Module) -> type[nn.Module] | None:
    if is_quant_layer(module):
        return None
    for float_type, quant_type in QUANT_LAYER_REGISTRY.items():
        if isinstance(module, float_type):
            return quant_type
    return None


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module of every layer the registry can quantize, in module order."""
    return {name: m for name, m in model.named_modules() if _registry_target(m) is not None}


def swap_in_quant_layers(model: nn.Module, plan: dict[str, LayerBits]) -> dict[str, nn.Module]:
    """Replace each layer named in `plan` by its quantized type, in place; return the new layers."""
    swapped: dict[str, nn.Module] = {}
    for name, bits in plan.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        target = _registry_target(module)
        if target is None:
            raise ValueError(f"layer {name!r} ({type(module).__name__}) cannot be quantized")
        new = target.from_float(module, bits.weight_bits, bits.act_bits)
        setattr(parent, child, new)
        swapped[name] = new
    return swapped


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """Name -> quantized layer of a model that has been swapped."""
    return {n: m for n, m in model.named_modules() if is_quant_layer(m)}
