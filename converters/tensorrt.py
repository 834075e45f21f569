"""The `tensorrt` export target: the graph TensorRT builds strongly typed and runs in INT8 and FP16.

TensorRT 10/11 builds our graphs strongly typed (engines.tensorrt_build): every tensor keeps the type
the graph gives it, so a float32 graph runs everything without Q/DQ in FP32. NVIDIA ModelOpt exports
an FP16 graph at opset 19 for this reason, and this target writes the same form from the qdq graph
(export_onnx traces it, this module rewrites it in place), in this order:

1. **Residual Adds** (``quantize_residual_adds``): an Add that reads a quantized Conv's output gets a
   Q/DQ on its other input, so TensorRT can fuse Conv + Add in INT8 (its developer guide, "Q/DQ
   Layer-Placement Recommendations"). The student never rounded these tensors: their scales are
   calibrated here, amax / 127 over the graph's own DDIM trajectories (CALIBRATION_IMAGES seeded
   noises, the artifact's student timesteps, the engines' numpy DDIM step; the maximum clips nothing;
   a conditional model's trajectories are guided as sampling guides them, both halves measured).
   ModelOpt also quantizes the time-embedding input of each resnet's conv1 Add (22 Adds on the
   builtin UNets); this target leaves those 11 in FP16 by default, because rounding a per-channel
   constant shifts the images' mean (measured: _residual_inputs), at the cost of 11 unfused
   elementwise Adds on a [batch, channels] vector.
2. **One Q/DQ per tensor** (``share_tensor_qdq``): where several QuantizeLinear read one tensor (to_q,
   to_k and to_v; the 11 time_emb_proj Linears; a residual that also feeds a downsampler), one pair
   with the largest of their scales serves every consumer. TensorRT and ModelOpt quantize a tensor
   once; the largest scale clips nothing any consumer kept (the student's scales differ by up to 15 %
   there, measured on the README job's artifact).
   A nearest-neighbour Resize whose output is quantized (the upsamplers) gets the same Q/DQ on its
   input (``quantize_resize_inputs``), so it moves INT8 data; exact, as nearest upsampling copies values.
3. **Float-input layers** (``fold_float_input_weights``): a Conv or MatMul whose input the precision
   policy keeps in float (conv_in / conv_out with --first-last w8-fp-input) gets its weight
   dequantized into a plain float initializer: TensorRT documents Q/DQ weight-only INT8 for no Conv,
   so the layer runs in FP16 with the student's dequantized weights.
4. **4-bit weights** (``store_blocked_int4``): Conv weights stay 4-bit codes in an INT8 container
   (TensorRT has no INT4 convolution; same values, INT8 speed). MatMul weights become INT4
   block-quantized along their input dimension at --opset 21 (TensorRT's weight-only INT4 GEMM), block
   size the largest of INT4_BLOCK_SIZES dividing the input features, every block of a column carrying
   that column's per-channel scale (the same values as the student's).
5. **FP16** (``to_float16``): every float tensor and initializer becomes FP16 (Q/DQ scales included,
   which needs opset >= 19), except the sinusoidal timestep projection: t * frequency reaches 1,000
   rad, where FP16's step is 0.5 rad, so it stays FP32 up to the Cast diffusers already places
   after it (``t_emb.to(dtype)``), which now casts to FP16. The graph keeps FP32 inputs and outputs
   with Casts at the boundary, as ModelOpt's does, so the engines feed it unchanged.

Concat carries no Q/DQ of its own: the Q/DQ sits on the Conv input after it, and TensorRT moves it
across the Concat itself (its Q/DQ propagation rules).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from pqcad_deploy.converters.graph_index import consumer_map, index_graph, replace_nodes
from pqcad_deploy.engines.conditioning import SampleConditions
from pqcad_deploy.errors import ExportError

__all__ = ["CALIBRATION_IMAGES", "CALIBRATION_SEED", "INT4_BLOCK_SIZES", "MIN_OPSET", "TensorRTCalibration",
           "TensorRTRewrite", "check_tensorrt", "fold_float_input_weights", "quantize_residual_adds",
           "quantize_resize_inputs", "share_tensor_qdq", "store_blocked_int4", "to_float16", "to_tensorrt"]

MIN_OPSET = 19  # QuantizeLinear / DequantizeLinear with FP16 scales
INT4_MIN_OPSET = 21  # blocked INT4 DequantizeLinear (block_size)
INT4_BLOCK_SIZES: tuple[int, ...] = (128, 64, 32)
CALIBRATION_IMAGES = 16
CALIBRATION_SEED = 1234  # the ort-qlinear target's calibration seed: not one sampling uses by default
_QMAX = 127
_QUANTIZED_CONSUMERS = ("Conv", "MatMul", "Gemm", "QuantizeLinear")
# inputs that stay float32 whatever the graph's float type (the ONNX schemas type them as tensor(float))
_FLOAT32_INPUTS = {("Resize", 1), ("Resize", 2)}


def check_tensorrt(layer_act_bits: dict[str, int | None]) -> None:
    """Refuse 4-bit activations: TensorRT quantizes activations to INT8 or FP8 only."""
    four = sorted(name for name, bits in layer_act_bits.items() if bits == 4)
    if four:
        raise ExportError(f"--target tensorrt needs 8-bit (or float) activations: TensorRT has no 4-bit activations, "
                          f"and {len(four)} layers have them (e.g. {four[0]}); compress with --bits W4A8 or W8A8.")


@dataclass(frozen=True)
class TensorRTCalibration:
    """What quantize_residual_adds needs to run the graph's own DDIM trajectories."""

    scheduler_config: dict
    prediction_type: str
    timesteps: tuple[int, ...]
    image_shape: tuple[int, int, int]
    images: int = CALIBRATION_IMAGES
    seed: int = CALIBRATION_SEED
    conditions: SampleConditions | None = None  # a conditional model's: image i's condition, the guidance


@dataclass
class TensorRTRewrite:
    """What to_tensorrt changed (export prints it; the tests read it)."""

    residual_adds: int = 0
    shared_tensors: int = 0
    removed_qdq_pairs: int = 0
    resize_inputs: int = 0
    float_input_layers: list[str] = field(default_factory=list)
    int4_layers: list[str] = field(default_factory=list)
    int4_unblockable: list[str] = field(default_factory=list)  # 4-bit MatMuls left in INT8 containers
    fp32_nodes: int = 0  # the timestep projection left in FP32
    calibration_seconds: float = 0.0

    def __str__(self) -> str:
        parts = [f"FP16 graph ({self.fp32_nodes} timestep-projection nodes kept FP32)",
                 f"{self.residual_adds} residual Add inputs quantized (scales calibrated in "
                 f"{self.calibration_seconds:.1f} s)",
                 f"{self.shared_tensors} tensors share one Q/DQ ({self.removed_qdq_pairs} pairs merged)",
                 f"{self.resize_inputs} Resize inputs quantized"]
        if self.float_input_layers:
            parts.append(f"{len(self.float_input_layers)} float-input layers with FP16 weights "
                         f"({', '.join(self.float_input_layers)})")
        if self.int4_layers:
            parts.append(f"{len(self.int4_layers)} MatMul weights blocked INT4")
        if self.int4_unblockable:
            parts.append(f"{len(self.int4_unblockable)} 4-bit MatMul weights left in INT8 containers (input "
                         f"features not a multiple of {min(INT4_BLOCK_SIZES)})")
        return "; ".join(parts)


def to_tensorrt(model, layer_act_bits: dict[str, int | None], layer_weight_bits: dict[str, int],
                calibration: TensorRTCalibration, opset: int, int4: bool,
                time_embedding_adds: bool = False) -> TensorRTRewrite:
    """Rewrite the tidied qdq graph in place into the TensorRT form (module doc, steps 1-5).

    int4: store 4-bit MatMul weights as blocked INT4 (needs opset >= 21); else they stay INT8 containers.
    time_embedding_adds: also quantize the time-embedding input of conv1's Add (ModelOpt does; it shifts
        image means, see _residual_inputs), so TensorRT fuses those Adds too.
    """
    if opset < MIN_OPSET:
        raise ExportError(f"--target tensorrt needs --opset {MIN_OPSET} or newer (FP16 Q/DQ scales); got {opset}.")
    if int4 and opset < INT4_MIN_OPSET:
        raise ExportError(f"blocked INT4 weights need --opset {INT4_MIN_OPSET}; got {opset}.")
    check_tensorrt(layer_act_bits)
    result = TensorRTRewrite()
    started = time.perf_counter()
    result.residual_adds = quantize_residual_adds(model, calibration, time_embedding_adds)
    result.calibration_seconds = time.perf_counter() - started
    result.shared_tensors, result.removed_qdq_pairs = share_tensor_qdq(model)
    result.resize_inputs = quantize_resize_inputs(model)
    result.float_input_layers = fold_float_input_weights(model, layer_act_bits)
    if int4:
        result.int4_layers, result.int4_unblockable = store_blocked_int4(model, layer_weight_bits)
    result.fp32_nodes = to_float16(model)
    return result


# -- 1. residual Adds ------------------------------------------------------------------------------


def _insert_before(graph, nodes: list, inserted: dict[int, list]) -> None:
    """Set the graph's nodes to `nodes`, each preceded by inserted[id(node)] (new Q/DQ pairs)."""
    ordered = []
    for node in nodes:
        ordered.extend(inserted.get(id(node), []))
        ordered.append(node)
    replace_nodes(graph, ordered, set())


def _producers(nodes: list) -> dict:
    return {o: n for n in nodes for o in n.output}


def _is_quantized_conv(node, producers) -> bool:
    """A Conv whose activation and weight both come through DequantizeLinear."""
    return (node is not None and node.op_type == "Conv"
            and all(i in producers and producers[i].op_type == "DequantizeLinear" for i in node.input[:2]))


def _from_sample(nodes: list) -> set[str]:
    """The tensors computed from the values of the graph input `sample` (the rest depend on the timestep
    alone: the timestep's broadcast to the batch reads only sample's shape)."""
    reached = {"sample"}
    for node in nodes:  # graph order is topological
        if node.op_type not in ("Shape", "Size") and any(i in reached for i in node.input):
            reached.update(node.output)
    return reached


def _residual_inputs(nodes: list, time_embedding: bool = False) -> list[tuple[object, int]]:
    """(Add node, input index) for every Add that reads a quantized Conv and whose other input is float.

    When both inputs are quantized Convs (a resnet with conv_shortcut: shortcut + conv2), input 0 is
    quantized and the Conv of input 1 is the one TensorRT fuses the Add into (diffusers writes
    ``input_tensor + hidden_states``, hidden_states from conv2).

    time_embedding: also the Adds whose other input depends on the timestep alone (conv1 + the resnet's
    time embedding). Off by default: that input is one value per channel, broadcast over every pixel,
    so its rounding error is not noise but a per-channel offset of the whole feature map. Measured on
    the CIFAR-10 `pqcad` W8A8 student (RESULTS section 23): rounding it shifts the sampled images' mean
    by +1.5 grey levels on every channel; rounding the 11 residual inputs alone by -0.02 / +0.24 / +0.82.
    """
    producers = _producers(nodes)
    from_sample = _from_sample(nodes)
    found = []
    for node in nodes:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        convs = [_is_quantized_conv(producers.get(i), producers) for i in node.input]
        if not any(convs):
            continue
        other = 0 if convs[1] else 1
        source = producers.get(node.input[other])
        if source is None or source.op_type in ("DequantizeLinear", "Constant"):
            continue  # a graph input or initializer (a bias), or already quantized
        if node.input[other] not in from_sample and not time_embedding:
            continue
        found.append((node, other))
    return found


def _calibrate_amax(model, tensors: list[str], calibration: TensorRTCalibration) -> dict[str, float]:
    """max |value| of each tensor over the graph's own DDIM trajectories (ONNX Runtime, the graph as traced)."""
    import onnx

    from pqcad_deploy.engines.ddim import DDIMSampler
    from pqcad_deploy.engines.ort_session import ort_session
    from pqcad_deploy.engines.sampler import initial_noise

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    out_name = probe.graph.output[0].name
    for name in tensors:
        probe.graph.output.append(onnx.ValueInfoProto(name=name))
    session = ort_session(probe.SerializeToString(), optimization_level="disabled")
    sampler = DDIMSampler({**calibration.scheduler_config, "prediction_type": calibration.prediction_type})
    steps = list(calibration.timesteps)
    x = initial_noise(calibration.images, tuple(calibration.image_shape), calibration.seed)
    conditions = calibration.conditions  # image i: class i % classes (or row i % rows of the embeddings), guided
    if conditions is not None:
        cond, uncond = conditions.halves(np.arange(calibration.images))
    amax = dict.fromkeys(tensors, 0.0)
    for t, prev_t in zip(steps, [*steps[1:], -1]):
        feed = {"sample": x}
        if conditions is not None:  # [x, x] with [uncond, cond] when guiding (engines.sampler.denoise)
            feed["sample"], feed[conditions.input.name] = conditions.guidance.model_batch(x, cond, uncond)
        feed["timestep"] = np.full((len(feed["sample"]),), float(t), np.float32)
        results = session.run([out_name, *tensors], feed)
        for name, value in zip(tensors, results[1:]):
            amax[name] = max(amax[name], float(np.abs(value).max()))
        out = results[0] if conditions is None else conditions.guidance.combine(results[0])
        x = sampler.step(out, t, prev_t, x).astype(np.float32)
    return amax


def quantize_residual_adds(model, calibration: TensorRTCalibration, time_embedding: bool = False) -> int:
    """Put a Q/DQ (calibrated scale) on the float input of every residual Add that reads a quantized Conv
    (and of the time-embedding Adds with `time_embedding`: see _residual_inputs)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    nodes = list(graph.node)  # kept alive: the ids below are its objects' (_timestep_region)
    targets = _residual_inputs(nodes, time_embedding)
    if not targets:
        return 0
    tensors = list(dict.fromkeys(add.input[i] for add, i in targets))
    amax = _calibrate_amax(model, tensors, calibration)
    inserted: dict[int, list] = {}
    made: dict[str, str] = {}  # tensor -> its DequantizeLinear output
    for add, index in targets:
        tensor = add.input[index]
        if tensor not in made:
            base = f"{add.name.strip('/').replace('/', '.')}.residual_input"
            scale, zero_point = f"{base}.act_scale", f"{base}.act_zero_point"
            graph.initializer.extend([
                numpy_helper.from_array(np.array(max(amax[tensor], 1e-8) / _QMAX, np.float32), scale),
                numpy_helper.from_array(np.array(0, np.int8), zero_point)])
            made[tensor] = f"{base}/dequantized"
            inserted.setdefault(id(add), []).extend([
                helper.make_node("QuantizeLinear", [tensor, scale, zero_point], [f"{base}/codes"],
                                 name=f"{base}/input_quantize"),
                helper.make_node("DequantizeLinear", [f"{base}/codes", scale, zero_point], [made[tensor]],
                                 name=f"{base}/input_dequantize")])
        add.input[index] = made[tensor]
    _insert_before(graph, nodes, inserted)
    return len(targets)


# -- 2. one Q/DQ per tensor -------------------------------------------------------------------------


def share_tensor_qdq(model) -> tuple[int, int]:
    """Merge the activation Q/DQ pairs that read one tensor into one pair with the largest scale.

    Returns (tensors that had several pairs, pairs removed).
    """
    from onnx import numpy_helper

    graph = model.graph
    nodes = list(graph.node)  # kept alive: the ids below are its objects' (_timestep_region)
    lookup = index_graph(graph)
    inits, consumers = lookup.inits, lookup.consumers
    groups: dict[str, list] = {}
    for node in nodes:
        if node.op_type == "QuantizeLinear" and node.input[0] not in inits:
            groups.setdefault(node.input[0], []).append(node)
    redirect: dict[str, str] = {}
    dead_nodes: set[int] = set()
    dead_inits: set[str] = set()
    shared = 0
    for tensor, quantizers in groups.items():
        if len(quantizers) < 2:
            continue
        pairs = []
        for q in quantizers:
            dqs = consumers.get(q.output[0], [])
            if len(dqs) != 1 or dqs[0].op_type != "DequantizeLinear":
                raise ExportError(f"{q.name}: expected one DequantizeLinear after it, found {len(dqs)} consumers")
            pairs.append((q, dqs[0]))
        keep_q, keep_dq = pairs[0]
        scale = max(float(numpy_helper.to_array(inits[q.input[1]])) for q, _ in pairs)
        inits[keep_q.input[1]].CopyFrom(numpy_helper.from_array(np.array(scale, np.float32), keep_q.input[1]))
        for q, dq in pairs[1:]:
            redirect[dq.output[0]] = keep_dq.output[0]
            dead_nodes.update((id(q), id(dq)))
            dead_inits.update(i for i in (*q.input[1:], *dq.input[1:]) if i != keep_q.input[1])
        shared += 1
    for node in nodes:
        node.input[:] = [redirect.get(i, i) for i in node.input]
    replace_nodes(graph, [n for n in nodes if id(n) not in dead_nodes], dead_inits)
    return shared, len(dead_nodes) // 2


def quantize_resize_inputs(model) -> int:
    """Give a nearest-neighbour Resize whose output is quantized the same Q/DQ on its input.

    TensorRT then upsamples INT8 data (ModelOpt quantizes both sides of the upsamplers' Resize). It
    is exact: nearest upsampling copies values, so rounding before it with the scale used after it
    gives the same codes, and the Q/DQ after it re-rounds values already on its grid.
    """
    from onnx import helper

    graph = model.graph
    nodes = list(graph.node)  # kept alive: the ids below are its objects' (_timestep_region)
    consumers = consumer_map(nodes)
    inserted: dict[int, list] = {}
    for node in nodes:
        mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "nearest")
        if node.op_type != "Resize" or mode != "nearest":
            continue
        readers = consumers.get(node.output[0], [])
        source = node.input[0]
        if (len(readers) != 1 or readers[0].op_type != "QuantizeLinear"
                or any(r.op_type == "QuantizeLinear" for r in consumers.get(source, []))):
            continue
        q = readers[0]
        base = f"{node.name.strip('/').replace('/', '.')}.input"
        inserted[id(node)] = [
            helper.make_node("QuantizeLinear", [source, *q.input[1:]], [f"{base}/codes"], name=f"{base}/input_quantize"),
            helper.make_node("DequantizeLinear", [f"{base}/codes", *q.input[1:]], [f"{base}/dequantized"],
                             name=f"{base}/input_dequantize")]
        node.input[0] = f"{base}/dequantized"
    _insert_before(graph, nodes, inserted)
    return len(inserted)


# -- 3. float-input layers ------------------------------------------------------------------------


def _dequantize(inits, dq) -> np.ndarray:
    from onnx import numpy_helper

    codes = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float32)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    shape = [1] * codes.ndim
    shape[axis] = -1
    return codes * (scale.reshape(shape) if scale.ndim else scale)


def fold_float_input_weights(model, layer_act_bits: dict[str, int | None]) -> list[str]:
    """Replace the weight DequantizeLinear of every float-input layer by its dequantized float weight."""
    from onnx import numpy_helper

    from pqcad_deploy.converters.naming import qdq_names

    graph = model.graph
    nodes = list(graph.node)  # kept alive: the ids below are its objects' (_timestep_region)
    lookup = index_graph(graph)
    inits = lookup.inits
    folded, dead_nodes, dead_inits = [], set(), set()
    for layer, bits in layer_act_bits.items():
        if bits is not None:
            continue
        names = qdq_names(layer)
        dq = lookup.by_name.get(names.weight_dequantize)
        if dq is None:
            raise ExportError(f"{layer}: no weight DequantizeLinear named {names.weight_dequantize}")
        weight = _dequantize(inits, dq)
        graph.initializer.append(numpy_helper.from_array(weight, f"{layer}.weight"))
        for user in lookup.consumers.get(dq.output[0], []):
            user.input[:] = [f"{layer}.weight" if i == dq.output[0] else i for i in user.input]
        dead_nodes.add(id(dq))
        dead_inits.update(dq.input)
        folded.append(layer)
    replace_nodes(graph, [n for n in nodes if id(n) not in dead_nodes], dead_inits)
    return folded


# -- 4. blocked INT4 ------------------------------------------------------------------------------


def _block_size(rows: int) -> int | None:
    """The largest INT4_BLOCK_SIZES entry dividing `rows`, or None (the weight then stays an INT8 container)."""
    return next((size for size in INT4_BLOCK_SIZES if rows % size == 0), None)


def store_blocked_int4(model, layer_weight_bits: dict[str, int]) -> tuple[list[str], list[str]]:
    """4-bit MatMul weights ([in, out] codes, per-column scales) as INT4 blocked along the input dimension.

    A weight whose input features no block size divides (fewer than 32, or not a multiple of 32) stays
    an INT8 container: same values, no saving. Returns (layers stored INT4, 4-bit MatMuls left INT8).
    """
    from onnx import TensorProto, helper, numpy_helper

    from pqcad_deploy.converters.export_onnx import pack_int4
    from pqcad_deploy.converters.naming import qdq_names

    graph = model.graph
    lookup = index_graph(graph)
    inits = lookup.inits
    stored, unblockable = [], []
    for layer, bits in layer_weight_bits.items():
        names = qdq_names(layer)
        dq = lookup.by_name.get(names.weight_dequantize)
        if bits != 4 or dq is None:
            continue
        users = lookup.consumers.get(dq.output[0], [])
        if len(users) != 1 or users[0].op_type != "MatMul":
            continue  # Conv weights stay INT8 containers
        codes = numpy_helper.to_array(inits[dq.input[0]])
        if codes.ndim != 2 or codes.min() < -8 or codes.max() > 7:
            raise ExportError(f"{layer}: not 2-D 4-bit codes, cannot store as blocked INT4")
        rows, cols = codes.shape
        block = _block_size(rows)
        if block is None:
            unblockable.append(layer)
            continue
        column_scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32).reshape(1, cols)
        scale = np.repeat(column_scale, rows // block, axis=0)
        inits[dq.input[0]].CopyFrom(helper.make_tensor(dq.input[0], TensorProto.INT4, codes.shape,
                                                       pack_int4(codes), raw=True))
        inits[dq.input[1]].CopyFrom(numpy_helper.from_array(scale, dq.input[1]))
        zero_point = dq.input[2] if len(dq.input) > 2 else ""
        del dq.input[2:]
        del dq.attribute[:]
        dq.attribute.extend([helper.make_attribute("axis", 0), helper.make_attribute("block_size", block)])
        if zero_point:
            graph.initializer.remove(inits.pop(zero_point))
        stored.append(layer)
    return stored, unblockable


# -- 5. FP16 ----------------------------------------------------------------------------------------


def _timestep_region(nodes: list) -> set[int]:
    """ids of the nodes computing the timestep projection: from the `timestep` input forward, up to the
    first node that quantizes or multiplies by weights.

    ids of `nodes`' objects: the caller keeps that list alive while it uses them (protobuf hands out
    a new Python object per access once the old one is gone, and ids are then reused).
    """
    consumers = consumer_map(nodes)
    region: set[int] = set()
    frontier = ["timestep"]
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if id(node) in region or node.op_type in _QUANTIZED_CONSUMERS:
                continue
            region.add(id(node))
            frontier.extend(node.output)
    return region


def to_float16(model) -> int:
    """FP16 compute with FP32 inputs and outputs (module doc, step 5); returns the FP32 nodes kept."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    nodes = list(graph.node)
    region = _timestep_region(nodes)
    producers = _producers(nodes)
    in_region = {o for n in nodes if id(n) in region for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    float32_users: set[str] = set()  # initializers / constants read where float32 must stay
    half_users: set[str] = set()
    for node in nodes:
        for k, name in enumerate(node.input):
            if id(node) in region or (node.op_type, k) in _FLOAT32_INPUTS:
                float32_users.add(name)
            else:
                half_users.add(name)

    def half_copy_name(name: str) -> str:
        return f"{name}/fp16" if name in float32_users else name

    # initializers
    for name, init in list(inits.items()):
        if init.data_type != TensorProto.FLOAT or name not in half_users:
            continue
        array = numpy_helper.to_array(init).astype(np.float16)
        if name in float32_users:
            graph.initializer.append(numpy_helper.from_array(array, half_copy_name(name)))
        else:
            init.CopyFrom(numpy_helper.from_array(array, name))
    # nodes: Constants, ConstantOfShape and Casts outside the region; boundary Casts out of it
    new_nodes = []
    boundary: dict[str, str] = {}
    for node in nodes:
        if id(node) not in region:
            if node.op_type == "Constant" and node.output[0] in half_users:
                value = next(a for a in node.attribute if a.name == "value")
                if value.t.data_type == TensorProto.FLOAT:
                    half = numpy_helper.from_array(numpy_helper.to_array(value.t).astype(np.float16))
                    if node.output[0] in float32_users:
                        new_nodes.append(helper.make_node("Constant", [], [half_copy_name(node.output[0])],
                                                          value=half))
                    else:
                        value.t.CopyFrom(half)
            elif node.op_type == "ConstantOfShape" and node.output[0] not in float32_users:
                for a in node.attribute:
                    if a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                        a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16)))
            elif node.op_type == "Cast":
                for a in node.attribute:
                    if a.name == "to" and a.i == TensorProto.FLOAT:
                        a.i = TensorProto.FLOAT16
            node.input[:] = [half_copy_name(i) if (i in inits or (i in producers and producers[i].op_type == "Constant"))
                             and i in float32_users and (node.op_type, k) not in _FLOAT32_INPUTS else i
                             for k, i in enumerate(node.input)]
            # a float tensor leaving the timestep projection
            for k, name in enumerate(node.input):
                if name in in_region and (node.op_type, k) not in _FLOAT32_INPUTS:
                    source = producers[name]
                    if source.op_type == "Cast":  # diffusers' t_emb.to(dtype): it now casts to FP16
                        for a in source.attribute:
                            if a.name == "to":
                                a.i = TensorProto.FLOAT16
                        continue
                    if name not in boundary:
                        boundary[name] = f"{name}/fp16"
                        new_nodes.append(helper.make_node("Cast", [name], [boundary[name]], to=TensorProto.FLOAT16,
                                                          name=f"{name}/to_fp16"))
                    node.input[k] = boundary[name]
        new_nodes.append(node)
    # graph inputs and outputs stay FP32: one Cast per float input the FP16 part reads (sample, and a latent
    # model's encoder_hidden_states; the timestep feeds the FP32 region)
    halves = {i.name: f"{i.name}/fp16" for i in graph.input
              if i.name != "timestep" and i.name not in inits and i.type.tensor_type.elem_type == TensorProto.FLOAT}
    for node in new_nodes:
        if id(node) not in region:
            node.input[:] = [halves.get(i, i) for i in node.input]
    casts_in = [helper.make_node("Cast", [name], [half], to=TensorProto.FLOAT16, name=f"{name}/to_fp16")
                for name, half in halves.items()]
    tail = []
    for out in graph.output:
        half = f"{out.name}/fp16"
        for node in new_nodes:
            node.output[:] = [half if o == out.name else o for o in node.output]
        tail.append(helper.make_node("Cast", [half], [out.name], to=TensorProto.FLOAT, name=f"{out.name}/to_fp32"))
    replace_nodes(graph, [*casts_in, *new_nodes, *tail], set())
    del graph.value_info[:]
    model.CopyFrom(onnx.shape_inference.infer_shapes(model, strict_mode=True))
    del model.graph.value_info[:]
    return len(region)
