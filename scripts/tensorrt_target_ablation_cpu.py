"""Attribute the tensorrt target's parity error to its rewrite steps (RESULTS section 23).

    python scripts/tensorrt_target_ablation_cpu.py ARTIFACT TAG      # writes /tmp/trt/TAG_*.onnx

Each row applies some of converters.tensorrt's steps to the artifact's qdq graph at opset 19 and
prints the output's relative L2 error against the PyTorch student (8 seeded inputs, max and median).
"""
import sys

import numpy as np
import onnx

from pqcad_deploy.converters.export_onnx import export_onnx
from pqcad_deploy.converters import tensorrt as T
from pqcad_deploy.converters.parity import parity_report
from pqcad_deploy.converters.targets import _calibrate_tensorrt
from pqcad_deploy.artifact import load_artifact
art = sys.argv[1]; tag = sys.argv[2]
import os; os.makedirs('/tmp/trt', exist_ok=True)
export_onnx(art, f'/tmp/trt/{tag}_qdq19.onnx', target='qdq', opset=19, overwrite=True, parity=False)
a = load_artifact(art); m = a.manifest
cal = _calibrate_tensorrt(None, m, 'max')
acts = {n: r.act_bits for n, r in m.layers.items()}
def variant(steps):
    model = onnx.load(f'/tmp/trt/{tag}_qdq19.onnx')
    for s in steps:
        if s == 'residual': T.quantize_residual_adds(model, cal)
        if s == 'share': T.share_tensor_qdq(model)
        if s == 'resize': T.quantize_resize_inputs(model)
        if s == 'fold': T.fold_float_input_weights(model, acts)
        if s == 'fp16': T.to_float16(model)
    p = f'/tmp/trt/{tag}_v.onnx'; onnx.save(model, p)
    r = parity_report(art, p, n=8)
    return max(r.sample_rel_errors), float(np.median(r.sample_rel_errors))
for steps in [[], ['fp16'], ['residual'], ['share'], ['resize'], ['fold'], ['residual','share','resize','fold'], ['residual','share','resize','fold','fp16']]:
    print(tag, '+'.join(steps) or 'qdq@19', 'max %.2e median %.2e' % variant(steps), flush=True)
