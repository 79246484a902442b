"""Verify: the exported QONNX model must compute the QKeras model's outputs exactly.

Sample inputs are drawn from the grids of the source quantizers, including
both ends of each range, and run through QKeras inference and through qonnx's
executor (which runs the Quant nodes). The largest absolute difference over
all outputs must be 0 (a model without quantizers computes in float, where the
order of additions matters: it gets a small tolerance).

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
from bnfold.fixedpoint import FixedPoint
from bnfold.keras import keras, tf


@dataclass(frozen=True)
class Verification:
    """The result of comparing QKeras and QONNX outputs."""

    samples: int
    max_difference: float
    worst_output: str


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


def qonnx_outputs(model: Any, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """QONNX execution (Quant nodes included) of ``model`` on all samples in one run.

    Args:
        model: an ``onnx.ModelProto`` or qonnx ``ModelWrapper`` with static shapes
            (any batch size, or a dynamic batch).
        inputs: one array per graph input, samples along the first axis, in
            Keras's channels-last layout (transposed here for a channels-first input).

    Returns:
        One array per graph output, samples along the first axis, channels-last.
    """
    proto = model.model if isinstance(model, ModelWrapper) else model
    batched = _IndexedModel(_with_batch(proto, len(inputs[0])))
    feed = {}
    for tensor, values in zip(batched.graph.input, inputs, strict=True):
        order = _channels_last_order(proto, tensor.name)
        feed[tensor.name] = values if order is None else values.transpose(np.argsort(order))
    executed = execute_onnx(batched, feed)
    outputs = []
    for tensor in batched.graph.output:
        order = _channels_last_order(proto, tensor.name)
        values = executed[tensor.name]
        outputs.append(values if order is None else values.transpose(order))
    return outputs


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


def verify(
    model: keras.Model,
    onnx_model: onnx.ModelProto,
    inputs: list[np.ndarray],
    *,
    tolerance: float = 0.0,
    source_quantizers: Sequence[Any] | None = None,
) -> Verification:
    """Run QKeras and QONNX on ``inputs`` and compare every output.

    Args:
        model: the QKeras model whose outputs are the reference.
        onnx_model: the exported model (any batch size: all samples run at once).
        inputs: one array per model input, samples along the first axis.
        tolerance: the largest difference allowed, relative to the largest output
            magnitude (at least 1); 0 for quantized models.
        source_quantizers: the QKeras quantizer of each input (None: a float input,
            or all of them when not given), applied to the inputs QKeras receives,
            as the exported graph's input Quant nodes apply them.

    Returns:
        The largest difference found (0.0 when the export is exact).

    Raises:
        VerificationError: any output differs, with by how much and where.

    On success the result is recorded in ``onnx_model``'s ``bnfold.verification``.
    """
    # A direct call, not predict: predict first traces the whole model into a graph,
    # which costs more than the comparison itself on large models.
    quantized = _quantized_inputs(inputs, source_quantizers)
    expected = model(quantized if len(quantized) > 1 else quantized[0], training=False)
    expected = [np.asarray(values) for values in tf.nest.flatten(expected)]
    limit = tolerance * max([1.0, *(float(np.max(np.abs(values))) for values in expected)])
    actual = qonnx_outputs(onnx_model, inputs)
    output_names = [tensor.name for tensor in onnx_model.graph.output]
    worst, worst_output, worst_samples = 0.0, output_names[0], np.zeros(0, dtype=bool)
    samples = len(inputs[0])
    for name, result, reference in zip(output_names, actual, expected, strict=True):
        if result.shape != reference.shape:
            raise VerificationError(
                f"The exported ONNX must give QKeras's output shapes. Received: {result.shape} "
                f"on output {name!r} where QKeras gives {reference.shape}"
            )
        per_sample = np.abs(result - reference).reshape(samples, -1).max(axis=1, initial=0.0)
        difference = float(np.max(per_sample))
        if difference > worst or np.isnan(difference):
            worst, worst_output = difference, name
            worst_samples = ~(per_sample <= limit)
    if worst > limit or np.isnan(worst):
        within = f"within {limit:g}" if limit else "exactly"
        off_grid = _off_grid_samples(inputs, quantized)
        where = (
            " only on inputs off the source quantizers' grids: the input Quant nodes do not "
            "quantize as the source quantizers"
            if off_grid[worst_samples].all()
            else ""
        )
        raise VerificationError(
            f"The exported ONNX must compute the QKeras model's outputs {within}. Received: "
            f"a difference of up to {worst} on output {worst_output!r} over {samples} samples"
            f"{where}"
        )
    entry = onnx_model.metadata_props.add()
    entry.key = "bnfold.verification"
    entry.value = json.dumps(
        {
            "samples": samples,
            "max_difference": worst,
            "executor": "qonnx.core.onnx_exec.execute_onnx",
        }
        | ({"tolerance": limit} if limit else {})
    )
    return Verification(samples, worst, worst_output)
