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
