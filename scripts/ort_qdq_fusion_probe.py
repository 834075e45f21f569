"""Which Q/DQ patterns does ONNX Runtime's CPU provider turn into integer kernels, and how fast are they?

Part 1 builds one-operator graphs (Q -> DQ -> Conv/MatMul <- DQ(weight), with or without a Q -> DQ on
the output) with int8 or uint8 activations and per-channel or per-tensor weight scales, optimizes
each at ORT_ENABLE_EXTENDED and prints the op types left (a Markdown table).
Part 2 times one 3x3 convolution ([batch, 128, 16, 16] -> 128 channels, single thread) as a float
Conv, as ConvInteger with each pair of operand types (checking the int32 result is exact), and as
QLinearConv (which requantizes its output: not exact, shown as the ceiling).

    OMP_NUM_THREADS=1 python -m scripts.ort_qdq_fusion_probe
"""

from __future__ import annotations

import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _session(model, optimized_path: str | None = None):
    from pqcad_deploy.engines.ort_session import ort_session

    return ort_session(model.SerializeToString(), optimization_level="extended", threads=1, inter_op_threads=1,
                       optimized_model_path=optimized_path or None)


def _model(nodes, inputs, outputs, inits):
    from onnx import helper

    graph = helper.make_graph(nodes, "probe", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def fusion_case(op: str, act: str, out_q: bool, per_channel: bool, rank: int, bias_add: bool):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    zero = np.array(0 if act == "int8" else 128, dtype=np.int8 if act == "int8" else np.uint8)
    m, c = 16, 8
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "sx"), numpy_helper.from_array(zero, "zx")]
    if op == "Conv":
        w, axis, xshape = rng.integers(-127, 128, (m, c, 3, 3)).astype(np.int8), 0, [None, c, 8, 8]
    else:
        w, axis = rng.integers(-127, 128, (c, m)).astype(np.int8), 1
        xshape = [None, c] if rank == 2 else [None, 5, c]
    sw = np.full(m, 0.01, np.float32) if per_channel else np.array(0.01, np.float32)
    zw = np.zeros(m, np.int8) if per_channel else np.array(0, np.int8)
    inits += [numpy_helper.from_array(w, "w"), numpy_helper.from_array(sw, "sw"), numpy_helper.from_array(zw, "zw")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=axis)]
    if op == "Conv":
        nodes.append(helper.make_node("Conv", ["xd", "wd"], ["y0"], pads=[1, 1, 1, 1]))
    else:
        nodes.append(helper.make_node("MatMul", ["xd", "wd"], ["y0"]))
    if bias_add:
        inits.append(numpy_helper.from_array(np.zeros(m, np.float32), "b"))
        nodes.append(helper.make_node("Add", ["y0", "b"], ["y1"]))
    last = nodes[-1].output[0]
    if out_q:
        inits.append(numpy_helper.from_array(np.array(0.1, np.float32), "sy"))
        nodes += [helper.make_node("QuantizeLinear", [last, "sy", "zx"], ["yq"]),
                  helper.make_node("DequantizeLinear", ["yq", "sy", "zx"], ["y"])]
    else:
        nodes.append(helper.make_node("Identity", [last], ["y"]))
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, xshape)],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)


def fusion_table() -> list[str]:
    import onnx

    cases = [("Conv", a, q, pc, 4, False) for q in (False, True) for a in ("int8", "uint8") for pc in (True,)]
    cases += [("Conv", "uint8", True, False, 4, False)]
    cases += [("MatMul", a, False, True, 3, False) for a in ("int8", "uint8")]
    cases += [("MatMul", a, False, pc, 2, True) for a in ("int8", "uint8") for pc in (True, False)]
    cases += [("MatMul", a, True, True, 3, False) for a in ("int8", "uint8")]
    lines = ["| op | activations | Q after the op | weight scale | input rank | optimized graph |",
             "| --- | --- | --- | --- | --- | --- |"]
    with tempfile.TemporaryDirectory() as tmp:
        for op, act, out_q, pc, rank, bias in cases:
            path = str(Path(tmp) / "opt.onnx")
            _session(fusion_case(op, act, out_q, pc, rank, bias), path)
            ops = collections.Counter(n.op_type for n in onnx.load(path).graph.node if n.op_type != "Identity")
            lines.append(f"| {op}{' + bias Add' if bias else ''} | {act} zp {0 if act == 'int8' else 128} | "
                         f"{'yes' if out_q else 'no'} | {'per-channel' if pc else 'per-tensor'} | {rank} | "
                         + ", ".join(f"{k} {v}" for k, v in sorted(ops.items())) + " |")
    return lines


def _time(session, feed, runs: int = 30) -> float:
    session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def conv_timings(batch: int = 8) -> list[str]:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    c, m, hw, sx = 128, 128, 16, 0.02
    x = rng.standard_normal((batch, c, hw, hw)).astype(np.float32)
    codes = rng.integers(-127, 128, (m, c, 3, 3)).astype(np.int8)
    xin = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, c, hw, hw])]
    xq = np.clip(np.round(x / sx), -128, 127).astype(np.int64)
    # exact int64 reference of sum(x_code * w_code) via im2col
    pad = np.pad(xq, ((0, 0), (0, 0), (1, 1), (1, 1)))
    cols = np.stack([pad[:, :, i:i + hw, j:j + hw] for i in range(3) for j in range(3)], axis=2)  # b,c,9,h,w
    ref = np.einsum("bckhw,mck->bmhw", cols, codes.reshape(m, c, 9).astype(np.int64))
    lines = [f"| kernel ([{batch}, {c}, {hw}, {hw}], 3x3, {m} out) | activation | weight | median ms | exact |",
             "| --- | --- | --- | --- | --- |"]
    float_conv = _model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], xin,
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                        [numpy_helper.from_array(codes.astype(np.float32) * 0.001, "w")])
    lines.append(f"| Conv (float) | float32 | float32 | {_time(_session(float_conv), {'x': x}):.2f} | - |")
    for act in ("int8", "uint8"):
        for wt in ("uint8", "int8"):
            zx = np.array(0 if act == "int8" else 128, dtype=np.int8 if act == "int8" else np.uint8)
            w = codes if wt == "int8" else (codes.astype(np.int16) + 128).astype(np.uint8)
            zw = np.array(0 if wt == "int8" else 128, dtype=np.int8 if wt == "int8" else np.uint8)
            model = _model([helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
                            helper.make_node("ConvInteger", ["xq", "w", "zx", "zw"], ["y"], pads=[1, 1, 1, 1])],
                           xin, [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
                           [numpy_helper.from_array(np.array(sx, np.float32), "sx"), numpy_helper.from_array(zx, "zx"),
                            numpy_helper.from_array(w, "w"), numpy_helper.from_array(zw, "zw")])
            session = _session(model)
            exact = bool(np.array_equal(session.run(None, {"x": x})[0], ref))
            lines.append(f"| ConvInteger | {act} zp {int(zx)} | {wt} zp {int(zw)} | "
                         f"{_time(session, {'x': x}):.2f} | {exact} |")
    qconv = _model([helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
                    helper.make_node("QLinearConv", ["xq", "sx", "zx", "w", "sw", "zw", "sy", "zx"], ["yq"],
                                     pads=[1, 1, 1, 1]),
                    helper.make_node("DequantizeLinear", ["yq", "sy", "zx"], ["y"])], xin,
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                   [numpy_helper.from_array(np.array(sx, np.float32), "sx"),
                    numpy_helper.from_array(np.array(128, np.uint8), "zx"), numpy_helper.from_array(codes, "w"),
                    numpy_helper.from_array(np.full(m, 0.001, np.float32), "sw"),
                    numpy_helper.from_array(np.zeros(m, np.int8), "zw"),
                    numpy_helper.from_array(np.array(0.1, np.float32), "sy")])
    lines.append(f"| QLinearConv (8-bit output: requantizes) | uint8 zp 128 | int8 zp 0 | "
                 f"{_time(_session(qconv), {'x': x}):.2f} | no (output rounded to 8 bits) |")
    return lines


def main() -> int:
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}, CPU provider, ORT_ENABLE_EXTENDED, 1 thread\n")
    print("\n".join(fusion_table()))
    print()
    print("\n".join(conv_timings()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
