"""build-engine --provider cpu|cuda|tensorrt: ONNX Runtime's execution providers, recorded in engine.json.

The CPU provider runs everywhere. CUDA and TensorRT need onnxruntime-gpu and an NVIDIA GPU: their real
runs skip with the reason where the provider is absent (this project's machines have the CPU onnxruntime
wheel), and there the refusal is pinned instead: one sentence at build and at sample, never a silent
fall-back to the CPU.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from pqcad_deploy.engines.backends import build_engine
from pqcad_deploy.engines.build import TRT_PROVIDER_CACHE_DIR, build_onnxruntime_engine, tensorrt_provider_options
from pqcad_deploy.engines.errors import BackendUnavailableError, BuildError, ManifestError
from pqcad_deploy.engines.generate import open_runner
from pqcad_deploy.engines.manifest import (
    EngineManifest,
    read_onnx_manifest,
    sha256_file,
    verify_engine,
    write_engine_manifest,
)
from pqcad_deploy.engines.ort_session import (
    ORT_PROVIDER_NAMES,
    TensorRTProviderOptions,
    check_session_provider,
    execution_providers,
    ort_session,
)

AVAILABLE = list(ort.get_available_providers())
GPU_PROVIDERS = ("cuda", "tensorrt")


def _absent_message(provider: str) -> str:
    return (f"ONNX Runtime's {ORT_PROVIDER_NAMES[provider]} (--provider {provider}) is not available here: "
            f"onnxruntime {ort.__version__} offers {', '.join(AVAILABLE)}; install onnxruntime-gpu in place of "
            "onnxruntime (pip uninstall -y onnxruntime onnxruntime-gpu, then pip install onnxruntime-gpu; "
            "docs/JETSON.md for a Jetson), or build with --provider cpu.")


def _skip_if_present(provider: str) -> None:
    if ORT_PROVIDER_NAMES[provider] in AVAILABLE:
        pytest.skip(f"onnxruntime {ort.__version__} offers {ORT_PROVIDER_NAMES[provider]}: the absent-provider "
                    "refusal cannot be produced here")


def _require(provider: str, model: Path) -> None:
    """Skip unless a session on ``provider`` really starts (listed is not enough: module doc of ort_session)."""
    if ORT_PROVIDER_NAMES[provider] not in AVAILABLE:
        pytest.skip(f"onnxruntime {ort.__version__} lacks {ORT_PROVIDER_NAMES[provider]} (it offers "
                    f"{', '.join(AVAILABLE)}); runs where onnxruntime-gpu and an NVIDIA GPU are")
    try:
        ort_session(model, provider=provider)
    except BackendUnavailableError as exc:
        pytest.skip(f"{ORT_PROVIDER_NAMES[provider]} is listed but does not start here: {exc}")


def _run_cli(*args: object) -> tuple[int, str, str]:
    """pqcad-deploy's console entry point in-process: (exit code, stdout, stderr)."""
    from pqcad_deploy.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def _one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0][len("error: "):]


def _gpu_engine_as_built(onnx_path: Path, engine_dir: Path, provider: str) -> EngineManifest:
    """What build-engine --provider cuda|tensorrt writes, written here where the provider is absent:
    the exported ONNX as model.onnx and engine.json naming the provider (build.py's module doc)."""
    engine_dir.mkdir()
    shutil.copyfile(onnx_path, engine_dir / "model.onnx")
    if provider == "tensorrt":
        (engine_dir / TRT_PROVIDER_CACHE_DIR).mkdir()
    m = EngineManifest(backend="onnxruntime", model_file="model.onnx", model_sha256=sha256_file(onnx_path),
                       source_onnx_sha256=sha256_file(onnx_path), onnx=read_onnx_manifest(onnx_path),
                       ort_provider=provider)
    write_engine_manifest(engine_dir, m)
    return m


# --------------------------------------------------------------------------------------------- cpu
def test_cpu_engine_records_its_provider_and_samples_on_it(make_tiny_onnx, tmp_path: Path, tiny_reference) -> None:
    m = build_onnxruntime_engine(make_tiny_onnx(), tmp_path / "engine")
    assert m.ort_provider == "cpu"
    assert json.loads((tmp_path / "engine" / "engine.json").read_text())["ort_provider"] == "cpu"
    assert verify_engine(tmp_path / "engine") == m
    runner, _ = open_runner(tmp_path / "engine", threads=1)
    assert runner.provider == "cpu" and runner.tensorrt_options is None
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8), dtype=np.float32)
    t = np.array([900, 0], np.float32)
    with runner:
        np.testing.assert_allclose(runner.infer({"sample": x, "timestep": t})["noise_pred"], tiny_reference(x, t),
                                   rtol=1e-6, atol=1e-6)


def test_engine_json_without_ort_provider_is_a_cpu_engine(make_tiny_onnx, tmp_path: Path) -> None:
    """engine.json written before --provider existed has no ort_provider: it was built for the CPU."""
    m = build_onnxruntime_engine(make_tiny_onnx(), tmp_path / "engine")
    path = tmp_path / "engine" / "engine.json"
    data = json.loads(path.read_text())
    del data["ort_provider"]
    path.write_text(json.dumps(data))
    assert verify_engine(tmp_path / "engine") == m and verify_engine(tmp_path / "engine").ort_provider == "cpu"
    runner, _ = open_runner(tmp_path / "engine")
    assert runner.provider == "cpu"


def test_ort_provider_is_checked(make_tiny_onnx, tmp_path: Path, make_manifest) -> None:
    build_onnxruntime_engine(make_tiny_onnx(), tmp_path / "engine")
    path = tmp_path / "engine" / "engine.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "ort_provider": "rocm"}))
    with pytest.raises(ManifestError, match=re.escape(
            f"{path}: Manifest field ort_provider='rocm' is not one of cpu, cuda, tensorrt.")):
        verify_engine(tmp_path / "engine")
    with pytest.raises(ManifestError, match=re.escape(
            "Engine manifest field ort_provider='cpu' belongs to backend onnxruntime, not 'tensorrt'; "
            "rebuild the engine.")):
        EngineManifest(backend="tensorrt", model_file="model.plan", model_sha256="ab" * 32,
                       source_onnx_sha256="cd" * 32, onnx=make_manifest(), ort_provider="cpu")


def test_build_arguments_are_checked(make_tiny_onnx, tmp_path: Path) -> None:
    onnx_path = make_tiny_onnx()
    with pytest.raises(BuildError, match=re.escape("provider='rocm' is not one of cpu, cuda, tensorrt.")):
        build_onnxruntime_engine(onnx_path, tmp_path / "e", provider="rocm")
    with pytest.raises(BuildError, match=re.escape(
            "optimization_level='basic' applies to provider 'cpu' only: a cuda engine stores the exported graph, "
            "which ONNX Runtime optimizes for its provider when sample loads it; leave the level out.")):
        build_onnxruntime_engine(onnx_path, tmp_path / "e", provider="cuda", optimization_level="basic")
    for name, kwargs in (("provider", {"provider": "cpu"}), ("optimization_level", {"optimization_level": "basic"})):
        value = next(iter(kwargs.values()))
        with pytest.raises(BuildError, match=re.escape(
                f"{name}={value!r} is a setting of backend onnxruntime; backend tensorrt takes none (TensorRT "
                "optimizes the whole graph itself): leave it out.")):
            build_engine("tensorrt", onnx_path, tmp_path / "e", **kwargs)
    assert not (tmp_path / "e").exists()


def test_cli_flag_combinations_are_usage_errors(make_tiny_onnx, tmp_path: Path) -> None:
    onnx_path = make_tiny_onnx()
    code, _, err = _run_cli("build-engine", onnx_path, "-o", tmp_path / "e", "--backend", "tensorrt",
                            "--provider", "cuda")
    assert code == 2 and _one_error_line(err) == (
        "Invalid value for --provider: applies to --backend onnxruntime only (TensorRT optimizes the whole graph "
        "itself); leave it out.")
    code, _, err = _run_cli("build-engine", onnx_path, "-o", tmp_path / "e", "--provider", "tensorrt",
                            "--optimization-level", "basic")
    assert code == 2 and _one_error_line(err) == (
        "Invalid value for --optimization-level: applies to --provider cpu only (a tensorrt engine holds the "
        "exported graph, optimized by ONNX Runtime for its provider when sample loads it); leave it out.")
    assert not (tmp_path / "e").exists()


def test_cli_builds_a_cpu_engine_with_explicit_provider(make_tiny_onnx, tmp_path: Path) -> None:
    code, out, err = _run_cli("build-engine", make_tiny_onnx(), "-o", tmp_path / "e", "--provider", "cpu",
                              "--optimization-level", "basic")
    assert (code, err) == (0, "") and out.startswith(f"wrote {tmp_path / 'e'} (onnxruntime, fp32, 4 sampling steps")
    assert verify_engine(tmp_path / "e").ort_provider == "cpu"


# ------------------------------------------------------------------------------- absent providers
@pytest.mark.parametrize("provider", GPU_PROVIDERS)
def test_absent_provider_is_one_error_at_build(provider: str, make_tiny_onnx, tmp_path: Path) -> None:
    _skip_if_present(provider)
    onnx_path = make_tiny_onnx()
    with pytest.raises(BackendUnavailableError) as info:
        build_onnxruntime_engine(onnx_path, tmp_path / "engine", provider=provider)
    assert str(info.value) == _absent_message(provider)
    code, out, err = _run_cli("build-engine", onnx_path, "-o", tmp_path / "engine", "--provider", provider)
    assert (code, out) == (1, "") and _one_error_line(err) == _absent_message(provider)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]  # nothing staged, nothing left


@pytest.mark.parametrize("provider", GPU_PROVIDERS)
def test_absent_provider_is_one_error_at_sample(provider: str, make_tiny_onnx, tmp_path: Path) -> None:
    """An engine built on a GPU machine, sampled where its provider is absent: refused, not run on the CPU."""
    _skip_if_present(provider)
    engine = tmp_path / "engine"
    _gpu_engine_as_built(make_tiny_onnx(), engine, provider)
    assert verify_engine(engine).ort_provider == provider
    runner, _ = open_runner(engine)
    assert runner.provider == provider
    if provider == "tensorrt":
        assert runner.tensorrt_options == TensorRTProviderOptions(int8=False, fp16=False,
                                                                  engine_cache_dir=str(engine / "trt_cache"))
    with pytest.raises(BackendUnavailableError) as info:
        runner.activate()
    assert str(info.value) == _absent_message(provider) and not runner.is_active
    code, out, err = _run_cli("sample", engine, "-n", "2", "-o", tmp_path / "images", "--quiet")
    assert (code, out) == (1, "") and _one_error_line(err) == _absent_message(provider)
    assert not (tmp_path / "images").exists()
    assert not list((tmp_path / "images.partial").glob("*.png"))  # no image was made on the CPU instead


def test_session_that_fell_back_to_the_cpu_is_refused(make_tiny_onnx) -> None:
    """onnxruntime-gpu without its CUDA libraries lists CUDA but the session registers the CPU alone;
    the CPU wheel does the same when asked for CUDA, which makes that situation real here."""
    _skip_if_present("cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ONNX Runtime's own "not in available provider names"
        session = ort.InferenceSession(str(make_tiny_onnx()), providers=execution_providers("cuda"))
    assert session.get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(BackendUnavailableError) as info:
        check_session_provider(session, "cuda")
    assert str(info.value) == (
        "ONNX Runtime could not start its CUDAExecutionProvider (--provider cuda) and fell back to "
        "CPUExecutionProvider: the CUDA 12 and cuDNN 9 libraries it loads are missing or of another version "
        "(ONNX Runtime's log above names the one); install them or build with --provider cpu.")
    check_session_provider(session, "cpu")  # what it does run on passes


# ------------------------------------------------------------------------------ provider options
def test_provider_lists_and_tensorrt_options(make_manifest, tmp_path: Path) -> None:
    assert execution_providers("cpu") == ["CPUExecutionProvider"]
    assert execution_providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    quantized = tensorrt_provider_options(make_manifest(precision="w8a8"), tmp_path)
    assert quantized == TensorRTProviderOptions(int8=True, fp16=False, engine_cache_dir=str(tmp_path / "trt_cache"))
    assert execution_providers("tensorrt", quantized) == [
        ("TensorrtExecutionProvider", {"trt_int8_enable": True, "trt_fp16_enable": False,
                                       "trt_engine_cache_enable": True,
                                       "trt_engine_cache_path": str(tmp_path / "trt_cache")}),
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert tensorrt_provider_options(make_manifest(), tmp_path).int8 is False  # fp32: no Q/DQ, no INT8
    assert TensorRTProviderOptions(int8=False).as_provider_options() == {"trt_int8_enable": False,
                                                                         "trt_fp16_enable": False}
    with pytest.raises(ValueError, match="tensorrt_options are for provider='tensorrt', got provider='cuda'"):
        ort_session(b"", provider="cuda", tensorrt_options=quantized)


# ------------------------------------------------------------------------ real GPU providers
@pytest.mark.gpu
@pytest.mark.parametrize("provider", GPU_PROVIDERS)
def test_gpu_provider_engine_builds_and_samples(provider: str, make_tiny_onnx, tmp_path: Path, tiny_reference) -> None:
    onnx_path = make_tiny_onnx()
    _require(provider, onnx_path)
    engine = tmp_path / "engine"
    m = build_onnxruntime_engine(onnx_path, engine, provider=provider)
    assert m.ort_provider == provider and verify_engine(engine) == m
    assert m.model_sha256 == m.source_onnx_sha256  # the exported graph, unoptimized (build.py's module doc)
    if provider == "tensorrt":
        assert any((engine / "trt_cache").iterdir()), "the build's smoke test fills the TensorRT provider's cache"
    runner, _ = open_runner(engine)
    x = np.random.default_rng(0).standard_normal((8, 3, 8, 8), dtype=np.float32)
    t = np.linspace(999, 0, 8).astype(np.float32)
    with runner:
        assert runner._session.get_providers()[0] == ORT_PROVIDER_NAMES[provider]
        out = runner.infer({"sample": x, "timestep": t})["noise_pred"]
    np.testing.assert_allclose(out, tiny_reference(x, t), rtol=1e-5, atol=1e-5)
    code, _, err = _run_cli("sample", engine, "-n", "3", "-o", tmp_path / "images", "--quiet")
    assert (code, err) == (0, "") and len(list((tmp_path / "images").glob("0000*.png"))) == 3
