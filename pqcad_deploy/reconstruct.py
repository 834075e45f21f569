"""Block-wise reconstruction (BRECQ) of a fake-quant UNet against its FP original.

The UNet is cut into reconstruction blocks (each ResnetBlock2D, each Attention, each Downsample2D /
Upsample2D, the time embedding, and every quantized layer outside those, i.e. conv_in and conv_out),
ordered by execution. Block by block, in that order:

1. the FP UNet runs on the calibration set up to the block and its FP outputs are kept (the target);
2. the partially quantized student runs up to the block and the block's inputs are kept, so the block
   learns to undo the error of the blocks before it (BRECQ's choice; ``input_source="fp"`` feeds FP
   inputs instead, which is cheaper: one pass gives both);
3. Adam minimises ||block_q(x_q) - block_fp(x_fp)||^2 / mean(block_fp^2) (+ lambda * the AdaRound
   rounding regulariser in the weight stage, + optionally the per-layer output errors inside the block
   as EDA-DM does) over the AdaRound logits and the weight scales (weight stage) or over the
   activation scales with the weights frozen (activation stage);
4. the rounding is hardened: latent weight = codes * scale, so ``codes()`` gives the learned codes.

Memory: only one block's inputs and targets are held (on the CPU); the price is two partial forward
passes per block (O(blocks^2 / 2) block evaluations in all), which is small next to the optimisation.

The per-block API (:func:`reconstruct_block`) takes a `bits` argument and an `on_iteration` callback
(returns True to stop), so a bit ladder can call it repeatedly at decreasing bits, each level starting
from the previous one's result.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from pqcad_deploy.calibration.trajectories import CalibrationSet
from pqcad_deploy.conditioning import conditions_on
from pqcad_deploy.presets import ReconstructionConfig
from pqcad_deploy.quant import adaround as A
from pqcad_deploy.quant import primitives as P
from pqcad_deploy.quant.layers import QuantLayer
from pqcad_deploy.quant.replace import is_quant_layer, quant_layers, quantizable_layers

__all__ = [
    "ReconstructionConfig",
    "Block",
    "BlockData",
    "BlockResult",
    "OnIteration",
    "block_types",
    "reconstruction_blocks",
    "first_pair_blocks",
    "capture_block_data",
    "capture_for_reconstruction",
    "init_weight_scales",
    "reconstruct_block",
    "reconstruct_model",
    "block_loss",
]

Stage = Literal["weights", "activations"]
OnIteration = Callable[[str, int, float], bool]
"""on_iteration(block_name, iteration, reconstruction_loss) -> True to stop this block early."""


# ============================================================================ blocks
def block_types() -> tuple[type[nn.Module], ...]:
    """The diffusers module types that form one reconstruction block each (imported lazily)."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.embeddings import TimestepEmbedding
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    return (ResnetBlock2D, Attention, Downsample2D, Upsample2D, TimestepEmbedding)


@dataclass
class Block:
    """One reconstruction block: its module path and the quantized layers (full names) inside it."""

    name: str
    layers: list[str]


def _layer_names(model: nn.Module) -> list[str]:
    q = list(quant_layers(model))
    return q if q else list(quantizable_layers(model))


@torch.no_grad()
def reconstruction_blocks(model: nn.Module, sample: torch.Tensor, timestep: torch.Tensor,
                          cond: dict[str, torch.Tensor] | None = None) -> list[Block]:
    """The model's reconstruction blocks in execution order, each with the quantized layers it holds.

    A block is an outermost module of one of :func:`block_types`, or a quantized (or, on an FP model,
    quantizable) layer outside all of them. Blocks holding no such layer are left out. The order is
    taken from one forward pass on (`sample`, `timestep`, a conditional model's `cond`) (module
    registration order is not execution order: AttnDownBlock2D registers its attentions before its resnets).

    Raises:
        RuntimeError: if a block runs more than once per forward (its inputs would be ambiguous).
    """
    types = block_types()
    layer_names = _layer_names(model)
    candidates: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, types) and not any(name.startswith(c + ".") for c in candidates):
            candidates.append(name)
    for name in layer_names:
        if not any(name.startswith(c + ".") for c in candidates):
            candidates.append(name)
    members = {c: [n for n in layer_names if n == c or n.startswith(c + ".")] for c in candidates}
    candidates = [c for c in candidates if members[c]]

    calls: dict[str, int] = {}
    order: list[str] = []
    handles = []
    for name in candidates:
        def pre_hook(_module, _args, name=name):
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == 1:
                order.append(name)
        handles.append(model.get_submodule(name).register_forward_pre_hook(pre_hook))
    try:
        model(sample, timestep, **(cond or {}))
    finally:
        for h in handles:
            h.remove()
    repeated = sorted(n for n, c in calls.items() if c > 1)
    if repeated:
        raise RuntimeError(f"blocks run more than once per forward: {repeated}")
    unused = [c for c in candidates if c not in calls]
    return [Block(name, members[name]) for name in order + unused]


# ============================================================================ captured data
@dataclass
class BlockData:
    """A block's captured call inputs over the calibration set (CPU), and its FP outputs.

    Each positional / keyword argument is either batched (a tensor whose dim 0 is the sample index,
    concatenated over the set) or a constant (the same value in every call, e.g. `upsample_size`).
    """

    args: list[tuple[bool, object]]
    kwargs: dict[str, tuple[bool, object]]
    output: torch.Tensor | None
    num_samples: int

    def batch(self, index: torch.Tensor, device: str) -> tuple[list, dict]:
        """The call arguments for the samples `index`, on `device`."""
        def pick(entry):
            batched, value = entry
            return value[index].to(device) if batched else value
        return [pick(a) for a in self.args], {k: pick(v) for k, v in self.kwargs.items()}


def first_pair_blocks(model: nn.Module, calibration: CalibrationSet, device: str) -> list[Block]:
    """:func:`reconstruction_blocks` from the calibration set's first pair (and its conditioning)."""
    x, t, cond = calibration.rows(torch.arange(1))
    return reconstruction_blocks(model, x.to(device), t.to(device), conditions_on(cond, device))


class _StopForward(Exception):
    """Raised by a capture hook: everything after the captured block is not needed."""


def _split(value, n: int) -> tuple[bool, object]:
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == n:
        return True, value.detach().cpu()
    return False, value


@torch.no_grad()
def capture_block_data(model: nn.Module, block_name: str, calibration: CalibrationSet, batch_size: int,
                       device: str, inputs: bool = True, outputs: bool = False) -> BlockData:
    """Run `model` on the calibration set up to (and including, for `outputs`) the block; keep its I/O.

    The forward pass is cut short right after what is needed, so capturing an early block is cheap.
    """
    module = model.get_submodule(block_name)
    arg_chunks: list[list[tuple[bool, object]]] = []
    kwarg_chunks: list[dict[str, tuple[bool, object]]] = []
    out_chunks: list[torch.Tensor] = []
    current_n = [0]

    def pre_hook(_module, args, kwargs):
        if inputs:
            arg_chunks.append([_split(a, current_n[0]) for a in args])
            kwarg_chunks.append({k: _split(v, current_n[0]) for k, v in kwargs.items()})
        if not outputs:
            raise _StopForward

    def hook(_module, _args, output):
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"block {block_name} returned {type(output).__name__}, not a tensor")
        out_chunks.append(output.detach().cpu())
        raise _StopForward

    handles = [module.register_forward_pre_hook(pre_hook, with_kwargs=True)]
    if outputs:
        handles.append(module.register_forward_hook(hook))
    try:
        for x, t, cond in calibration.batches(batch_size):
            current_n[0] = int(x.shape[0])
            try:
                model(x.to(device), t.to(device), **conditions_on(cond, device))
            except _StopForward:
                pass
            else:
                raise RuntimeError(f"block {block_name} did not run in the forward pass")
    finally:
        for h in handles:
            h.remove()

    def merge(chunks: list[tuple[bool, object]]) -> tuple[bool, object]:
        batched, first = chunks[0]
        if batched:
            return True, torch.cat([c[1] for c in chunks])
        return False, first

    args = [merge([c[i] for c in arg_chunks]) for i in range(len(arg_chunks[0]))] if arg_chunks else []
    kwargs = {k: merge([c[k] for c in kwarg_chunks]) for k in kwarg_chunks[0]} if kwarg_chunks else {}
    output = torch.cat(out_chunks) if out_chunks else None
    return BlockData(args=args, kwargs=kwargs, output=output, num_samples=len(calibration))


# ============================================================================ optimisation
@dataclass
class BlockResult:
    """What reconstructing one block did; losses are relative MSEs (error^2 / mean(FP output^2)).

    `loss_before` is the block on all captured samples with its quantizers as found (weight stage:
    round to nearest at the starting scales, unless soft rounding was already on), `loss_after` the
    same after the stage (hardened in the weight stage). `reverted`: the hardened rounding was worse
    than round to nearest at the starting scales, which was kept instead. `losses` is the per-iteration batch loss of
    the (soft) block, the reconstruction term only.
    """

    name: str
    stage: str
    bits: int | None
    layers: list[str]
    iterations: int
    stopped_early: bool
    reverted: bool
    loss_before: float
    loss_after: float
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["losses"] = [float(f"{v:.6g}") for v in self.losses]
        return d


def init_weight_scales(layers: dict[str, QuantLayer], method: str) -> None:
    """Set each layer's weight scale from its latent weight: "mse" search or "minmax"."""
    for layer in layers.values():
        w, bits = layer.weight.detach(), layer.weight_bits
        scale = A.mse_weight_scale(w, bits) if method == "mse" else P.minmax_weight_scale(w, bits)
        layer.weight_quantizer.set_scale(scale.to(layer.weight_quantizer.scale.device))


@torch.no_grad()
def block_loss(block: nn.Module, data: BlockData, device: str, batch_size: int = 64) -> float:
    """Relative MSE of `block` on all captured inputs against the captured FP outputs."""
    assert data.output is not None
    err = ref = 0.0
    for start in range(0, data.num_samples, batch_size):
        index = torch.arange(start, min(start + batch_size, data.num_samples))
        args, kwargs = data.batch(index, device)
        target = data.output[index].to(device)
        err += float((block(*args, **kwargs) - target).double().pow(2).sum())
        ref += float(target.double().pow(2).sum())
    return err / max(ref, 1e-30)


def _block_layers(block: nn.Module, prefix: str) -> dict[str, QuantLayer]:
    return {(f"{prefix}.{n}" if n else prefix): m for n, m in block.named_modules()
            if is_quant_layer(m)}


class _LayerOutputs:
    """Forward hooks that keep the outputs of named submodules during one call."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name):
        def hook(_module, _args, output):
            self.outputs[name] = output
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def reconstruct_block(
    block_q: nn.Module,
    block_fp: nn.Module,
    data: BlockData,
    config: ReconstructionConfig,
    *,
    name: str = "block",
    stage: Stage = "weights",
    bits: int | dict[str, int] | None = None,
    iters: int | None = None,
    harden: bool = True,
    on_iteration: OnIteration | None = None,
    device: str = "cpu",
    progress: bool = True,
    seed: int | None = None,
) -> BlockResult:
    """Reconstruct one quantized block against its FP outputs captured in `data`.

    Weight stage: AdaRound logits (created from the current latent weight and scale unless already
    on) and, if configured, the weight scales are learned; activation quantizers are used as they are
    (the weights-first flow disables them). With `bits` given and different from a layer's, the layer
    is first hardened (if soft), moved to `bits` and its scale re-initialised from the latent weight;
    that is how a ladder continues from the previous level; a dict gives the bits per layer name
    (absent layers keep theirs), for blocks that mix 8- and 4-bit layers. `harden` ends with
    latent = codes * scale; should that be worse on the captured data than round to nearest at the
    starting scales, the block goes back to round to nearest (``result.reverted``; only when no
    layer was still soft at the start, e.g. an 8-bit layer carried soft through a mixed block's ladder).

    Activation stage: only the enabled input quantizers' scales are learned, weights stay frozen.

    Args:
        block_q: the block inside the student (modified in place).
        block_fp: the same block of the FP model (targets for the per-layer loss).
        data: inputs for `block_q` and the FP outputs (`capture_block_data`).
        iters: overrides `config.iters` / `config.act_iters`.
        on_iteration: called after every step with the reconstruction loss; True stops early.
        seed: seeds the batch order (default: config.seed).

    Returns:
        The loss curve (reconstruction term only) and the hardened loss before/after on all samples.
    """
    if data.output is None:
        raise ValueError("block data has no FP outputs; capture them with outputs=True")
    started = time.perf_counter()
    layers = _block_layers(block_q, name)
    if not layers:
        raise ValueError(f"block {name} holds no quantized layer")
    n_iters = iters if iters is not None else (config.iters if stage == "weights" else config.act_iters)

    saved_grad = {p: p.requires_grad for p in block_q.parameters()}
    for p in block_q.parameters():
        p.requires_grad_(False)

    groups: list[dict] = []
    if stage == "weights":
        for layer_name, layer in layers.items():
            wq = layer.weight_quantizer
            want = bits.get(layer_name, wq.bits) if isinstance(bits, dict) else bits
            if want is not None and want != wq.bits:
                if wq.adaround_enabled:
                    wq.harden_(layer.weight)
                wq.set_bits(want)
                init_weight_scales({"": layer}, config.weight_scale_init)
        loss_before = block_loss(block_q, data, device)  # round to nearest at the start scales
        start_state = {n: (layer.weight.detach().clone(), layer.weight_quantizer.scale.detach().clone())
                       for n, layer in layers.items() if not layer.weight_quantizer.adaround_enabled}
        for layer in layers.values():
            wq = layer.weight_quantizer
            if not wq.adaround_enabled:
                wq.enable_adaround(layer.weight)
            groups.append({"params": [wq.round_v], "lr": config.lr})
            if config.learn_weight_scale:
                wq.scale.requires_grad_(True)
                groups.append({"params": [wq.scale], "lr": config.scale_lr * float(wq.scale.detach().mean())})
    elif stage == "activations":
        loss_before = block_loss(block_q, data, device)
        for layer in layers.values():
            aq = layer.input_quantizer
            if aq.quantizes and aq.enabled and not aq.observing:
                aq.scale.requires_grad_(True)
                groups.append({"params": [aq.scale], "lr": config.act_scale_lr * float(aq.scale.detach())})
    else:
        raise ValueError(f"stage must be 'weights' or 'activations'; got {stage!r}")

    fp_layers = {n: block_fp.get_submodule(n[len(name) + 1:]) if n != name else block_fp for n in layers}
    use_layer_loss = config.layer_loss and n_iters > 0
    hooks_q = _LayerOutputs(layers) if use_layer_loss else None
    hooks_fp = _LayerOutputs(fp_layers) if use_layer_loss else None

    target_norm = float(data.output.double().pow(2).mean()) or 1.0
    n_weights = sum(layer.weight.numel() for layer in layers.values())
    generator = torch.Generator().manual_seed(config.seed if seed is None else seed)
    batch = min(config.batch_size, data.num_samples)
    optimizer = torch.optim.Adam(groups) if groups and n_iters > 0 else None
    losses: list[float] = []
    stopped = False
    bar = tqdm(total=n_iters, desc=f"{stage[0]} {name}", unit="it", leave=False, disable=not progress)
    try:
        for it in range(n_iters if optimizer is not None else 0):
            index = torch.randint(0, data.num_samples, (batch,), generator=generator)
            args, kwargs = data.batch(index, device)
            target = data.output[index].to(device)
            out = block_q(*args, **kwargs)
            rec = (out - target).pow(2).mean() / target_norm
            loss = rec
            if use_layer_loss:
                with torch.no_grad():
                    block_fp(*args, **kwargs)
                layer_term = sum(
                    (hooks_q.outputs[n] - hooks_fp.outputs[n]).pow(2).mean()
                    / hooks_fp.outputs[n].pow(2).mean().clamp_min(1e-12)
                    for n in layers)
                loss = loss + config.layer_loss_weight * layer_term / len(layers)
            if stage == "weights" and config.round_lambda > 0:
                beta, on = A.beta_schedule(it, n_iters, config.warmup, config.beta_start, config.beta_end)
                if on:
                    reg = sum(layer.weight_quantizer.rounding_regularizer(beta, "sum")
                              for layer in layers.values())
                    loss = loss + config.round_lambda * reg / n_weights
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():  # keep scales positive
                for group in groups:
                    for p in group["params"]:
                        if p.dim() <= 1:
                            p.clamp_(min=1e-8)
            value = float(rec.detach())
            losses.append(value)
            bar.update(1)
            if it % 10 == 0 or it == n_iters - 1:
                bar.set_postfix(loss=f"{value:.3e}")
            if on_iteration is not None and on_iteration(name, it, value):
                stopped = True
                break
    finally:
        bar.close()
        if hooks_q is not None:
            hooks_q.remove()
            hooks_fp.remove()
        for p, flag in saved_grad.items():
            p.requires_grad_(flag)
        for layer in layers.values():
            layer.weight_quantizer.scale.requires_grad_(False)
            layer.input_quantizer.scale.requires_grad_(False)
            if layer.weight_quantizer.round_v is not None:
                layer.weight_quantizer.round_v.requires_grad_(stage == "weights")

    reverted = False
    if stage == "weights" and harden:
        for layer in layers.values():
            layer.weight_quantizer.harden_(layer.weight)
    loss_after = block_loss(block_q, data, device)
    if stage == "weights" and harden and loss_after > loss_before and len(start_state) == len(layers):
        # the learned rounding ended worse than round-to-nearest on the calibration data (seen on
        # conv_in, 9 weights per channel, where the regulariser outweighs the tiny reconstruction
        # error): keep round-to-nearest at the starting scales instead
        with torch.no_grad():
            for n, layer in layers.items():
                weight, scale = start_state[n]
                layer.weight_quantizer.set_scale(scale)
                codes = P.quantize_weight_codes(weight, scale, layer.weight_bits)
                layer.weight.copy_(P.dequantize_weight(codes, scale))  # latent = codes * scale
        loss_after, reverted = block_loss(block_q, data, device), True
    bits_now = {layer.weight_bits for layer in layers.values()}
    if isinstance(bits, dict) and bits:  # a ladder level over mixed targets: the level is the lowest
        bits_now = {min(bits.values())}
    return BlockResult(name=name, stage=stage, bits=bits if isinstance(bits, int) else
                       (bits_now.pop() if len(bits_now) == 1 else None),
                       layers=list(layers), iterations=len(losses), stopped_early=stopped, reverted=reverted,
                       loss_before=loss_before, loss_after=loss_after, losses=losses,
                       seconds=time.perf_counter() - started)


def capture_for_reconstruction(fp_unet: nn.Module, student: nn.Module, name: str, calibration: CalibrationSet,
                               config: ReconstructionConfig, batch_size: int, device: str) -> BlockData:
    """A block's training data: FP outputs as targets, inputs from the student (or the FP model).

    With `input_source="student"` (BRECQ) the inputs come from the partially quantized student, so
    each block learns to correct the error of the blocks before it.
    """
    if config.input_source == "fp":
        return capture_block_data(fp_unet, name, calibration, batch_size, device, inputs=True, outputs=True)
    target = capture_block_data(fp_unet, name, calibration, batch_size, device, inputs=False, outputs=True)
    data = capture_block_data(student, name, calibration, batch_size, device, inputs=True, outputs=False)
    data.output = target.output
    return data


def reconstruct_model(
    fp_unet: nn.Module,
    student: nn.Module,
    calibration: CalibrationSet,
    config: ReconstructionConfig,
    *,
    stage: Stage = "weights",
    capture_batch_size: int = 32,
    device: str = "cpu",
    progress: bool = True,
    on_iteration: OnIteration | None = None,
    on_block: Callable[[BlockResult], None] | None = None,
    start: int = 0,
) -> list[BlockResult]:
    """Reconstruct every block of `student` in execution order (BRECQ); return the per-block results.

    `student` is modified in place. In the weight stage every block ends hardened. The quantizers'
    state (activation quantizers on or off, weight scales) is used as found; see
    :func:`pqcad_deploy.methods.brecq.brecq_quantize` for the full flow. `on_block` is called after
    every finished block (a checkpoint can be saved there); `start` skips the blocks before that
    index, already done by an earlier, interrupted run (block `index` is always seeded with
    ``config.seed + index``, so the remaining blocks draw the same batches as in one run).
    """
    blocks = first_pair_blocks(student, calibration, device)
    if not 0 <= start <= len(blocks):
        raise ValueError(f"start must be in [0, {len(blocks)}]; got {start}")
    results: list[BlockResult] = []
    outer = tqdm(blocks[start:], desc=f"reconstruct {stage}", unit="block", initial=start, total=len(blocks),
                 disable=not progress)
    for index, block in enumerate(outer, start=start):
        outer.set_postfix(block=block.name)
        data = capture_for_reconstruction(fp_unet, student, block.name, calibration, config,
                                          capture_batch_size, device)
        result = reconstruct_block(
            student.get_submodule(block.name), fp_unet.get_submodule(block.name), data, config,
            name=block.name, stage=stage, on_iteration=on_iteration, device=device,
            progress=progress, seed=config.seed + index)
        results.append(result)
        if on_block is not None:
            on_block(result)
        del data
    return results
