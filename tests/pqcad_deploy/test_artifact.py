"""`compress` -> artifact directory -> `load_artifact`: the contract of docs/CONTRACTS.md section 1.

compress runs three times for the whole module (W8A8, W4A8, and W8A8 again for determinism), on the
`fast` preset with 10 teacher steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pqcad_deploy.artifact import (
    ARTIFACT_FORMAT, ARTIFACT_VERSION, DERIVED_FIELDS, artifact_digest, load_artifact, save_artifact,
)
from pqcad_deploy.calibration.trajectories import collect_trajectory_calibration
from pqcad_deploy.schedule import make_ddim_scheduler
from pqcad_deploy.compress import compress, quantization_report
from pqcad_deploy.config import CompressConfig, config_to_dict
from pqcad_deploy.errors import ArtifactError, ModelLoadError, OutputPathError
from pqcad_deploy.methods.minmax import minmax_quantize
from pqcad_deploy.models import load_model
from pqcad_deploy.quant.layers import QuantConv2d, QuantLinear
from pqcad_deploy.quant.replace import LayerBits

STEPS = 10
QMAX = {8: 127, 4: 7}
# noise-prediction SQNR of the student against the FP model over the calibration set, measured on
# the c1_32_attn1_default fixture (seed 0, fast preset, 10 steps, torch 2.13 CPU): W8A8 19.69 dB,
# W4A8 11.94 dB on one thread (19.64 / 11.96 dB on two: the FP trajectories differ in the last bits).
SQNR_DB = {8: 19.69, 4: 11.94}


def _config(model_dir: Path, weight_bits: int, seed: int = 0) -> CompressConfig:
    return CompressConfig(model=str(model_dir), method="minmax", distill=False, weight_bits=weight_bits, act_bits=8,
                          teacher_steps=STEPS, preset="fast", seed=seed)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="module")
def compressed(small_unet_dir, work):
    """weight bits -> (config, CompressResult) of the small UNet at W{bits}A8."""
    out = {}
    for bits in (8, 4):
        config = _config(small_unet_dir, bits)
        out[bits] = (config, compress(config, work / f"w{bits}a8", progress=False))
    return out


@pytest.fixture(scope="module")
def fp(small_unet_dir):
    return load_model(str(small_unet_dir))


@pytest.fixture(scope="module")
def float_layers(fp) -> dict[str, nn.Module]:
    """Every Conv2d / Linear of the FP UNet, found independently of the quantization registry."""
    return {n: m for n, m in fp.unet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@pytest.fixture(scope="module")
def calibration(fp):
    return collect_trajectory_calibration(fp.unet, make_ddim_scheduler(fp.scheduler_config, STEPS), (1, 32, 32),
                                          CompressConfig(method="minmax", preset="fast").calibration_config, seed=0,
                                          progress=False)


def _manifest(path: Path) -> dict:
    return json.loads((path / "artifact.json").read_text())


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ----------------------------------------------------------------------------- manifest
@pytest.mark.parametrize("bits", [8, 4])
def test_manifest(compressed, bits, small_unet_dir, float_layers, fp):
    from diffusers import DDIMScheduler

    config, result = compressed[bits]
    path = result.artifact
    assert sorted(p.name for p in path.iterdir() if p.name != ".pqcad-deploy.json") == [
        "artifact.json", "report.json", "student.safetensors", "teacher.safetensors"]
    text = (path / "artifact.json").read_text()
    m = json.loads(text)
    assert text == json.dumps(m, sort_keys=True, indent=1)  # sorted JSON
    assert (m["format"], m["version"]) == ("pqcad-artifact", 3) == (ARTIFACT_FORMAT, ARTIFACT_VERSION)
    # every other file of the artifact, with its sha256
    assert m["files"] == {name: hashlib.sha256((path / name).read_bytes()).hexdigest()
                          for name in ("report.json", "student.safetensors", "teacher.safetensors")}
    assert m["options"] == config_to_dict(config)
    assert m["options"]["_type"] == "CompressConfig" and m["options"]["weight_bits"] == bits
    assert m["unet_class"] == "UNet2DModel" and m["image_shape"] == [1, 32, 32]
    assert m["unet_config"]["block_out_channels"] == [16, 32]
    assert m["scheduler_config"] == fp.scheduler_config
    # each fact once: the derived fields are the loaded manifest's properties, not keys of the file
    assert not DERIVED_FIELDS.keys() & m.keys()
    loaded = load_artifact(path).manifest
    assert (loaded.method, loaded.teacher_steps, loaded.distilled) == ("minmax", STEPS, False)
    assert (loaded.prediction_type, loaded.student_steps) == ("epsilon", STEPS)
    # the exact diffusers DDIM grid for the fixture's DDPM schedule
    ddim = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    ddim.set_timesteps(STEPS)
    assert m["student_timesteps"] == [int(t) for t in ddim.timesteps]
    assert m["student_timesteps"] == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    # layers: every Conv2d / Linear, with its kind, bits and shape
    assert sorted(m["layers"]) == sorted(float_layers) and len(m["layers"]) == result.num_quantized_layers == 51
    for name, rec in m["layers"].items():
        layer = float_layers[name]
        assert rec == {"kind": "conv2d" if isinstance(layer, nn.Conv2d) else "linear", "weight_bits": bits,
                       "act_bits": 8, "weight_shape": list(layer.weight.shape)}, name
    # calibration: 4 trajectories, 8 of the 10 steps kept (np.linspace(0, 9, 8) rounded)
    assert m["calibration"] == {"source": "fp_ddim_trajectories", "num_steps": STEPS, "seed": 0,
                                "num_trajectories": 4, "timestep_sampling": "uniform", "selection": "none",
                                "timesteps_kept": [0, 100, 300, 400, 500, 600, 800, 900]}
    prov = m["provenance"]
    import diffusers

    assert prov["seed"] == 0 and prov["source_model"] == str(small_unet_dir.resolve())
    assert prov["versions"]["torch"] == torch.__version__
    assert prov["versions"]["diffusers"] == diffusers.__version__
    assert prov["versions"]["numpy"] == np.__version__
    weights = small_unet_dir / "diffusion_pytorch_model.safetensors"
    assert prov["source_weights_sha256"] == {weights.name: hashlib.sha256(weights.read_bytes()).hexdigest()}
    assert "created" not in prov  # no timestamp: same seed, same bytes


def test_artifact_files_get_the_usual_modes(compressed):
    umask = os.umask(0)
    os.umask(umask)
    path = compressed[8][1].artifact
    assert (path.stat().st_mode & 0o777) == 0o777 & ~umask
    for f in path.iterdir():
        assert (f.stat().st_mode & 0o777) == 0o666 & ~umask, f


# ----------------------------------------------------------------------------- tensors
@pytest.mark.parametrize("bits", [8, 4])
def test_student_tensors(compressed, bits, fp, float_layers):
    path = compressed[bits][1].artifact
    student = _safetensors(path / "student.safetensors")
    teacher = _safetensors(path / "teacher.safetensors")
    fp_state = fp.unet.state_dict()
    # the teacher is the untouched FP state dict
    assert teacher.keys() == fp_state.keys()
    for k, v in fp_state.items():
        assert torch.equal(teacher[k], v), k
    expected_keys = {f"{n}.{leaf}" for n in float_layers for leaf in ("weight_codes", "weight_scale", "act_scale")}
    expected_keys |= set(fp_state) - {f"{n}.weight" for n in float_layers}
    assert set(student) == expected_keys
    qmax = QMAX[bits]
    for name, layer in float_layers.items():
        w = layer.weight.detach()
        codes, scale = student[f"{name}.weight_codes"], student[f"{name}.weight_scale"]
        act_scale = student[f"{name}.act_scale"]
        assert codes.dtype == torch.int8 and codes.shape == w.shape
        assert int(codes.min()) >= -qmax and int(codes.max()) <= qmax
        assert scale.dtype == torch.float32 and scale.shape == (w.shape[0],)
        assert act_scale.dtype == torch.float32 and act_scale.shape == () and float(act_scale) > 0
        # min-max scales, bit-exact against a NumPy recomputation from the teacher weight
        w_np = w.numpy().reshape(w.shape[0], -1)
        np.testing.assert_array_equal(scale.numpy(), np.abs(w_np).max(1) / np.float32(qmax))
        # every channel's largest |w| lands on +-qmax, and codes * scale is within half a step of w
        assert (codes.reshape(w.shape[0], -1).abs().amax(1) == qmax).all(), name
        deq = codes.float() * scale.reshape((-1,) + (1,) * (w.dim() - 1))
        step = scale.reshape((-1,) + (1,) * (w.dim() - 1)).expand_as(w)
        assert ((deq - w).abs() <= 0.5 * step * (1 + 1e-5)).all(), name
    for key in set(fp_state) - {f"{n}.weight" for n in float_layers}:
        assert torch.equal(student[key], fp_state[key]), key


@pytest.mark.parametrize("bits", [8, 4])
def test_report(compressed, bits):
    _, result = compressed[bits]
    report = json.loads((result.artifact / "report.json").read_text())
    assert report["method"] == "minmax"
    assert report["noise_pred_sqnr_db"] == result.noise_pred_sqnr_db
    assert report["noise_pred_sqnr_db"] == pytest.approx(SQNR_DB[bits], abs=1.0)
    assert len(report["layers"]) == 51
    assert all(r["weight_bits"] == bits and r["act_bits"] == 8 for r in report["layers"].values())


def test_fewer_weight_bits_do_more_damage(compressed):
    assert compressed[8][1].noise_pred_sqnr_db > compressed[4][1].noise_pred_sqnr_db + 5.0


# ----------------------------------------------------------------------------- round trip
def test_build_student_reproduces_in_memory_student(compressed, fp, calibration):
    """Rebuild the W8A8 student in memory the way compress does; the artifact must give it back exactly."""
    from pqcad_deploy.artifact import student_state_from_model

    _, result = compressed[8]
    plan = {n: LayerBits(8, 8) for n, m in fp.unet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    in_memory = minmax_quantize(fp.unet, plan, calibration, batch_size=4, progress=False)
    on_disk = _safetensors(result.artifact / "student.safetensors")
    state = student_state_from_model(in_memory)
    assert state.keys() == on_disk.keys()
    for k in state:
        assert torch.equal(state[k], on_disk[k]), k
    built = load_artifact(result.artifact).build_student()
    assert all(isinstance(m, (QuantConv2d, QuantLinear)) for n, m in built.named_modules() if n in plan)
    with torch.no_grad():
        for x, t, _cond in calibration.batches(4):
            assert torch.equal(built(x, t).sample, in_memory(x, t).sample)


@pytest.mark.parametrize("bits", [8, 4])
def test_built_student_reproduces_reported_sqnr(compressed, bits, fp, calibration):
    _, result = compressed[bits]
    art = load_artifact(result.artifact)
    student = art.build_student()
    report = quantization_report(fp.unet, student, calibration, 4, "cpu")
    assert report["noise_pred_sqnr_db"] == result.noise_pred_sqnr_db
    assert report["noise_pred_mse"] == art.report["noise_pred_mse"]
    # building twice gives the same model
    again = art.build_student()
    x, t = calibration.x[:2], calibration.t[:2]
    with torch.no_grad():
        assert torch.equal(student(x, t).sample, again(x, t).sample)


def test_build_teacher_equals_original(compressed, fp):
    teacher = load_artifact(compressed[4][1].artifact).build_teacher()
    assert type(teacher) is type(fp.unet) and not teacher.training
    torch.manual_seed(5)
    x, t = torch.randn(3, 1, 32, 32), torch.tensor([0.0, 450.0, 999.0])
    with torch.no_grad():
        assert torch.equal(teacher(x, t).sample, fp.unet(x, t).sample)


def test_same_seed_gives_identical_artifact(compressed, small_unet_dir, work):
    config, first = compressed[8]
    second = compress(config, work / "w8a8_again", progress=False)
    names = sorted(p.name for p in first.artifact.iterdir())
    assert names == sorted(p.name for p in second.artifact.iterdir())
    for name in names:  # artifact.json included: byte for byte
        assert (first.artifact / name).read_bytes() == (second.artifact / name).read_bytes(), name
    assert artifact_digest(first.artifact) == artifact_digest(second.artifact)
    assert second.noise_pred_sqnr_db == first.noise_pred_sqnr_db


def test_report_timings_are_not_stored(compressed, tmp_path):
    """Wall-clock durations would make two identical runs differ: save_artifact drops every `seconds`."""
    src = compressed[8][1].artifact
    art = load_artifact(src)
    report = {**art.report, "pq": {"seconds": {"weights": 1.5, "total": 2.5}, "weights": [{"name": "b", "seconds": 3}]},
              "distillation": {"seconds": 4.0, "losses": []}}
    out = save_artifact(tmp_path / "x", art.manifest, art.student_tensors, _safetensors(src / "teacher.safetensors"),
                        report)
    saved = json.loads((out / "report.json").read_text())
    assert saved["pq"] == {"weights": [{"name": "b"}]} and saved["distillation"] == {"losses": []}
    assert "seconds" not in (out / "report.json").read_text()
    load_artifact(out)  # the recorded hashes are those of the files as written


def test_artifact_digest(compressed):
    """artifact.json, then every file it records, in name order: the digest covers every file."""
    path = compressed[8][1].artifact
    h = hashlib.sha256((path / "artifact.json").read_bytes() + (path / "report.json").read_bytes()
                       + (path / "student.safetensors").read_bytes() + (path / "teacher.safetensors").read_bytes())
    assert artifact_digest(path) == h.hexdigest()


def test_artifact_digest_changes_with_the_teacher(art_copy, unet_dirs):
    before = artifact_digest(art_copy)
    shutil.copyfile(unet_dirs["c1_32_attn1_default"] / "diffusion_pytorch_model.safetensors",
                    art_copy / "teacher.safetensors")
    assert artifact_digest(art_copy) != before


# ----------------------------------------------------------------------------- corrupt artifacts
@pytest.fixture
def art_copy(compressed, tmp_path) -> Path:
    return Path(shutil.copytree(compressed[8][1].artifact, tmp_path / "art"))


def _load_fails(path: Path, *fragments: str) -> str:
    with pytest.raises(ArtifactError) as exc:
        load_artifact(path)
    msg = str(exc.value)
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def _edit_manifest(path: Path, **changes) -> None:
    m = _manifest(path)
    m.update(changes)
    (path / "artifact.json").write_text(json.dumps(m))


def test_load_missing_directory(tmp_path):
    _load_fails(tmp_path / "nope", "does not exist or is not a directory")


def test_load_missing_manifest(art_copy):
    (art_copy / "artifact.json").unlink()
    _load_fails(art_copy, "is not a pqcad-deploy artifact", "artifact.json is missing")


@pytest.mark.parametrize("text,fragment", [("{broken", "is not valid JSON"), ("", "is not valid JSON"),
                                           ("[1]", "is not a JSON object")])
def test_load_bad_json(art_copy, text, fragment):
    (art_copy / "artifact.json").write_text(text)
    _load_fails(art_copy, "artifact.json", fragment)


@pytest.mark.parametrize("fmt", ["pqcad-onnx", None, ""])
def test_load_wrong_format(art_copy, fmt):
    _edit_manifest(art_copy, format=fmt)
    _load_fails(art_copy, "is not a pqcad-deploy artifact", f"(format {fmt!r})")


@pytest.mark.parametrize("version", [4, 99, "1", None])
def test_load_newer_or_bad_version(art_copy, version):
    _edit_manifest(art_copy, version=version)
    _load_fails(art_copy, f"has artifact version {version!r}", "reads up to 3", "upgrade pqcad-deploy")


def _as_version(path: Path, version: int, **changes) -> None:
    """Rewrite artifact.json as version 1 or 2 wrote it: the derived fields stored as well (then `changes`)."""
    m = _manifest(path)
    m.update(version=version, method=m["options"]["method"], teacher_steps=m["options"]["teacher_steps"],
             distilled=m["options"]["distill"], prediction_type=m["scheduler_config"]["prediction_type"],
             student_steps=len(m["student_timesteps"]))
    m.update(changes)
    if version == 1:
        del m["files"]
    (path / "artifact.json").write_text(json.dumps(m, sort_keys=True, indent=1))


def _derived(art) -> dict:
    return {name: getattr(art.manifest, name) for name in DERIVED_FIELDS}


@pytest.mark.parametrize("version", [1, 2])
def test_versions_1_and_2_give_the_same_values(art_copy, compressed, version):
    """Their stored copies agree with what they copy: loaded, the manifest is the same as version 3's."""
    new = load_artifact(art_copy).manifest
    _as_version(art_copy, version)
    art = load_artifact(art_copy)
    assert art.manifest.version == version and _derived(art) == _derived(load_artifact(compressed[8][1].artifact))
    assert art.manifest == dataclasses.replace(new, version=version, files=new.files if version == 2 else {})


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("name, value, source", [
    ("method", "pqcad", "options.method is 'minmax'"),
    ("teacher_steps", 20, "options.teacher_steps is 10"),
    ("distilled", True, "options.distill is False"),
    ("prediction_type", "v_prediction", "scheduler_config.prediction_type is 'epsilon'"),
    ("student_steps", 5, "the length of student_timesteps is 10"),
])
def test_old_version_copy_that_disagrees_is_refused(art_copy, version, name, value, source):
    _as_version(art_copy, version, **{name: value})
    msg = _load_fails(art_copy, f"inconsistent artifact.json (version {version}): {name} is {value!r} but {source}",
                      "edited after compress: recompress the artifact")
    assert "\n" not in msg


def test_version_3_with_a_derived_field_is_refused(art_copy):
    _edit_manifest(art_copy, student_steps=10)
    _load_fails(art_copy, "malformed artifact.json", "student_steps")


def test_version_1_artifacts_are_still_read(art_copy, compressed):
    """Version 1 (no recorded file hashes) loads as before; its digest is the old one."""
    _as_version(art_copy, 1)
    art = load_artifact(art_copy)
    assert art.manifest.version == 1 and art.manifest.files == {}
    h = hashlib.sha256((art_copy / "artifact.json").read_bytes() + (art_copy / "student.safetensors").read_bytes())
    assert artifact_digest(art_copy) == h.hexdigest()
    reference = load_artifact(compressed[8][1].artifact).build_student().state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in art.build_student().state_dict().items())


@pytest.mark.parametrize("files", ["drop", {}, {"student.safetensors": "0" * 64}, ["x"],
                                   "path", "short"])
def test_load_malformed_file_list(art_copy, files):
    m = _manifest(art_copy)
    if files == "drop":
        del m["files"]
    elif files == "path":
        m["files"]["../teacher.safetensors"] = m["files"]["teacher.safetensors"]
    elif files == "short":
        m["files"]["report.json"] = "abc"
    else:
        m["files"] = files
    (art_copy / "artifact.json").write_text(json.dumps(m))
    _load_fails(art_copy, "malformed artifact.json", "'files'", "recompress it")


@pytest.mark.parametrize("name", ["teacher.safetensors", "student.safetensors", "report.json"])
def test_changed_file_is_refused_naming_it(art_copy, unet_dirs, name):
    """E.g. a teacher.safetensors swapped for another model's: refused at load (so at export)."""
    if name == "teacher.safetensors":
        shutil.copyfile(unet_dirs["c1_32_attn1_default"] / "diffusion_pytorch_model.safetensors", art_copy / name)
    else:
        with open(art_copy / name, "ab") as f:
            f.write(b" ")
    msg = _load_fails(art_copy, f"{art_copy / name} does not match the sha256 recorded in artifact.json",
                      "changed or replaced after compress", "recompress")
    assert "\n" not in msg


def test_recorded_report_missing_is_refused(art_copy):
    (art_copy / "report.json").unlink()
    _load_fails(art_copy, "is incomplete", "report.json is missing")


def _rerecord(path: Path) -> None:
    """Record the current hashes, as if compress had written these files (to reach the later checks)."""
    m = _manifest(path)
    m["files"] = {name: hashlib.sha256((path / name).read_bytes()).hexdigest() for name in m["files"]}
    (path / "artifact.json").write_text(json.dumps(m, sort_keys=True, indent=1))


@pytest.mark.parametrize("change", ["drop_layers", "extra_key", "bad_layer"])
def test_load_malformed_manifest(art_copy, change):
    m = _manifest(art_copy)
    if change == "drop_layers":
        del m["layers"]
    elif change == "extra_key":
        m["unknown_field"] = 1
    else:
        first = sorted(m["layers"])[0]
        del m["layers"][first]["weight_bits"]
    (art_copy / "artifact.json").write_text(json.dumps(m))
    _load_fails(art_copy, "malformed artifact.json")


@pytest.mark.parametrize("keep", [0.5, 0.99, 8, 0])
def test_load_truncated_student(art_copy, keep):
    f = art_copy / "student.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    _load_fails(art_copy, "student.safetensors does not match the sha256 recorded")
    _rerecord(art_copy)  # a damaged file whose hash was recorded: safetensors itself refuses it
    _load_fails(art_copy, "student.safetensors cannot be read", "the artifact is corrupt")


@pytest.mark.parametrize("name", ["student.safetensors", "teacher.safetensors"])
def test_load_missing_tensor_file(art_copy, name):
    (art_copy / name).unlink()
    _load_fails(art_copy, "is incomplete", f"{name} is missing")


def test_truncated_teacher_fails_when_built(art_copy):
    f = art_copy / "teacher.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    _load_fails(art_copy, "teacher.safetensors does not match the sha256 recorded")
    _rerecord(art_copy)
    art = load_artifact(art_copy)  # the teacher is only read on demand
    with pytest.raises(ArtifactError, match="cannot load the teacher weights"):
        art.build_teacher()


def _rewrite_student(path: Path, edit) -> None:
    from safetensors.torch import save_file

    tensors = _safetensors(path / "student.safetensors")
    edit(tensors)
    save_file(tensors, str(path / "student.safetensors"))
    _rerecord(path)


@pytest.mark.parametrize("key, value, fragment", [
    ("conv_in.weight_scale", -1.0, "conv_in.weight_scale has 1 scale(s) that are not finite and > 0 (first: -1.0)"),
    ("conv_in.weight_scale", 0.0, "conv_in.weight_scale has 1 scale(s) that are not finite and > 0 (first: 0.0)"),
    ("conv_in.weight_scale", float("nan"), "conv_in.weight_scale has 1 scale(s) that are not finite and > 0 (first: nan)"),
    ("conv_out.act_scale", -0.5, "conv_out.act_scale has 1 scale(s) that are not finite and > 0 (first: -0.5)"),
    ("conv_out.act_scale", float("inf"), "conv_out.act_scale has 1 scale(s) that are not finite and > 0 (first: inf)"),
    ("conv_in.bias", float("nan"), "holds NaN or Inf in 1 tensor(s) (first: conv_in.bias)"),
])
def test_bad_scales_and_values_are_refused_at_load(art_copy, key, value, fragment):
    def edit(t):
        t[key] = t[key].clone()
        t[key].view(-1)[0] = value

    _rewrite_student(art_copy, edit)
    msg = _load_fails(art_copy, fragment, "recompress it")
    assert "\n" not in msg


@pytest.mark.parametrize("code", [-128, 127, 100])
def test_out_of_range_codes_are_refused_at_load(art_copy, code):
    """8-bit codes lie in [-128, 127] (the narrow range uses [-127, 127]); 4-bit ones in [-8, 7]."""
    m = _manifest(art_copy)
    layer = sorted(m["layers"])[1]
    if code == 100:
        m["layers"][layer]["weight_bits"] = 4
        (art_copy / "artifact.json").write_text(json.dumps(m, sort_keys=True, indent=1))
    else:
        def edit(t):
            t[f"{layer}.weight_codes"] = t[f"{layer}.weight_codes"].clone()
            t[f"{layer}.weight_codes"].view(-1)[0] = code

        _rewrite_student(art_copy, edit)
    if code == 100:  # the 8-bit codes of the layer now claimed to hold 4 bits
        _load_fails(art_copy, f"{layer}.weight_codes lie in [", "outside the 4-bit range [-8, 7]")
    else:
        load_artifact(art_copy)  # inside the int8 container's range: accepted


def test_float_codes_are_refused_at_load(art_copy):
    _rewrite_student(art_copy, lambda t: t.__setitem__("conv_in.weight_codes", t["conv_in.weight_codes"].float()))
    _load_fails(art_copy, "conv_in.weight_codes must hold integers, got torch.float32")


def test_student_missing_codes(art_copy):
    _rewrite_student(art_copy, lambda t: t.pop("conv_in.weight_codes"))
    with pytest.raises(ArtifactError, match="lacks tensor conv_in.weight_codes; the artifact is incomplete"):
        load_artifact(art_copy).build_student()


def test_student_missing_plain_parameter(art_copy):
    _rewrite_student(art_copy, lambda t: t.pop("conv_in.bias"))
    with pytest.raises(ArtifactError, match=r"lacks 1 parameters \(first: conv_in.bias\)"):
        load_artifact(art_copy).build_student()


def test_student_unexpected_tensor(art_copy):
    _rewrite_student(art_copy, lambda t: t.__setitem__("stray.tensor", torch.zeros(1)))
    with pytest.raises(ArtifactError, match=r"unexpected tensors \(first: stray.tensor\)"):
        load_artifact(art_copy).build_student()


def test_student_codes_of_wrong_shape(art_copy):
    _rewrite_student(art_copy, lambda t: t.__setitem__("conv_in.weight_codes", torch.zeros(16, 1, 3, 2, dtype=torch.int8)))
    with pytest.raises(ArtifactError, match=r"conv_in codes have shape \(16, 1, 3, 2\)"):
        load_artifact(art_copy).build_student()


def test_layer_list_that_does_not_match_the_unet(art_copy):
    m = _manifest(art_copy)
    m["layers"]["no.such.layer"] = {"kind": "conv2d", "weight_bits": 8, "act_bits": 8, "weight_shape": [1]}
    (art_copy / "artifact.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="layer list does not match"):
        load_artifact(art_copy).build_student()


def test_unsupported_unet_class(art_copy):
    _edit_manifest(art_copy, unet_class="UNet3DConditionModel")
    art = load_artifact(art_copy)
    for build in (art.build_student, art.build_teacher):
        with pytest.raises(ArtifactError, match="holds a UNet3DConditionModel; pqcad-deploy artifacts hold a "
                                                "UNet2DModel or a UNet2DConditionModel"):
            build()


# ----------------------------------------------------------------------------- output paths
def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _no_tmp_leftovers(root: Path) -> None:
    leftovers = [p for p in root.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


def test_non_empty_output_without_overwrite(compressed, small_unet_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = _tree(tmp_path)
    with pytest.raises(OutputPathError, match="already exists and is not empty; pass --overwrite"):
        compress(_config(small_unet_dir, 8), out, progress=False)
    art = load_artifact(compressed[8][1].artifact)
    with pytest.raises(OutputPathError, match="already exists and is not empty"):
        save_artifact(out, art.manifest, art.student_tensors, {}, art.report)
    assert _tree(tmp_path) == before
    _no_tmp_leftovers(tmp_path)


def test_output_that_is_a_file(small_unet_dir, tmp_path):
    out = tmp_path / "out"
    out.write_text("x")
    with pytest.raises(OutputPathError, match="exists and is not a directory"):
        compress(_config(small_unet_dir, 8), out, progress=False)
    assert out.read_text() == "x"


def test_overwrite_replaces_the_directory(compressed, tmp_path):
    src = compressed[8][1].artifact
    art = load_artifact(src)
    teacher = _safetensors(src / "teacher.safetensors")
    out = Path(shutil.copytree(compressed[4][1].artifact, tmp_path / "out"))  # an artifact of ours: replaced
    save_artifact(out, art.manifest, art.student_tensors, teacher, art.report, overwrite=True)
    assert sorted(p.name for p in out.iterdir() if p.name != ".pqcad-deploy.json") == [
        "artifact.json", "report.json", "student.safetensors", "teacher.safetensors"]
    for name in ("artifact.json", "student.safetensors", "teacher.safetensors"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    _no_tmp_leftovers(tmp_path)


@pytest.mark.parametrize("below", ["art", "deeper/art"])
def test_unwritable_output_below_a_file(compressed, small_unet_dir, tmp_path, below):
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file")
    out = blocker / below
    with pytest.raises(OutputPathError, match="is not a writable directory"):
        compress(_config(small_unet_dir, 8), out, progress=False)
    art = load_artifact(compressed[8][1].artifact)
    with pytest.raises(OutputPathError):
        save_artifact(out, art.manifest, art.student_tensors, {}, art.report)
    assert _tree(tmp_path) == {"blocker": b"a regular file"}


def test_failure_while_writing_leaves_nothing(compressed, tmp_path):
    art = load_artifact(compressed[8][1].artifact)
    out = tmp_path / "out"
    with pytest.raises(Exception):
        save_artifact(out, art.manifest, {"bad": "not a tensor"}, {}, art.report)  # type: ignore[dict-item]
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_model_error_leaves_no_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ModelLoadError):
        compress(_config(tmp_path / "no_model", 8), out, progress=False)
    assert list(tmp_path.iterdir()) == []
