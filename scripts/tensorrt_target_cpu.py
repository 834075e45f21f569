"""The numbers of RESULTS' TensorRT-target section (issue 16): for each artifact given, the ONNX sizes (FP32,
FP16, --target tensorrt at opset 19 and 21), the checker's findings, parity against the PyTorch student,
the Convs with INT8 Q/DQ on both inputs against the layers the precision policy quantizes, and the Adds
TensorRT can fuse against those reading a quantized Conv. CPU, ONNX Runtime.

    python -m scripts.tensorrt_target_cpu --out /tmp/trt_rows NAME=ARTIFACT [NAME=ARTIFACT ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _placement(path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path))
    producers = {o: n for n in model.graph.node for o in n.output}

    def from_dq(name: str) -> bool:
        return name in producers and producers[name].op_type == "DequantizeLinear"

    def quantized_conv(name: str) -> bool:
        node = producers.get(name)
        return node is not None and node.op_type == "Conv" and from_dq(node.input[0]) and from_dq(node.input[1])

    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    adds = [n for n in model.graph.node if n.op_type == "Add" and any(quantized_conv(i) for i in n.input)]
    return {"convs": len(convs), "convs_int8_both_inputs": sum(from_dq(n.input[0]) and from_dq(n.input[1]) for n in convs),
            "adds_reading_a_quantized_conv": len(adds),
            "adds_fusable": sum(all(from_dq(i) or quantized_conv(i) for i in n.input) for n in adds)}


def main() -> None:
    from pqcad_deploy.artifact import load_artifact
    from pqcad_deploy.converters.export_onnx import export_onnx
    from pqcad_deploy.engines.onnx_check import check_onnx

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("artifacts", nargs="+", help="NAME=ARTIFACT_DIR")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for item in args.artifacts:
        name, art = item.split("=", 1)
        layers = load_artifact(art).manifest.layers
        row = {"policy_quantized_convs": sum(1 for r in layers.values() if r.kind == "conv2d" and r.act_bits is not None)}
        exports = {"fp32": dict(fp=True, target="qdq"), "fp16": dict(fp=True, target="tensorrt"),
                   "tensorrt_o19": dict(target="tensorrt", parity=True, parity_gate=False),
                   "tensorrt_o21": dict(target="tensorrt", opset=21, parity=True, parity_gate=False)}
        for kind, options in exports.items():
            result = export_onnx(art, args.out / f"{name}_{kind}.onnx", overwrite=True, **options)
            entry = {"bytes": result.size_bytes, "opset": result.opset,
                     "findings": [f"{f.rule} {f.severity}" for f in check_onnx(result.path, "tensorrt")]}
            if result.parity is not None:
                entry["parity"] = str(result.parity)
            if result.rewrite is not None:
                entry["rewrite"] = str(result.rewrite)
                entry.update(_placement(result.path))
            row[kind] = entry
            print(name, kind, json.dumps(entry), flush=True)
        rows[name] = row
    (args.out / "rows.json").write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
