"""The range of every value of the graph hls4ml reads, and which values are exact.

Values the export computes in float (after a float activation or layer, a batch
normalization, a rounded mean) get a ``result`` type whose integer bits hold their range
and whose fractional bits are ``fractional_bits`` (16 unless chosen). The range follows by
interval arithmetic from the Quant types and the constants: a mean stays within its
input's range, a softmax or sigmoid within [0, 1], a tanh within [-1, 1], a batch
normalization, a float Dense or Conv within the range its weights give its input's range,
and every other elementwise activation in its function of the input's ends. hls4ml
truncates each such result to the grid, less than ``2**-fractional_bits`` off; a Dense or
Conv reading it infers an exact accumulator from that type. A value whose range bnfold
cannot bound (an op without a rule, such as ``Exp``) keeps hls4ml's own typing, which
falls back on the default precision.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper

from bnfold.hls4ml.nodes import SAME_VALUES, metadata, quant_type

if TYPE_CHECKING:
    from qonnx.core.modelwrapper import ModelWrapper

__all__ = ["Range", "value_ranges"]

# Elementwise ops whose output does not decrease as their input grows: over an input
# range, the output's range is the op at the ends of it (and at 0, where that is inside).
_MONOTONE = (
    "Relu",
    "LeakyRelu",
    "ThresholdedRelu",
    "Elu",
    "Selu",
    "Sigmoid",
    "HardSigmoid",
    "Tanh",
    "Softplus",
    "Softsign",
)
# Ops whose outputs lie within their input's range (some of its values, or means of them).
_WITHIN = (*SAME_VALUES, "AveragePool", "GlobalAveragePool")
# Ops that keep a fixed-point input fixed point, on the same grid.
_KEEPS_GRID = (*SAME_VALUES, "Relu", "Pad", "Concat", "Add")

Range = tuple[float, float]


def value_ranges(model: ModelWrapper) -> tuple[dict[str, Range], set[str]]:
    """The range of each tensor of ``model`` that has one, and the tensors that hold
    fixed-point values the export computes exactly.

    Args:
        model: The graph hls4ml reads (after ``prepare_for_hls4ml``'s preprocessing).

    Returns:
        Tensor name to ``(low, high)``, and the set of exact tensor names. A tensor gets
        no range where an op's rule is missing here (``Exp``, ``Cast``, ...), or where it
        reads such a tensor.
    """
    ranges = _Ranges(model)
    return ranges.ranges, ranges.exact


class _Ranges:
    """The range of every tensor of a graph, by interval arithmetic from its Quant nodes
    and constants, and which tensors hold fixed-point values the export computes exactly.

    A tensor gets no range where an op's rule is missing here (``Exp``, ``Cast``, ...), or
    where it reads such a tensor; hls4ml then types it itself.
    """

    def __init__(self, model: ModelWrapper) -> None:
        self.model = model
        self.producers = {output: node for node in model.graph.node for output in node.output}
        self.ranges: dict[str, Range] = {}
        self.exact: set[str] = set()
        for node in model.graph.node:
            self.visit(node)

    def constant(self, tensor: str) -> np.ndarray | None:
        """A constant's values, read through a Quant node of constant input (weights)."""
        values = self.model.get_initializer(tensor)
        if values is None:
            producer = self.producers.get(tensor)
            if producer is not None and producer.op_type == "Quant":
                values = self.model.get_initializer(producer.input[0])
        return None if values is None else np.asarray(values, dtype=np.float64)

    def of(self, tensor: str) -> Range | None:
        values = self.constant(tensor)
        if values is not None and values.size:
            return float(values.min()), float(values.max())
        return self.ranges.get(tensor)

    def visit(self, node: onnx.NodeProto) -> None:
        output = node.output[0]
        if node.op_type == "Quant":
            fixed = quant_type(self.model, node)
            if fixed is not None:
                self.ranges[output] = (fixed.min, fixed.max)
                self.exact.add(output)
            return
        if node.op_type in ("Conv", "MatMul"):
            keeps_grid = bool(metadata(node, "accumulator_hls")) and not metadata(node, "rounded")
        else:
            keeps_grid = node.op_type in _KEEPS_GRID
        read = node.input if node.op_type in ("Add", "Concat") else node.input[:1]
        if keeps_grid and all(name in self.exact for name in read):
            self.exact.add(output)
        inputs = [self.of(name) for name in node.input if name]
        if not inputs or any(value is None for value in inputs):
            return
        computed = self.compute(node, inputs)
        if computed is not None and all(map(math.isfinite, computed)):
            self.ranges[output] = computed

    def compute(self, node: onnx.NodeProto, inputs: list[Range]) -> Range | None:
        """The output's range from the inputs' ranges; None where there is no rule."""
        op = node.op_type
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if op == "Concat":
            return _hull(inputs)
        if op == "Pad":
            return _hull([inputs[0], (0.0, 0.0)])
        if op in _WITHIN:
            return inputs[0]
        if op == "Softmax":
            return 0.0, 1.0
        if op in _MONOTONE:
            low, high = inputs[0]
            ends = _through(node, [low, min(max(0.0, low), high), high])
            return float(ends.min()), float(ends.max())
        if op in ("Conv", "MatMul"):
            weights = self.constant(node.input[1])
            if weights is None:
                return None
            bias = self.constant(node.input[2]) if len(node.input) > 2 else None
            return _multiply_accumulate(inputs[0], weights, bias, 0 if op == "MatMul" else None)
        if op == "BatchNormalization":
            scale, offset, mean, variance = (self.constant(name) for name in node.input[1:5])
            if scale is None or offset is None or mean is None or variance is None:
                return None
            factor = scale / np.sqrt(variance + attributes.get("epsilon", 1e-5))
            low, high = inputs[0]
            ends = np.stack([factor * low, factor * high]) + (offset - mean * factor)
            return float(ends.min()), float(ends.max())
        (a, b), (c, d) = inputs[0], inputs[-1]
        if op == "Add":
            return a + c, b + d
        if op == "Sub":
            return a - d, b - c
        if op == "Mul":
            products = (a * c, a * d, b * c, b * d)
            return min(products), max(products)
        if op == "Min":
            return min(a, c), min(b, d)
        if op == "Max":
            return max(a, c), max(b, d)
        return None


def _hull(ranges: list[Range]) -> Range:
    return min(low for low, _ in ranges), max(high for _, high in ranges)


def _through(node: onnx.NodeProto, values: list[float]) -> np.ndarray:
    """``node``'s elementwise op applied to ``values`` (ONNX's reference implementation)."""
    from onnx.reference import ReferenceEvaluator

    single = helper.make_node(node.op_type, ["x"], ["y"])
    single.attribute.extend(node.attribute)
    shape = [len(values)]
    graph = helper.make_graph(
        [single],
        "range",
        [helper.make_tensor_value_info("x", onnx.TensorProto.DOUBLE, shape)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.DOUBLE, shape)],
    )
    evaluator = ReferenceEvaluator(helper.make_model(graph))
    return np.asarray(evaluator.run(None, {"x": np.asarray(values, dtype=np.float64)})[0])


def _multiply_accumulate(
    value: Range, weights: np.ndarray, bias: np.ndarray | None, summed_axis: int | None
) -> Range:
    """The range of sums of weight times input, plus bias, for inputs in ``value``.

    Per output: each product lies between the weight times either end of the input's
    range, and 0 stands for a padded position. ``summed_axis`` 0 is a MatMul's weight
    (inputs x outputs); None a Conv's (outputs first, every other axis summed).
    """
    low, high = value
    ends = np.stack([weights * low, weights * high, np.zeros_like(weights)])
    if summed_axis is None:
        axes = tuple(range(1, weights.ndim))
        lows, highs = ends.min(0).sum(axes), ends.max(0).sum(axes)
    else:
        lows, highs = ends.min(0).sum(summed_axis), ends.max(0).sum(summed_axis)
    if bias is not None:
        lows, highs = lows + bias, highs + bias
    return float(lows.min()), float(highs.max())
