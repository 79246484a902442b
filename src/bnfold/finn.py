"""FINN's activation thresholds made to round halves to even, as QKeras does.

QKeras rounds with ``tf.round`` (half to even), and bnfold's Quant nodes say so
(``rounding_mode="ROUND"``). FINN's ``ConvertQONNXtoFINN`` turns each activation
Quant into a ``MultiThreshold`` with one threshold halfway between each pair of
levels, and a MultiThreshold counts the thresholds its input reaches
(``x >= t``): an input exactly halfway goes to the upper level, whatever the
rounding mode said. FINN has no option for other rounding.

``RoundHalfToEven`` moves the thresholds whose lower level is even up by half
the grid step of their input. No input value lies strictly between a threshold
and its raised value, so only the ties change, and they go to the even level.
FINN's later ``RoundAndClipThresholds`` (a ceiling onto the integer input of a
streamlined graph) keeps the difference. The grid step of each tensor is
propagated from the graph inputs' datatypes and the constants, as powers of two;
a threshold whose input grid is unknown (a float input, an average over a
window that is not a power of two) is left alone, with a warning.

This module needs only numpy and qonnx, so that FINN's environment can load it
without TensorFlow (``scripts/check_finn.py`` does).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.base import Transformation
from qonnx.util.basic import get_by_name

__all__ = ["RoundHalfToEven", "step_round_half_to_even"]

logger = logging.getLogger(__name__)

# Ops whose output values are some of their (first) input's values.
_SAME_GRID = frozenset(
    (
        "Relu",
        "MaxPool",
        "MaxPoolNHWC",
        "Transpose",
        "Reshape",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "Identity",
        "Pad",
        "Im2Col",
        "Split",
        "Slice",
        "Gather",
    )
)
# Ops whose output is on the finest grid of their inputs.
_FINEST_GRID = frozenset(("Add", "Sub", "Concat", "Max", "Min"))
# Ops whose output grid is the product of their inputs' grids.
_PRODUCT_GRID = frozenset(("Mul", "MatMul", "Conv"))


def _power_of_two_grid(values: Any) -> float:
    """The largest power of two of which every value is a multiple (inf for all zeros)."""
    values = np.abs(np.asarray(values, dtype=np.float64)).ravel()
    values = values[values != 0]
    if values.size == 0:
        return math.inf
    mantissas, exponents = np.frexp(values)  # value = mantissa * 2**exponent, exactly
    lowest = math.inf
    for mantissa, exponent in zip(mantissas, exponents, strict=True):
        integer = int(mantissa * 2.0**53)  # exact: a float64 mantissa has 53 bits
        lowest = min(lowest, int(exponent) - 53 + (integer & -integer).bit_length() - 1)
    return 2.0**lowest


def _is_power_of_two(values: np.ndarray) -> bool:
    values = np.abs(np.asarray(values, dtype=np.float64))
    mantissas, _ = np.frexp(values)
    return bool(values.size) and bool(np.all(mantissas == 0.5))


def _window_size(model: ModelWrapper, node: Any) -> int | None:
    if node.op_type == "GlobalAveragePool":
        return int(np.prod(model.get_tensor_shape(node.input[0])[2:]))
    kernel = get_by_name(node.attribute, "kernel_shape")
    return int(np.prod(kernel.ints)) if kernel is not None else None


def _output_grid(model: ModelWrapper, node: Any, grids: dict[str, float | None]) -> float | None:
    """The grid step of ``node``'s outputs, or None when it is not a known power of two."""
    inputs = [grids.get(name) for name in node.input]
    if node.op_type == "MultiThreshold":
        attributes = {a.name: a.f for a in node.attribute if a.name in ("out_scale", "out_bias")}
        return _power_of_two_grid([attributes.get("out_scale", 1.0), attributes.get("out_bias", 0)])
    if node.op_type == "Quant":
        scale = model.get_initializer(node.input[1])
        return float(np.min(scale)) if scale is not None and _is_power_of_two(scale) else None
    if not inputs or inputs[0] is None:
        return None
    if node.op_type in _SAME_GRID:
        return inputs[0]
    if None in inputs:
        return None
    if node.op_type in _FINEST_GRID:
        return min(inputs)
    if node.op_type in _PRODUCT_GRID:
        return float(np.prod(inputs))
    if node.op_type == "Div":
        divisor = model.get_initializer(node.input[1])
        if divisor is None or not _is_power_of_two(divisor):
            return None
        return inputs[0] / float(np.max(np.abs(divisor)))
    if node.op_type in ("GlobalAveragePool", "AveragePool"):
        size = _window_size(model, node)
        return inputs[0] / size if size and _is_power_of_two(np.array(size)) else None
    return None


def tensor_grids(model: ModelWrapper) -> dict[str, float | None]:
    """Each tensor's grid step: a power of two every value is a multiple of, or None.

    Graph inputs take theirs from their datatype annotation (``finn_datatype``),
    constants from their values; every op in a sorted graph then from its inputs.
    """
    grids: dict[str, float | None] = {}
    for tensor in model.graph.input:
        datatype = model.get_tensor_datatype(tensor.name)
        integer = datatype.is_integer()
        grids[tensor.name] = 1.0 if integer else None
        if not integer and datatype.is_fixed_point():
            grids[tensor.name] = float(datatype.scale_factor())
    for tensor in model.graph.initializer:
        grids[tensor.name] = _power_of_two_grid(model.get_initializer(tensor.name))
    for node in model.graph.node:
        grid = _output_grid(model, node, grids)
        for name in node.output:
            grids[name] = grid
    return grids


def _lower_levels(model: ModelWrapper, node: Any, count: int) -> np.ndarray | None:
    """The level below each threshold, per channel (rows), or None if not integers.

    A MultiThreshold gives ``out_scale * (thresholds reached) + out_bias``; FINN's
    conversion puts a signed quantizer's offset in an Add right after it.
    """
    attributes = {a.name: a.f for a in node.attribute if a.name in ("out_scale", "out_bias")}
    if attributes.get("out_scale", 1.0) != 1.0:
        return None
    offset = np.array([attributes.get("out_bias", 0.0)], dtype=np.float64)
    consumers = model.find_consumers(node.output[0]) or []
    if len(consumers) == 1 and consumers[0].op_type == "Add":
        added = model.get_initializer(consumers[0].input[1])
        if added is not None:
            offset = offset + np.asarray(added, dtype=np.float64).ravel()
    if not np.all(offset == np.round(offset)):
        return None
    return offset[:, None] + np.arange(count)[None, :]


class RoundHalfToEven(Transformation):
    """Raise the thresholds of each MultiThreshold where QKeras rounds a tie down.

    Run it on the graph ``ConvertQONNXtoFINN`` makes (FINN's
    ``step_qonnx_to_finn``), before streamlining.
    """

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        grids = tensor_grids(model)
        for node in model.get_nodes_by_op_type("MultiThreshold"):
            thresholds = model.get_initializer(node.input[1])
            grid = grids.get(node.input[0])
            levels = _lower_levels(model, node, thresholds.shape[1])
            if grid is None or not math.isfinite(grid) or levels is None:
                logger.warning(
                    "MultiThreshold %s left rounding halves up: the grid of its input %s or "
                    "its levels are not known",
                    node.name,
                    node.input[0],
                )
                continue
            rows = max(thresholds.shape[0], levels.shape[0])
            thresholds = np.broadcast_to(thresholds, (rows, thresholds.shape[1])).astype(np.float64)
            levels = np.broadcast_to(levels, thresholds.shape)
            ties = (np.mod(thresholds, grid) == 0) & (np.mod(levels, 2) == 0)
            raised = np.where(ties, thresholds + grid / 2, thresholds).astype(np.float32)
            if not np.array_equal(raised.astype(np.float64) > thresholds, ties):
                logger.warning(
                    "MultiThreshold %s left rounding halves up: half its input grid (%g) is "
                    "below float32 precision at its thresholds",
                    node.name,
                    grid,
                )
                continue
            model.set_initializer(node.input[1], raised)
        return model, False


def step_round_half_to_even(model: ModelWrapper, cfg: Any = None) -> ModelWrapper:
    """A FINN build step: ``RoundHalfToEven``; give it to FINN after ``step_qonnx_to_finn``.

    ``DataflowBuildConfig(..., inject_steps_after={"step_qonnx_to_finn":
    [step_round_half_to_even]})``, or in ``steps`` right after it.
    """
    return model.transform(RoundHalfToEven())
