"""Verify: the exported QONNX model must compute the QKeras model's outputs exactly.

Sample inputs are drawn from the grids of the source quantizers, including
both ends of each range, and run through QKeras inference and through qonnx's
executor (which runs the Quant nodes). Every output computed in fixed point
must be equal, difference 0. Outputs computed after a float op (softmax, a
float layer, a batch normalization: the model's ``bnfold.float_tail``) are
compared within ``FLOAT_TOLERANCE``; the fixed-point tensors those float ops
read are compared exactly, so the tolerance never covers the fixed-point part.

The exported graph quantizes its inputs with Quant nodes; the QKeras model has
no input quantizer (source quantizers only describe its inputs). So QKeras is
given each input after its source quantizer, and some samples lie off the
grid: halfway between grid points and beyond both ends (``-2**integer`` of a
symmetric quantizer is one). Samples on the grid alone cannot tell an input
Quant that rounds or clips differently from the source quantizer.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx

from bnfold.errors import VerificationError
from bnfold.export import standard_ops
from bnfold.fixedpoint import FixedPoint
from bnfold.graph import propagate
from bnfold.keras import keras, tf

# Float ops differ between TensorFlow and onnxruntime by a few float32 ulps each
# (exp, division, rsqrt, the order of a sum's additions): allow 1024 ulps of the
# largest output magnitude (at least 1), about 1.2e-4, room for a tail of a few
# hundred such ops, and far below one step of any quantizer that reads them.
FLOAT_TOLERANCE = 1024 * float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class Verification:
    """The result of comparing QKeras and QONNX outputs.

    Attributes:
        samples: how many inputs were compared.
        max_difference: the largest difference on what must be exact (outputs
            computed in fixed point, and the fixed-point tensors float ops read).
        worst_output: where it occurred.
        float_difference: the largest difference on outputs computed in float,
            None when there are none.
    """

    samples: int
    max_difference: float
    worst_output: str
    float_difference: float | None = None


def sample_inputs(
    model: keras.Model,
    source_types: list[FixedPoint | None],
    count: int,
    seed: int = 0,
    *,
    off_grid: int = 0,
) -> list[np.ndarray]:
    """``count`` inputs per model input on its source grid; the first two are its min and max.

    A float input (no source quantizer) gets values on a grid of step 1/256 in [-4, 4).
    ``off_grid`` more samples follow, in which half the values of a quantized input
    leave its grid: a quarter lie halfway between grid points (rounding ties), an
    eighth one to three steps below its min, an eighth as far above its max.
    """
    rng = np.random.default_rng(seed)
    samples = []
    for tensor, fixed in zip(model.inputs, source_types, strict=True):
        step = (fixed or FixedPoint(11, 2, True)).step
        shape = (count, *tensor.shape[1:])
        low, high = _code_range(fixed)
        codes = rng.integers(low, high + 1, size=shape)
        codes[0], codes[-1] = low, high
        if off_grid:
            codes = np.concatenate([codes, _off_grid_codes(fixed, (off_grid, *shape[1:]), rng)])
        samples.append((codes * step).astype(np.float32))
    return samples


def _code_range(fixed: FixedPoint | None) -> tuple[int, int]:
    """The smallest and largest code of ``fixed`` (of the float sample grid when None)."""
    fixed = fixed or FixedPoint(11, 2, True)
    return round(fixed.min / fixed.step), round(fixed.max / fixed.step)


def _off_grid_codes(
    fixed: FixedPoint | None, shape: tuple[int, ...], rng: np.random.Generator
) -> np.ndarray:
    """Codes of ``fixed`` with half of them moved off its grid (unchanged for a float input)."""
    low, high = _code_range(fixed)
    codes = rng.integers(low, high + 1, size=shape).astype(np.float64)
    if fixed is None:
        return codes
    kind = rng.integers(0, 8, size=shape)
    beyond = rng.integers(1, 4, size=shape)
    codes = np.where(kind < 2, codes + 0.5, codes)
    codes = np.where(kind == 2, low - beyond, codes)
    return np.where(kind == 3, high + beyond, codes)


class _IndexedModel(ModelWrapper):
    """qonnx's ModelWrapper with its per-tensor and per-node lookups indexed.

    qonnx finds a tensor's shape or value info, and a node's index, by scanning
    the whole graph, and ``execute_onnx`` looks up every tensor and node: the
    time grows with the square of the model's size (minutes at a few hundred
    layers). The executed graph never changes, so the indexes hold for the run.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self._values = {
            value.name: value for value in (*graph.value_info, *graph.output, *graph.input)
        }
        # The node objects are kept alive, so that protobuf hands out the same ones.
        self._nodes = list(graph.node)
        self._node_indices = {id(node): index for index, node in enumerate(self._nodes)}
        self._consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self._nodes:
            for name in node.input:
                self._consumers.setdefault(name, []).append(node)
        super().__init__(model, fix_missing_initializer_valueinfo=False)

    def get_tensor_valueinfo(self, tensor_name: str) -> onnx.ValueInfoProto | None:
        return self._values.get(tensor_name)

    def get_tensor_shape(
        self, tensor_name: str, fix_missing_init_shape: bool = False
    ) -> list[int] | None:
        value = self._values.get(tensor_name)
        if value is None:
            return super().get_tensor_shape(tensor_name, fix_missing_init_shape)
        return [dim.dim_value for dim in value.type.tensor_type.shape.dim]

    def get_node_index(self, node: onnx.NodeProto) -> int | None:
        return self._node_indices.get(id(node))

    def find_consumers(self, tensor_name: str) -> list[onnx.NodeProto] | None:
        return self._consumers.get(tensor_name)


def _batch_carrying(graph: onnx.GraphProto) -> set[str]:
    """The tensors computed from the graph inputs: their first axis is the batch."""
    carrying = {tensor.name for tensor in graph.input}
    for node in graph.node:
        if any(name in carrying for name in node.input):
            carrying.update(node.output)
    return carrying


def _with_batch(onnx_model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """A copy of ``onnx_model`` that computes ``batch`` samples at once.

    qonnx's executor runs each node as its own onnxruntime session; one run over
    all samples instead of one per sample divides that cost by the sample count.
    Every tensor computed from the inputs has the batch as its first axis (Keras
    tensors do, and tf2onnx keeps it first), so the copy changes that axis, and
    the leading entry of each Reshape's target shape, where it is a fixed size.
    """
    batched = onnx.ModelProto()
    batched.CopyFrom(onnx_model)
    graph = batched.graph
    carrying = _batch_carrying(graph)
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.name in carrying and value.type.tensor_type.shape.dim:
            value.type.tensor_type.shape.dim[0].dim_value = batch
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    for node in graph.node:
        target = initializers.get(node.input[1]) if node.op_type == "Reshape" else None
        if target is None or node.input[0] not in carrying:
            continue
        shape = numpy_helper.to_array(target).copy()
        if shape.size and shape[0] > 0:
            shape[0] = batch
            target.CopyFrom(numpy_helper.from_array(shape, target.name))
    return batched


def _channels_last_order(model: onnx.ModelProto, name: str) -> list[int] | None:
    """The axis order that makes graph tensor ``name`` channels-last, if it is channels-first.

    Read from the tensor's ``tensor_layout`` annotation (qonnx's notation).
    """
    for annotation in model.graph.quantization_annotation:
        if annotation.tensor_name != name:
            continue
        for entry in annotation.quant_parameter_tensor_names:
            if entry.key == "tensor_layout":
                layout = ast.literal_eval(entry.value)
                if len(layout) > 2 and layout[1] == "C":
                    return [0, *range(2, len(layout)), 1]
    return None


# What ``verify`` records as its executor: the standard-op copy in one onnxruntime
# session, or qonnx's executor for a graph that copy cannot express.
ONE_SESSION = "onnxruntime, Quant as standard ops (bnfold.export.standard_ops)"
QONNX_EXECUTOR = "qonnx.core.onnx_exec.execute_onnx"


def qonnx_outputs(
    model: Any,
    inputs: Sequence[np.ndarray],
    tensors: Sequence[str] = (),
    *,
    one_session: bool = False,
) -> list[np.ndarray]:
    """QONNX execution (Quant nodes included) of ``model`` on all samples in one run.

    Args:
        model: an ``onnx.ModelProto`` or qonnx ``ModelWrapper`` with static shapes
            (any batch size, or a dynamic batch).
        inputs: one array per graph input, samples along the first axis, in
            Keras's channels-last layout (transposed here for a channels-first input).
        tensors: intermediate tensors to return after the outputs, as ONNX computes them.
        one_session: run the graph with its Quant nodes as standard ops in one
            onnxruntime session (``bnfold.export.standard_ops``) where it can be
            written so; False, or a graph it cannot express: qonnx's executor,
            one onnxruntime session per node.

    Returns:
        One array per graph output, channels-last, then one per tensor, samples along
        the first axis.
    """
    return _outputs(model, inputs, tensors, one_session)[0]


def _outputs(
    model: Any, inputs: Sequence[np.ndarray], tensors: Sequence[str], one_session: bool
) -> tuple[list[np.ndarray], str]:
    """``qonnx_outputs``, and which executor ran."""
    proto = model.model if isinstance(model, ModelWrapper) else model
    batched = _with_batch(proto, len(inputs[0]))
    feed = {}
    for tensor, values in zip(batched.graph.input, inputs, strict=True):
        order = _channels_last_order(proto, tensor.name)
        feed[tensor.name] = values if order is None else values.transpose(np.argsort(order))
    standard = standard_ops.as_standard_ops(batched) if one_session else None
    if standard is not None:
        executed, executor = standard_ops.run(standard, feed, tensors), ONE_SESSION
    else:
        executed = execute_onnx(
            _IndexedModel(batched), feed, return_full_exec_context=bool(tensors)
        )
        executor = QONNX_EXECUTOR
    outputs = []
    for tensor in batched.graph.output:
        order = _channels_last_order(proto, tensor.name)
        values = executed[tensor.name]
        outputs.append(values if order is None else values.transpose(order))
    return outputs + [executed[name] for name in tensors], executor


def _float_tail(onnx_model: onnx.ModelProto) -> dict[str, Any]:
    for entry in onnx_model.metadata_props:
        if entry.key == "bnfold.float_tail":
            return json.loads(entry.value)
    return {"outputs": [], "boundaries": []}


def _keras_boundaries(
    model: keras.Model, inputs: list[np.ndarray], boundaries: list[dict[str, Any]]
) -> list[np.ndarray]:
    """The values QKeras computes at each boundary: a layer's input, or a MAC layer's
    output before its activation (input -1), running the model layer by layer."""
    wanted = {(b["layer"], b["input"]) for b in boundaries}
    found: dict[tuple[str, int], np.ndarray] = {}

    def visit(layer: Any, values: list[Any], path: str) -> list[Any]:
        for index, value in enumerate(values):
            if (path, index) in wanted:
                found[path, index] = np.asarray(value)
        output = layer(values if len(values) > 1 else values[0], training=False)
        if (path, -1) in wanted:
            linear = layer.activation
            layer.activation = keras.activations.linear
            found[path, -1] = np.asarray(layer(values[0], training=False))
            layer.activation = linear
        return [output]

    propagate(model, [tf.constant(values) for values in inputs], visit)
    return [found[b["layer"], b["input"]] for b in boundaries]


def _as_keras_layout(values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """An ONNX tensor in Keras's layout: tf2onnx may keep a 4-D tensor channels-first."""
    if values.shape != shape and values.ndim > 2:
        moved = np.moveaxis(values, 1, -1)
        if moved.shape == shape:
            return moved
    return values


def _difference(name: str, result: np.ndarray, reference: np.ndarray) -> float:
    if result.shape != reference.shape:
        raise VerificationError(
            f"The exported ONNX must give QKeras's shapes. Received: {result.shape} "
            f"on {name!r} where QKeras gives {reference.shape}"
        )
    difference = float(np.max(np.abs(result - reference)))
    return float("inf") if np.isnan(difference) else difference


def _quantized_inputs(
    inputs: Sequence[np.ndarray], source_quantizers: Sequence[Any] | None
) -> list[np.ndarray]:
    """Each input after its source quantizer, as the exported graph's input Quant gives it."""
    quantizers = source_quantizers or [None] * len(inputs)
    return [
        values if quantizer is None else np.asarray(quantizer(values), dtype=np.float32)
        for values, quantizer in zip(inputs, quantizers, strict=True)
    ]


def _off_grid_samples(inputs: Sequence[np.ndarray], quantized: Sequence[np.ndarray]) -> np.ndarray:
    """Which samples hold a value their source quantizer changes."""
    changed = np.zeros(len(inputs[0]), dtype=bool)
    for values, after in zip(inputs, quantized, strict=True):
        changed |= (values != after).reshape(len(values), -1).any(axis=1)
    return changed


def _only_off_grid(
    inputs: Sequence[np.ndarray],
    quantized: Sequence[np.ndarray],
    result: np.ndarray,
    reference: np.ndarray,
    allowed: float,
) -> str:
    """What an error adds when every sample that differs has inputs off the source grids."""
    off_grid = _off_grid_samples(inputs, quantized)
    samples = len(off_grid)
    per_sample = np.abs(result - reference).reshape(samples, -1).max(axis=1, initial=0.0)
    differing = ~(per_sample <= allowed)
    if differing.any() and off_grid[differing].all():
        return (
            " only on inputs off the source quantizers' grids: the input Quant nodes do not "
            "quantize as the source quantizers"
        )
    return ""


def verify(
    model: keras.Model,
    onnx_model: onnx.ModelProto,
    inputs: list[np.ndarray],
    *,
    tolerance: float = FLOAT_TOLERANCE,
    float_outputs: Sequence[str] | None = None,
    source_quantizers: Sequence[Any] | None = None,
) -> Verification:
    """Run QKeras and QONNX on ``inputs`` and compare every output.

    Args:
        model: the QKeras model whose outputs are the reference.
        onnx_model: the exported model (any batch size: all samples run at once).
        inputs: one array per model input, samples along the first axis.
        tolerance: the largest difference allowed on an output computed in float,
            relative to its largest magnitude (at least 1).
        float_outputs: the outputs computed in float; None for those the
            model's ``bnfold.float_tail`` names. All others must be exact.
        source_quantizers: the QKeras quantizer of each input (None: a float input,
            or all of them when not given), applied to the inputs QKeras receives,
            as the exported graph's input Quant nodes apply them.

    Returns:
        The largest differences found.

    Raises:
        VerificationError: an output or boundary tensor differs, with by how much
            and where.

    On success the result is recorded in ``onnx_model``'s ``bnfold.verification``.
    """
    tail = _float_tail(onnx_model)
    float_outputs = set(tail["outputs"] if float_outputs is None else float_outputs)
    boundaries = tail["boundaries"]
    # A direct call, not predict: predict first traces the whole model into a graph,
    # which costs more than the comparison itself on large models.
    quantized = _quantized_inputs(inputs, source_quantizers)
    expected = model(quantized if len(quantized) > 1 else quantized[0], training=False)
    expected = [np.asarray(values) for values in tf.nest.flatten(expected)]
    if boundaries:
        expected += _keras_boundaries(model, quantized, boundaries)
    actual, executor = _outputs(
        onnx_model, inputs, [b["tensor"] for b in boundaries], one_session=True
    )
    names = [tensor.name for tensor in onnx_model.graph.output]
    names += [f"{b['tensor']} (read by float layer {b['layer']!r})" for b in boundaries]
    samples = len(inputs[0])
    exact, worst_output, worst_pair, floats, limit = 0.0, names[0], None, None, 0.0
    for index, (name, result, reference) in enumerate(zip(names, actual, expected, strict=True)):
        result = _as_keras_layout(result, reference.shape)
        difference = _difference(name, result, reference)
        if index < len(onnx_model.graph.output) and name in float_outputs:
            allowed = tolerance * max(1.0, float(np.max(np.abs(reference))))
            floats, limit = max(floats or 0.0, difference), max(limit, allowed)
            if difference > allowed:
                raise VerificationError(
                    "The exported ONNX must compute the QKeras model's float outputs within "
                    f"{allowed:g}. Received: a difference of up to {difference} on output "
                    f"{name!r} over {samples} samples"
                    f"{_only_off_grid(inputs, quantized, result, reference, allowed)}"
                )
        elif difference > exact or index == 0:
            exact, worst_output, worst_pair = max(exact, difference), name, (result, reference)
    if exact:
        raise VerificationError(
            "The exported ONNX must compute what the QKeras model computes in fixed point "
            f"exactly. Received: a difference of up to {exact} on {worst_output!r} over "
            f"{samples} samples{_only_off_grid(inputs, quantized, *worst_pair, 0.0)}"
        )
    entry = onnx_model.metadata_props.add()
    entry.key = "bnfold.verification"
    entry.value = json.dumps(
        {
            "samples": samples,
            "max_difference": exact if floats is None else max(exact, floats),
            "executor": executor,
        }
        | ({"exact_difference": exact, "tolerance": limit} if floats is not None else {})
    )
    return Verification(samples, exact, worst_output, floats)
