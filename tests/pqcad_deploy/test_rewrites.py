"""The float-equivalent rewrites: where the concat splits, that the float output is unchanged, what
SmoothQuant computes, and that compress, the artifact and the exported graph carry them."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from torch import nn

from pqcad_deploy.choices import SPLIT_CONCAT
from pqcad_deploy.quant import rewrites as R


@pytest.fixture
def small_unet(small_unet_dir):
    from diffusers import UNet2DModel

    return UNet2DModel.from_pretrained(str(small_unet_dir)).eval()


def _inputs(unet, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, s = unet.config.in_channels, unet.config.sample_size
    return torch.randn(batch, c, s, s, generator=g), torch.tensor([10, 700])[:batch]


def test_the_registry_and_the_cli_choices_name_the_same_splits():
    assert tuple(R.SPLIT_CONCAT_CHOICES) == SPLIT_CONCAT


@torch.no_grad()
def test_the_skip_half_of_each_split_is_exactly_a_tensor_of_the_encoder_path(small_unet):
    """The split channel must separate h from the skip tensor: the second half of the recorded input
    is bit for bit one of the residuals the down path produced (conv_in, every down-block resnet,
    attention and downsampler output)."""
    splits = R.concat_input_layers(small_unet, ("conv_shortcut", "conv1"))
    assert any(n.endswith("conv_shortcut") for n in splits) and any(n.endswith("conv1") for n in splits)
    assert all(n.startswith("up_blocks.") for n in splits)
    residuals, seen = [], {}
    hooks = [small_unet.conv_in.register_forward_hook(lambda m, a, out: residuals.append(out))]
    for block in small_unet.down_blocks:
        for sub in list(block.resnets) + list(getattr(block, "attentions", None) or []) + list(block.downsamplers or []):
            hooks.append(sub.register_forward_hook(lambda m, a, out: residuals.append(out)))
    for name in splits:
        resnet = small_unet.get_submodule(name.rpartition(".")[0])
        hooks.append(resnet.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0])))
    try:
        small_unet(*_inputs(small_unet))
    finally:
        for h in hooks:
            h.remove()
    for name, split in splits.items():
        skip = seen[name][:, split:]
        assert any(r.shape == skip.shape and torch.equal(r, skip) for r in residuals), name
        assert not any(r.shape == seen[name][:, split - 1:].shape and torch.equal(r, seen[name][:, split - 1:])
                       for r in residuals)


@torch.no_grad()
def test_the_rewrites_leave_the_float_output_unchanged(small_unet):
    import copy

    x, t = _inputs(small_unet)
    ref = small_unet(x, t).sample
    rewritten = copy.deepcopy(small_unet)
    split = R.split_concat_inputs(rewritten, "shortcut+conv1")
    linears = [n for n, m in rewritten.named_modules() if isinstance(m, nn.Linear)]
    smooth = R.smooth_linears(rewritten, linears)
    from pqcad_deploy.calibration.trajectories import CalibrationSet

    R.fit_smoothing(rewritten, CalibrationSet(x=x, t=t, description={}), alpha=0.5, batch_size=2, device="cpu")
    assert isinstance(rewritten.get_submodule(next(iter(split.renamed))), R.SplitInputConv2d)
    assert all(isinstance(rewritten.get_submodule(n), R.SmoothedLinear) for n in smooth.renamed)
    assert not all(bool((rewritten.get_submodule(n).input_multiplier == 1).all()) for n in smooth.renamed)
    torch.testing.assert_close(rewritten(x, t).sample, ref, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_smoothquant_moves_alpha_of_the_activation_range_into_the_weight():
    torch.manual_seed(0)
    linear = nn.Linear(4, 3)
    w = linear.weight.detach().clone()
    model = nn.Sequential(linear)
    x = torch.tensor([[1.0, -8.0, 0.5, 2.0], [-0.25, 4.0, -2.0, 1.0]])
    R.smooth_linears(model, ["0"])
    from pqcad_deploy.calibration.trajectories import CalibrationSet

    class _Call(nn.Module):  # fit_smoothing calls model(x, t)
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, t):
            return self.inner(x)

    R.fit_smoothing(_Call(model), CalibrationSet(x=x, t=torch.zeros(2), description={}), alpha=0.5,
                    batch_size=2, device="cpu")
    a = x.abs().amax(dim=0)
    s = (a.sqrt() / w.abs().amax(dim=0).sqrt())
    smoothed = model[0]
    torch.testing.assert_close(smoothed.input_multiplier, 1 / s)
    torch.testing.assert_close(smoothed.linear.weight, w * s)
    # the activation the quantizer sees: channel ranges a / s = sqrt(a * max|w|), flatter than a
    seen = (x * smoothed.input_multiplier).abs().amax(dim=0)
    assert float(seen.max() / seen.min()) < float(a.max() / a.min())


def test_compress_export_and_analyze_carry_the_rewrites(small_unet_dir, tmp_path):
    """The artifact names the split halves and smoothed Linears, rebuilds the same student, and the
    QDQ graph computes each split conv as Slice -> Q/DQ -> Conv twice plus an Add, and each smoothed
    Linear as Mul -> Q/DQ -> MatMul."""
    from pqcad_deploy.converters.export_onnx import export_onnx
    from pqcad_deploy.artifact import load_artifact
    from pqcad_deploy.compress import compress
    from pqcad_deploy.config import CompressConfig

    art = tmp_path / "art"
    compress(CompressConfig(model=str(small_unet_dir), method="minmax", distill=False, teacher_steps=10,
                            preset="fast", split_concat="shortcut", smoothquant_alpha=0.5), art, progress=False)
    manifest = json.loads((art / "artifact.json").read_text())
    report = json.loads((art / "report.json").read_text())
    split = report["rewrites"]["split_layers"]
    assert split and all(n.endswith("conv_shortcut") and n.startswith("up_blocks.") for n in split)
    for name in split:
        assert {f"{name}.head", f"{name}.skip"} <= manifest["layers"].keys() and name not in manifest["layers"]
    smoothed = report["rewrites"]["smoothquant"]["layers"]
    assert "time_embedding.linear_1" in smoothed and "time_embedding.linear_1.linear" in manifest["layers"]

    loaded = load_artifact(art)
    student = loaded.build_student()
    assert isinstance(student.get_submodule(split[0]), R.SplitInputConv2d)
    teacher = loaded.build_teacher(like_student=True)
    x, t = _inputs(teacher)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x, t).sample, loaded.build_teacher()(x, t).sample, rtol=1e-4, atol=1e-5)

    graph = onnx.load(str(export_onnx(art, tmp_path / "m.onnx", target="qdq").path)).graph
    producer = {o: n for n in graph.node for o in n.output}

    def chain(tensor: str, depth: int) -> list[str]:
        ops = []
        for _ in range(depth):
            node = producer.get(tensor)
            if node is None:
                break
            ops.append(node.op_type)
            tensor = node.input[0]
        return ops

    convs = {n.name: n for n in graph.node if n.op_type == "Conv"}
    halves = [key for key in convs if "conv_shortcut/head" in key or "conv_shortcut/skip" in key]
    assert len(halves) == 2 * len(split), halves
    for conv in (c for key, c in convs.items() if "conv_shortcut/" in key and "up_blocks" in key):
        assert chain(conv.input[0], 3) == ["DequantizeLinear", "QuantizeLinear", "Slice"], conv.name
    consumers = {i: n for n in graph.node for i in n.input}
    assert consumers[next(iter(convs[k] for k in convs if "conv_shortcut/head" in k)).output[0]].op_type == "Add"
    matmul = next(n for n in graph.node if n.op_type == "MatMul" and "time_embedding/linear_1" in n.name)
    assert chain(matmul.input[0], 3) == ["DequantizeLinear", "QuantizeLinear", "Mul"]

    from pqcad_deploy.analyze import analyze_artifact

    analyze_artifact(art, tmp_path / "an", n=2, sensitivity_steps=2, progress=False)
    data = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert f"{split[0]}.skip" in json.dumps(data)
