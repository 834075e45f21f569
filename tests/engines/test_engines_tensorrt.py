"""TensorRT paths: the pure parts everywhere, real builds only where TensorRT exists.

Pure functions (the trtexec line, the builder flags a TensorRT version allows, the refusal of a plan
built elsewhere, the layer-report summariser on layer JSON that TensorRT itself wrote, taken from
NVIDIA's repository: tests/engines/data/README.md) run on every machine. The CUDA helpers need
cuda-python and a GPU; builds and runs need TensorRT, which cannot be installed in this workplace:
those tests skip with the reason below.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

from pqcad_deploy.engines.cuda_runtime import GpuInfo
from pqcad_deploy.engines.errors import BackendUnavailableError, BuildError, EngineError, RunnerError
from pqcad_deploy.engines.manifest import EngineManifest, TensorRTBuildInfo, write_engine_manifest
from pqcad_deploy.engines.tensorrt_build import build_tensorrt_engine
from pqcad_deploy.engines.tensorrt_options import TensorRTBuildOptions, trtexec_command
from pqcad_deploy.engines.tensorrt_report import (
    datatype_of,
    read_layer_report,
    summarize_layer_information,
)
from pqcad_deploy.engines.tensorrt_runner import check_plan_built_here, recorded_build

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
TRT_SKIP = ("TensorRT cannot be installed in this workplace (registry packages are stubs that download from an "
            "unreachable host)")
DATA = Path(__file__).parent / "data"
MOBILENET_QAT = DATA / "trex_mobilenet.qat.onnx.engine.graph.json"  # trex tests/inputs, NVIDIA/TensorRT v11.0
RESNET_FP16 = DATA / "trex_resnet_A100_fp16.onnx.engine.graph.json"  # trex examples/pytorch/resnet/A100/fp16


def _tensorrt_or_skip():
    try:
        import tensorrt
    except Exception:  # ImportError, or a wheel whose libraries do not load
        pytest.skip(TRT_SKIP)
    return tensorrt


# ----------------------------------------------------------------------------- without TensorRT
@pytest.mark.skipif(HAS_TRT, reason="TensorRT is importable here; the missing-TensorRT message cannot be produced")
def test_build_without_tensorrt_says_what_to_do(make_tiny_onnx, tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailableError) as info:
        build_tensorrt_engine(make_tiny_onnx(), tmp_path / "engine")
    msg = str(info.value)
    assert msg.startswith("TensorRT is not installed on this machine: ")
    assert msg.endswith("use --backend onnxruntime, or build on a machine with TensorRT 10 (e.g. a Jetson with JetPack 6).")
    assert not (tmp_path / "engine").exists()


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is importable here")
def test_tensorrt_runner_without_tensorrt(make_tiny_onnx, make_manifest) -> None:
    from pqcad_deploy.engines.tensorrt_runner import TensorRTRunner

    runner = TensorRTRunner("model.plan", make_manifest())
    with pytest.raises(BackendUnavailableError, match=re.escape("TensorRT is not installed on this machine")):
        runner.activate()
    assert not runner.is_active


def test_bad_build_options_are_refused_before_anything_else(make_tiny_onnx, tmp_path: Path) -> None:
    with pytest.raises(BuildError) as info:
        build_tensorrt_engine(make_tiny_onnx(), tmp_path / "engine", opt_batch=8, max_batch=4)
    assert str(info.value) == "Batch sizes must satisfy 1 <= opt_batch <= max_batch, got opt_batch=8, max_batch=4."
    with pytest.raises(BuildError, match=re.escape("workspace_gb must be positive, got 0.")):
        TensorRTBuildOptions(workspace_gb=0)
    assert not (tmp_path / "engine").exists()


def _with_ort_target_nodes(tiny_model, make_manifest, path: Path, target: str) -> Path:
    """The tiny ONNX plus what export's ONNX Runtime targets write (unused side branches)."""
    import onnx
    from onnx import TensorProto, helper

    from pqcad_deploy.engines.manifest import write_onnx_manifest

    model = tiny_model()
    g = model.graph
    if target == "ort-x86":  # ConvInteger with uint8 weights and zero-point 128
        g.initializer.extend([helper.make_tensor("w", TensorProto.UINT8, [1, 3, 1, 1], [128, 129, 127]),
                              helper.make_tensor("wzp", TensorProto.UINT8, [], [128])])
        g.node.append(helper.make_node("ConvInteger", ["codes", "w", "", "wzp"], ["acc"], name="l/conv_integer"))
    elif target == "ort-qlinear":  # int32 bias codes dequantized per channel (QLinearConv's bias layout)
        g.initializer.extend([helper.make_tensor("b", TensorProto.INT32, [3], [1, -2, 3]),
                              helper.make_tensor("bs", TensorProto.FLOAT, [3], [0.1, 0.1, 0.1]),
                              helper.make_tensor("bzp", TensorProto.INT32, [3], [0, 0, 0])])
        g.node.append(helper.make_node("DequantizeLinear", ["b", "bs", "bzp"], ["bias"], name="l/bias_dequantize",
                                       axis=0))
    onnx.save(write_onnx_manifest(model, make_manifest(precision="w8a8")), str(path))
    return path


@pytest.mark.parametrize("target", ["ort-x86", "ort-qlinear"])
def test_build_refuses_an_onnx_exported_for_onnx_runtime(tiny_model, make_manifest, tmp_path: Path,
                                                         target: str) -> None:
    """Refused from the graph, before TensorRT is imported: the message names the target and the fix."""
    path = _with_ort_target_nodes(tiny_model, make_manifest, tmp_path / "ort.onnx", target)
    with pytest.raises(BuildError) as info:
        build_tensorrt_engine(path, tmp_path / "engine")
    msg = str(info.value)
    assert f"--target {target}" in msg and "export it again with --target tensorrt" in msg
    assert "converters' TensorRT check" not in msg
    assert not (tmp_path / "engine").exists()


# ----------------------------------------------------------------------------- trtexec line, builder flags
def test_trtexec_command_for_a_known_manifest(make_manifest) -> None:
    """Flag names as in NVIDIA/TensorRT samples/common/sampleOptions.cpp; shapes from image_shape [3, 8, 8]."""
    cmd = trtexec_command("exports/w8a8.onnx", "engines/w8a8", make_manifest(), TensorRTBuildOptions())
    assert cmd == ("trtexec --onnx=exports/w8a8.onnx --stronglyTyped "
                   "--minShapes=sample:1x3x8x8,timestep:1 --optShapes=sample:8x3x8x8,timestep:8 "
                   "--maxShapes=sample:32x3x8x8,timestep:32 --memPoolSize=workspace:2048M "
                   "--profilingVerbosity=detailed --saveEngine=engines/w8a8/model.plan "
                   "--exportLayerInfo=engines/w8a8/layers.json")


def test_trtexec_command_weakly_typed_and_quoted(make_manifest) -> None:
    options = TensorRTBuildOptions(strongly_typed=False, fp16=False, workspace_gb=0.5, opt_batch=2, max_batch=4)
    cmd = trtexec_command("my exports/a.onnx", "out", make_manifest(image_shape=(1, 28, 28)), options)
    assert cmd == ("trtexec '--onnx=my exports/a.onnx' --int8 "
                   "--minShapes=sample:1x1x28x28,timestep:1 --optShapes=sample:2x1x28x28,timestep:2 "
                   "--maxShapes=sample:4x1x28x28,timestep:4 --memPoolSize=workspace:512M "
                   "--profilingVerbosity=detailed --saveEngine=out/model.plan --exportLayerInfo=out/layers.json")
    odd = trtexec_command("a.onnx", "out", make_manifest(), TensorRTBuildOptions(workspace_gb=1e-6))
    assert "--memPoolSize=workspace:1073B " in odd  # not a whole number of MiB: bytes


def test_profile_shapes() -> None:
    assert TensorRTBuildOptions(opt_batch=2, max_batch=4).profile_shapes((3, 32, 32)) == {
        "sample": ((1, 3, 32, 32), (2, 3, 32, 32), (4, 3, 32, 32)), "timestep": ((1,), (2,), (4,))}


TRT10_FLAGS = ("FP16", "BF16", "INT8", "REFIT", "TF32", "STRIP_PLAN")
TRT11_FLAGS = ("REFIT", "TF32", "STRIP_PLAN")  # TensorRT 11 removed FP16, BF16, INT8, FP8, INT4, FP4 (migration guide)


def test_builder_flags_by_tensorrt_version() -> None:
    assert TensorRTBuildOptions().builder_flags(TRT11_FLAGS, "11.1.0") == ()  # strongly typed: no flags, any version
    assert TensorRTBuildOptions(strongly_typed=False).builder_flags(TRT10_FLAGS, "10.3.0") == ("INT8", "FP16")
    assert TensorRTBuildOptions(strongly_typed=False, fp16=False).builder_flags(TRT10_FLAGS, "10.3.0") == ("INT8",)
    with pytest.raises(BuildError) as info:
        TensorRTBuildOptions(strongly_typed=False).builder_flags(TRT11_FLAGS, "11.1.0")
    assert str(info.value) == (
        "strongly_typed=False needs TensorRT's weak-typing builder flags, and TensorRT 11.1.0 has no "
        "BuilderFlag.INT8 / FP16 (TensorRT 11 removed weak typing); build strongly typed (the default), which "
        "takes INT8 from the ONNX's Q/DQ nodes.")


# ----------------------------------------------------------------------------- a plan built elsewhere
ORIN = TensorRTBuildInfo(tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8.7",
                         trtexec_command="trtexec --onnx=a.onnx")


def test_plan_built_here_passes() -> None:
    check_plan_built_here("e/model.plan", ORIN, "10.3.0", GpuInfo("Orin", "8.7"))


@pytest.mark.parametrize(("version", "gpu"), [("10.7.0", GpuInfo("Orin", "8.7")),
                                              ("10.3.0", GpuInfo("NVIDIA H200", "9.0")),
                                              ("10.3.0", GpuInfo("Orin", "8.9"))])
def test_plan_built_elsewhere_is_refused_in_one_line(version: str, gpu: GpuInfo) -> None:
    with pytest.raises(RunnerError) as info:
        check_plan_built_here("e/model.plan", ORIN, version, gpu)
    assert str(info.value) == (
        f"e/model.plan was built with TensorRT 10.3.0 on Orin (compute capability 8.7), but this machine has "
        f"TensorRT {version} on {gpu.name} (compute capability {gpu.compute_capability}); a TensorRT plan runs only "
        "with the TensorRT version and GPU that built it: rebuild the engine here with pqcad-deploy build-engine "
        "--backend tensorrt.")


def test_recorded_build_reads_the_engine_json_next_to_the_plan(tmp_path: Path, make_manifest) -> None:
    assert recorded_build(tmp_path / "model.plan") is None  # no engine.json
    (tmp_path / "model.plan").write_bytes(b"plan bytes")
    write_engine_manifest(tmp_path, EngineManifest(backend="tensorrt", model_file="model.plan", model_sha256="ab" * 32,
                                                   source_onnx_sha256="cd" * 32, onnx=make_manifest(), tensorrt=ORIN))
    assert recorded_build(tmp_path / "model.plan") == ORIN


# ----------------------------------------------------------------------------- the layer report
def test_layer_report_of_nvidia_qat_mobilenet() -> None:
    """trt-engine-explorer's own test input: its tests pin 72 layers (test_engine_plan.py, NoOps folded) and
    layer 0 = QuantizeLinear_2, a Reformat whose precision is FP32 (test_layer.py)."""
    report = read_layer_report(MOBILENET_QAT)
    assert len(report.layers) == 72
    first = report.layers[0]
    assert (first.name, first.type, first.precision) == ("QuantizeLinear_2", "Reformat", "FP32")
    assert report.counts == {"INT8": 53, "FP16": 15, "FP32": 4}
    assert report.compute_not_int8 == ()  # every convolution reads INT8; what is not INT8 is reformats, the pool
    assert {layer.type for layer in report.not_int8} == {"Reformat", "Pooling"} and len(report.not_int8) == 19
    assert report.lines() == ["TensorRT layers by input precision: INT8 53, FP16 15, FP32 4 (72 layers)",
                              "convolution / matrix-multiply layers not in INT8: 0 of 53"]


def test_layer_report_of_nvidia_fp16_resnet_lists_its_float_convolutions() -> None:
    report = read_layer_report(RESNET_FP16)
    assert report.counts == {"FP16": 24, "FP32": 1}
    assert len(report.compute_not_int8) == 21 and {layer.precision for layer in report.compute_not_int8} == {"FP16"}
    assert report.lines(limit=2) == ["TensorRT layers by input precision: FP16 24, FP32 1 (25 layers)",
                                     "convolution / matrix-multiply layers not in INT8: 21 of 21",
                                     "  Conv_0 + Relu_1 (FP16)", "  Conv_3 + Relu_4 (FP16)", "  ... and 19 more"]


@pytest.mark.parametrize(("tensor", "precision"), [
    ({"Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}, "INT8"),
    ({"Format/Datatype": "Row major linear FP32"}, "FP32"),
    ({"Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}, "FP16"),
    ({"Format/Datatype": "Channel major BFloat16 format where channel % 8 == 0"}, "BF16"),
    ({"Format/Datatype": "Row major linear FP8 format"}, "FP8"),
    ({"Format/Datatype": "Unknown format"}, "unknown"),
    # TensorRT 11's split fields (migration guide's I/O tensor example: "DataType": "Float")
    ({"DataType": "Float", "Format": "Row major linear FP32 format (kLINEAR)"}, "FP32"),
    ({"DataType": "Half", "Format": "Channel major FP16 format where channel % 8 == 0"}, "FP16"),
])
def test_datatype_of_inspector_tensor_entries(tensor: dict, precision: str) -> None:
    assert datatype_of(tensor) == precision


def test_layer_report_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="the engine was built without detailed profiling verbosity"):
        summarize_layer_information({"Layers": ["QuantizeLinear_2", "Conv_12"]})
    with pytest.raises(EngineError, match=re.escape('is not TensorRT engine-inspector JSON (no "Layers" list)')):
        summarize_layer_information([1, 2])
    bad = tmp_path / "layers.json"
    bad.write_text("{not json")
    with pytest.raises(EngineError, match=re.escape(f"{bad} is not valid JSON")):
        read_layer_report(bad)


# ----------------------------------------------------------------------------- CUDA helpers (a GPU)
def _cudart_or_skip():
    from pqcad_deploy.engines.cuda_runtime import import_cudart

    try:
        cudart = import_cudart()
    except BackendUnavailableError:
        pytest.skip("needs cuda-python (cuda.bindings.runtime), which is not installed here")
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count < 1:
        pytest.skip("needs a CUDA GPU, which this machine lacks")
    return cudart


def test_current_gpu_names_the_device() -> None:
    from pqcad_deploy.engines.cuda_runtime import current_gpu

    cudart = _cudart_or_skip()
    gpu = current_gpu(cudart)
    prop = cudart.cudaGetDeviceProperties(0)[1]
    assert re.fullmatch(r"[0-9]+\.[0-9]+", gpu.compute_capability) and gpu.name and "\0" not in gpu.name
    assert gpu.compute_capability == f"{prop.major}.{prop.minor}"


def test_pinned_round_trip_through_the_gpu() -> None:
    """What the runner does per call: pinned host -> device -> pinned host, async on one stream."""
    from pqcad_deploy.engines.cuda_runtime import DeviceBuffer, PinnedHostBuffer, cuda_call

    cudart = _cudart_or_skip()
    x = np.random.default_rng(0).standard_normal(3 * 8 * 8 * 5).astype(np.float32)
    stream = cuda_call(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate()")
    src, dst = PinnedHostBuffer(cudart, x.size, np.float32), PinnedHostBuffer(cudart, x.size, np.float32)
    dev = DeviceBuffer(cudart, x.nbytes)
    try:
        src.array[:] = x
        kinds = cudart.cudaMemcpyKind
        cuda_call(cudart, cudart.cudaMemcpyAsync(dev.ptr, src.ptr, x.nbytes, kinds.cudaMemcpyHostToDevice, stream), "h2d")
        cuda_call(cudart, cudart.cudaMemcpyAsync(dst.ptr, dev.ptr, x.nbytes, kinds.cudaMemcpyDeviceToHost, stream), "d2h")
        cuda_call(cudart, cudart.cudaStreamSynchronize(stream), "sync")
        np.testing.assert_array_equal(dst.array, x)
        kind = cudart.cudaPointerGetAttributes(src.ptr)[1].type
        assert kind == cudart.cudaMemoryType.cudaMemoryTypeHost  # page-locked, not pageable
    finally:
        for buffer in (src, dst, dev):
            buffer.free()
        cudart.cudaStreamDestroy(stream)
    assert src.ptr == 0 and src.array is None
    with pytest.raises(RunnerError, match=r"CUDA call cudaMalloc\(\d+\) failed with cudaErrorMemoryAllocation"):
        DeviceBuffer(cudart, 1 << 60)  # 1 EiB


# ----------------------------------------------------------------------------- with TensorRT
@pytest.mark.tensorrt
def test_tensorrt_build_and_run(make_tiny_onnx, tmp_path: Path, tiny_reference) -> None:
    trt = _tensorrt_or_skip()
    from pqcad_deploy.engines.cuda_runtime import current_gpu, import_cudart
    from pqcad_deploy.engines.manifest import verify_engine
    from pqcad_deploy.engines.tensorrt_runner import TensorRTRunner

    onnx_path = make_tiny_onnx()
    m = build_tensorrt_engine(onnx_path, tmp_path / "engine", max_batch=4, opt_batch=2)
    assert verify_engine(tmp_path / "engine") == m and m.model_file == "model.plan" and m.backend == "tensorrt"
    gpu = current_gpu(import_cudart())
    assert (m.tensorrt.tensorrt_version, m.tensorrt.gpu_name, m.tensorrt.compute_capability) == (
        trt.__version__, gpu.name, gpu.compute_capability)
    assert m.tensorrt.trtexec_command == trtexec_command(
        onnx_path, tmp_path / "engine", m.onnx, TensorRTBuildOptions(opt_batch=2, max_batch=4))
    report = read_layer_report(tmp_path / "engine" / "layers.json")
    assert report.layers and sum(report.counts.values()) == len(report.layers)
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8), dtype=np.float32)
    t = np.array([900, 500, 0], np.float32)
    with TensorRTRunner(tmp_path / "engine" / m.model_file, m.onnx) as runner:
        out = runner.infer({"sample": x, "timestep": t})["noise_pred"]
        again = runner.infer({"sample": x[:1], "timestep": t[:1]})["noise_pred"]
    np.testing.assert_allclose(out, tiny_reference(x, t), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(again, out[:1], rtol=0, atol=0)  # a fresh array per call, same numbers
    with pytest.raises(RunnerError, match="Batch 5 exceeds the engine's maximum batch 4"):
        with TensorRTRunner(tmp_path / "engine" / m.model_file, m.onnx) as runner:
            runner.infer({"sample": np.zeros((5, 3, 8, 8), np.float32), "timestep": np.zeros(5, np.float32)})


@pytest.mark.tensorrt
def test_runner_refuses_a_plan_recorded_as_built_elsewhere_before_loading_it(make_tiny_onnx, tmp_path: Path) -> None:
    _tensorrt_or_skip()
    from pqcad_deploy.engines.tensorrt_runner import TensorRTRunner

    m = build_tensorrt_engine(make_tiny_onnx(), tmp_path / "engine", max_batch=2, opt_batch=1)
    data = json.loads((tmp_path / "engine" / "engine.json").read_text())
    data["tensorrt"]["tensorrt_version"] = "9.9.9"
    (tmp_path / "engine" / "engine.json").write_text(json.dumps(data))
    (tmp_path / "engine" / "model.plan").write_bytes(b"not a plan")  # TensorRT would fail on it: we must not get there
    with pytest.raises(RunnerError, match=r"model.plan was built with TensorRT 9\.9\.9 on .*rebuild the engine here"):
        TensorRTRunner(tmp_path / "engine" / "model.plan", m.onnx).activate()


@pytest.mark.tensorrt
def test_weakly_typed_build_follows_the_tensorrt_version(make_tiny_onnx, tmp_path: Path) -> None:
    trt = _tensorrt_or_skip()
    if "INT8" in trt.BuilderFlag.__members__:  # TensorRT 10
        m = build_tensorrt_engine(make_tiny_onnx(), tmp_path / "engine", strongly_typed=False, max_batch=2, opt_batch=1)
        assert "--int8 --fp16" in m.tensorrt.trtexec_command
    else:  # TensorRT 11
        with pytest.raises(BuildError, match="TensorRT 11 removed weak typing"):
            build_tensorrt_engine(make_tiny_onnx(), tmp_path / "engine", strongly_typed=False)
        assert not (tmp_path / "engine").exists()
