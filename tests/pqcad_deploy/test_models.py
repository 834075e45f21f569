"""Loading diffusers UNet2DModels (and their schedule) from disk, and every way that can fail."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from _unets import UNET_CONFIGS  # tests/, put on sys.path by tests/conftest.py
from pqcad_deploy.errors import ModelLoadError, PqcadError
from pqcad_deploy.models import load_model, resolve_model_dir

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("name", sorted(UNET_CONFIGS))
def test_load_model_each_fixture_config(unet_dirs, name):
    from diffusers import UNet2DModel

    loaded = load_model(str(unet_dirs[name]))
    unet = loaded.unet
    assert type(unet) is UNet2DModel and not unet.training
    cfg = UNET_CONFIGS[name]
    for key in ("sample_size", "in_channels", "out_channels", "layers_per_block", "norm_num_groups",
                "resnet_time_scale_shift"):
        assert unet.config[key] == cfg[key], key
    assert tuple(unet.config["block_out_channels"]) == cfg["block_out_channels"]
    assert tuple(unet.config["down_block_types"]) == cfg["down_block_types"]
    # the weights are the fixture's, bit for bit: rebuild them from the same seed independently
    torch.manual_seed(0)
    reference = UNet2DModel(**cfg).state_dict()
    state = unet.state_dict()
    assert state.keys() == reference.keys()
    for k, v in reference.items():
        assert torch.equal(state[k], v), k
    # the schedule comes back as a DDIM config of the fixture's DDPM schedule
    sc = loaded.scheduler_config
    assert sc["_class_name"] == "DDIMScheduler"
    assert sc["num_train_timesteps"] == 1000 and sc["beta_schedule"] == "linear"
    assert sc["beta_start"] == 0.0001 and sc["beta_end"] == 0.02
    assert sc["prediction_type"] == "epsilon"
    json.dumps(sc)  # plain JSON types
    assert loaded.source == str(unet_dirs[name].resolve())
    assert loaded.unet_dir == unet_dirs[name]


def test_load_pipeline_layout(small_unet_dir, tmp_path):
    pipe = tmp_path / "pipe"
    (pipe / "scheduler").mkdir(parents=True)
    shutil.copytree(small_unet_dir, pipe / "unet")
    shutil.move(str(pipe / "unet" / "scheduler_config.json"), pipe / "scheduler" / "scheduler_config.json")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    assert resolve_model_dir(str(pipe)) == (pipe / "unet", pipe / "scheduler")
    loaded = load_model(str(pipe))
    direct = load_model(str(small_unet_dir))
    assert loaded.unet_dir == pipe / "unet"
    assert loaded.scheduler_config == direct.scheduler_config
    a, b = loaded.unet.state_dict(), direct.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


# ----------------------------------------------------------------------------- failures
def _raises(model: str | Path, *fragments: str) -> str:
    with pytest.raises(ModelLoadError) as exc:
        load_model(str(model))
    msg = str(exc.value)
    for fragment in fragments:
        assert fragment in msg, msg
    assert "\n" not in msg.strip() and isinstance(exc.value, PqcadError)
    return msg


def test_missing_directory(tmp_path):
    _raises(tmp_path / "nope", "model directory", "nope", "does not exist")


def test_directory_without_config(small_unet_dir, tmp_path):
    d = _copy(small_unet_dir, tmp_path / "m")
    (d / "config.json").unlink()
    _raises(d, "is not a diffusers model directory", "no config.json")


def test_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    _raises(tmp_path / "empty", "no config.json")


@pytest.mark.parametrize("text,fragment", [("{not json", "is not valid JSON"), ("", "is not valid JSON"),
                                           ("[1, 2]", "is not a JSON object")])
def test_config_not_json(small_unet_dir, tmp_path, text, fragment):
    d = _copy(small_unet_dir, tmp_path / "m")
    (d / "config.json").write_text(text)
    _raises(d, "UNet config", "config.json", fragment)


@pytest.mark.parametrize("cls,shown", [("UNet2DConditionModel", "holds a UNet2DConditionModel"),
                                       (None, "holds a model of unknown class")])
def test_wrong_model_class(small_unet_dir, tmp_path, cls, shown):
    d = _copy(small_unet_dir, tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    if cls is None:
        del config["_class_name"]
    else:
        config["_class_name"] = cls
    (d / "config.json").write_text(json.dumps(config))
    _raises(d, shown, "not a UNet2DModel", "unconditional")


@pytest.mark.parametrize("damage", ["truncated", "header_only", "garbage", "missing"])
def test_corrupt_weights(small_unet_dir, tmp_path, damage):
    d = _copy(small_unet_dir, tmp_path / "m")
    w = d / WEIGHTS
    data = w.read_bytes()
    if damage == "truncated":
        w.write_bytes(data[: len(data) // 2])
    elif damage == "header_only":
        w.write_bytes(data[:5])
    elif damage == "garbage":
        w.write_bytes(b"\x00" * 1000)
    else:
        w.unlink()
    _raises(d, "cannot load the UNet weights from", str(d))


def test_weights_that_do_not_match_the_config(unet_dirs, tmp_path):
    # a 3-channel config next to 1-channel weights: shapes disagree
    d = _copy(unet_dirs["c1_32_attn1_default"], tmp_path / "m")
    shutil.copy(unet_dirs["c3_32_attn2_scaleshift"] / "config.json", d / "config.json")
    _raises(d, "cannot load the UNet weights from")


def test_missing_scheduler_config(small_unet_dir, tmp_path):
    d = _copy(small_unet_dir, tmp_path / "m")
    (d / "scheduler_config.json").unlink()
    _raises(d, "has no scheduler_config.json", "noise schedule")


def test_scheduler_config_not_an_object(small_unet_dir, tmp_path):
    d = _copy(small_unet_dir, tmp_path / "m")
    (d / "scheduler_config.json").write_text("[1, 2]")
    _raises(d, "scheduler config", "is not a JSON object")


def test_unknown_hub_id_fails_fast_offline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so "someone/some-model" is not a relative local path
    started = time.perf_counter()
    msg = _raises("someone/some-model", "'someone/some-model' is not a local directory",
                  "the model hub cannot be reached", "'builtin'")
    assert time.perf_counter() - started < 10.0, msg


def test_relative_local_path_is_not_taken_for_a_hub_id(small_unet_dir, tmp_path, monkeypatch):
    (tmp_path / "someone").mkdir()
    shutil.copytree(small_unet_dir, tmp_path / "someone" / "model")
    monkeypatch.chdir(tmp_path)
    loaded = load_model("someone/model")
    assert loaded.source == str((tmp_path / "someone" / "model").resolve())


# ----------------------------------------------------------------------------- models that cannot work
def _edit_weights(d: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(d / WEIGHTS))
    edit(state)
    save_file(state, str(d / WEIGHTS))


@pytest.mark.parametrize("value, count", [(float("inf"), 1), (float("nan"), 2)])
def test_non_finite_weights_are_refused_at_load(small_unet_dir, tmp_path, value, count):
    d = _copy(small_unet_dir, tmp_path / "m")

    def poison(state):
        for key in sorted(state)[:count]:
            state[key].view(-1)[0] = value

    _edit_weights(d, poison)
    first = sorted(load_model(str(small_unet_dir)).unet.state_dict())  # state-dict order, first poisoned
    msg = _raises(d, f"model {str(d)!r} has NaN or Inf in {count} weight tensor(s) (first: ",
                  "use a finite checkpoint")
    assert len(msg.splitlines()) == 1
    assert any(f"(first: {k})" in msg for k in first)


@pytest.mark.parametrize("config_name, size, fragments", [
    ("c3_32_attn2_scaleshift", 30, ("sample_size 30", "2 downsampling block(s)", "multiple of 4", "e.g. 28 or 32")),
    ("c1_32_attn1_default", 7, ("sample_size 7", "1 downsampling block(s)", "multiple of 2", "e.g. 6 or 8")),
    ("c1_32_attn1_default", [32, 31], ("sample_size [32, 31]", "multiple of 2", "e.g. 30 or 32")),
    ("c1_32_attn1_default", 0, ("sample_size 0", "is not a positive integer")),
    ("c1_32_attn1_default", None, ("sample_size None", "is not a positive integer")),
])
def test_sample_size_the_unet_cannot_run_is_refused(unet_dirs, tmp_path, config_name, size, fragments):
    d = _copy(unet_dirs[config_name], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["sample_size"] = size
    (d / "config.json").write_text(json.dumps(cfg))
    msg = _raises(d, *fragments, str(d / "config.json"))
    assert len(msg.splitlines()) == 1


def test_sample_sizes_that_the_unet_can_run_load(unet_dirs, tmp_path):
    """A multiple of 2 ** downsamplings other than the trained size still loads (and runs)."""
    d = _copy(unet_dirs["c3_32_attn2_scaleshift"], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["sample_size"] = 24
    (d / "config.json").write_text(json.dumps(cfg))
    assert load_model(str(d)).unet.config.sample_size == 24


def test_builtin_size_multiple_and_dry_forward_cost():
    """The embedded model: 2 downsamplings (multiple of 4); the load-time dry forward costs milliseconds."""
    from pqcad_deploy.models import check_model, size_multiple

    loaded = load_model("builtin")
    assert size_multiple(loaded.unet) == 4
    started = time.perf_counter()
    check_model(loaded.unet, "the embedded model")
    assert time.perf_counter() - started < 2.0  # measured: 0.04-0.06 s on one CPU thread


def test_dry_forward_failure_is_one_line(small_unet_dir):
    from pqcad_deploy.models import check_model

    unet = load_model(str(small_unet_dir)).unet

    def broken(*args, **kwargs):
        raise RuntimeError("Sizes of tensors must match except in dimension 1.\nExpected size 8 but got 7")

    unet.forward = broken
    with pytest.raises(ModelLoadError) as exc:
        check_model(unet, "model 'x'", "x/config.json")
    msg = str(exc.value)
    assert len(msg.splitlines()) == 1
    assert "a test forward pass of one 1x32x32 sample fails (RuntimeError: Sizes of tensors must match" in msg
    assert "check x/config.json against the weights" in msg


def test_dry_forward_output_must_be_finite_and_the_samples_shape(small_unet_dir):
    from types import SimpleNamespace

    from pqcad_deploy.models import check_model

    unet = load_model(str(small_unet_dir)).unet
    real = unet.forward
    unet.forward = lambda x, t: SimpleNamespace(sample=real(x, t).sample * float("inf"))
    with pytest.raises(ModelLoadError, match="gives NaN or Inf although the weights are finite"):
        check_model(unet, "model 'x'")
    unet.forward = lambda x, t: SimpleNamespace(sample=real(x, t).sample[:, :0])
    with pytest.raises(ModelLoadError, match=r"maps a \[1, 1, 32, 32\] sample to \[1, 0, 32, 32\]"):
        check_model(unet, "model 'x'")


def test_the_builtin_colour_model_loads_by_name() -> None:
    """builtin:cifar10: the second reference model (3 channels, 32 px, under 16 MiB of fp32 weights)."""
    from pqcad_deploy.models import BUILTIN_MODELS, load_model

    loaded = load_model("builtin:cifar10")
    config = loaded.unet.config
    assert (config.in_channels, config.out_channels, config.sample_size) == (3, 3, 32)
    assert sum(p.numel() for p in loaded.unet.parameters()) * 4 <= 16 * 2**20
    assert loaded.source == "builtin:cifar10" and loaded.scheduler_config["prediction_type"] == "epsilon"
    assert load_model("builtin").unet.config.in_channels == 1 == load_model("builtin:fashion-mnist").unet.config.in_channels
    assert BUILTIN_MODELS["builtin"] == BUILTIN_MODELS["builtin:fashion-mnist"]


def test_the_builtin_latent_model_loads_by_name_with_its_parts() -> None:
    """builtin:cifar10-latent: the third reference model (issue 17), a class-embedding latent pipeline whose
    sampler uses trailing timesteps and whose VAE carries the per-channel latent normalisation (MODEL_CARD.md)."""
    from pqcad_deploy.models import BUILTIN_MODELS, load_model

    loaded = load_model("builtin:cifar10-latent")
    assert loaded.kind == "class-embedding-latent" and loaded.source == "builtin:cifar10-latent"
    assert type(loaded.unet).__name__ == "UNet2DConditionModel"
    assert (loaded.unet.config.in_channels, loaded.unet.config.sample_size, loaded.unet.config.cross_attention_dim) == (
        4, 16, 128)
    assert sum(p.numel() for p in loaded.unet.parameters()) == 2_941_508
    assert (loaded.class_table.num_classes, loaded.class_table.null_class) == (10, 10)
    assert loaded.class_table.class_names[3] == "cat"
    config = loaded.scheduler_config
    assert (config["timestep_spacing"], config["steps_offset"], config["beta_schedule"]) == ("trailing", 0,
                                                                                              "scaled_linear")
    assert loaded.vae.config.scaling_factor == pytest.approx(1.0, abs=1e-3)  # normalised latents: std 1 per channel
    folder = BUILTIN_MODELS["builtin:cifar10-latent"]
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 8.5e6  # fits the wheel and a GPU carry


def test_an_unknown_builtin_name_lists_the_builtin_models() -> None:
    from pqcad_deploy.errors import ModelLoadError
    from pqcad_deploy.models import load_model

    with pytest.raises(ModelLoadError, match=r"unknown builtin model 'builtin:imagenet'; the builtin models are "
                                             r"builtin, builtin:cifar10, builtin:cifar10-latent, "
                                             r"builtin:fashion-mnist\."):
        load_model("builtin:imagenet")
