"""FINN's activation thresholds made to round ties as the Quant nodes say.

QKeras rounds with ``tf.round`` (half to even), and bnfold's Quant nodes say so
(``rounding_mode="ROUND"``); a ternary activation's Quant rounds halves away from
zero (``"HALF_UP"``). FINN's ``ConvertQONNXtoFINN`` turns each activation Quant
into a ``MultiThreshold`` with one threshold halfway between each pair of levels,
and a MultiThreshold counts the thresholds its input reaches (``x >= t``): an
input exactly halfway goes to the upper level, whatever the rounding mode said.
FINN has no option for other rounding.

``RoundHalfToEven`` moves up, by half the grid step of their input, the
thresholds whose ties the Quant's rounding mode sends to the lower level. No
input value lies strictly between a threshold and its raised value, so only the
ties change. FINN's later ``RoundAndClipThresholds`` (a ceiling onto the integer
input of a streamlined graph) keeps the difference. The grid step of each tensor
is propagated from the graph inputs' datatypes and the constants, as powers of
two, through what each op does to values. Where the grid is unknown (a float
input, an average over a window that is not a power of two, a product with a
constant such as float32(1/6) whose grid is finer than float32 resolves) such a
threshold moves up to the next float32 instead, with a warning: in the graph the
step sees that still sends exactly the ties down, since no float32 lies between,
but FINN's streamlining, which rescales and shifts thresholds in float32, may round
so small a step away (then those ties go up again, as without the step).

FINN's conversion drops the Quant node, and with it ``rounding_mode``, so bnfold
writes a rounding mode other than QONNX's default ``ROUND`` into the quantization
annotation of the Quant's output (``rounding_mode``), which qonnx carries through
its renaming and FINN leaves on the tensor its MultiThreshold (or the Add and Mul
after it) writes. A MultiThreshold without one rounds as ``ROUND``.

This module needs only numpy and qonnx, so that FINN's environment can load it
without TensorFlow (``scripts/check_finn.py`` does).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from onnx import TensorProto, helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.base import Transformation
from qonnx.util.basic import get_by_name

__all__ = [
    "ROUNDING_ANNOTATION",
    "RoundHalfToEven",
    "rounding_mode",
    "step_round_half_to_even",
    "tensor_grids",
]

logger = logging.getLogger(__name__)

# Ops whose output values are some of their first input's values (or 0, Relu's).
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
        "Split",
        "Slice",
        "Gather",
        "Tile",
        "Expand",
        "Neg",
        "Abs",
    )
)
# Ops whose outputs are 0 or 1 (booleans, which a Cast turns into numbers).
_BOOLEAN = frozenset(
    ("Not", "And", "Or", "Xor", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual")
)
# Ops whose output is on the finest grid of their inputs: sums, or some of their values.
_FINEST_GRID = frozenset(("Add", "Sub", "Concat", "Max", "Min", "Clip"))
# Ops whose output grid is the product of their inputs' grids.
_PRODUCT_GRID = frozenset(("Mul", "MatMul", "Conv"))
# Which ties each rounding mode sends to the lower of the two levels, by that level
# (an integer): QONNX's modes that round to nearest (qonnx's resolve_rounding_mode).
_TIE_GOES_DOWN = {
    "ROUND": lambda lower: np.mod(lower, 2) == 0,  # half to even
    "HALF_EVEN": lambda lower: np.mod(lower, 2) == 0,
    "HALF_UP": lambda lower: lower < 0,  # half away from zero
    "HALF_DOWN": lambda lower: lower >= 0,  # half toward zero
}
# The quantization annotation key under which the exporter keeps a Quant's rounding mode.
ROUNDING_ANNOTATION = "rounding_mode"


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


def _attribute(node: Any, name: str, default: Any) -> Any:
    attribute = get_by_name(node.attribute, name)
    return default if attribute is None else helper.get_attribute_value(attribute)


def _finest(*grids: float | None) -> float | None:
    return None if None in grids else min(grids)


# Input coordinate of output index x along an axis, by Resize's coordinate_transformation_mode
# (ONNX's definitions; scale = output length / input length).
_RESIZE_COORDINATES = {
    b"half_pixel": lambda x, scale, size_in, size_out: (x + 0.5) / scale - 0.5,
    b"pytorch_half_pixel": lambda x, scale, size_in, size_out: (
        (x + 0.5) / scale - 0.5 if size_out > 1 else 0 * x
    ),
    b"asymmetric": lambda x, scale, size_in, size_out: x / scale,
    b"align_corners": lambda x, scale, size_in, size_out: (
        x * (size_in - 1) / (size_out - 1) if size_out > 1 else 0 * x
    ),
}
# A grid finer than this is no grid: the weights are not short binary fractions.
_FINEST_WEIGHT_GRID = 2.0**-24


def _resize_scales(model: ModelWrapper, node: Any) -> tuple[list[int], np.ndarray] | None:
    """The input shape and the scale along each axis, from ``scales`` or ``sizes``."""
    shape = model.get_tensor_shape(node.input[0])
    scales = model.get_initializer(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if shape is None:
        return None
    if scales is not None and np.size(scales):
        return shape, np.asarray(scales, dtype=np.float64)
    sizes = model.get_initializer(node.input[3]) if len(node.input) > 3 else None
    if sizes is None:
        return None
    return shape, np.asarray(sizes, dtype=np.float64) / np.asarray(shape, dtype=np.float64)


def _linear_weights_grid(model: ModelWrapper, node: Any) -> float | None:
    """The grid of the products of a linear Resize's weights (one per axis).

    Each output is a sum of inputs times, per axis, ``frac`` or ``1 - frac`` of its
    input coordinate, clamped to the input; their grid is known when each axis's
    weights are short binary fractions (a power-of-two factor, for example).
    """
    coordinates = _RESIZE_COORDINATES.get(
        _attribute(node, "coordinate_transformation_mode", b"half_pixel")
    )
    found = _resize_scales(model, node)
    if coordinates is None or found is None:
        return None
    grid = 1.0
    for size_in, scale in zip(*found, strict=True):
        size_out = int(np.floor(size_in * scale))
        x = np.clip(coordinates(np.arange(size_out), scale, size_in, size_out), 0, size_in - 1)
        fractions = x - np.floor(x)
        grid *= _power_of_two_grid(np.concatenate([fractions, 1 - fractions, [1.0]]))
    return grid if grid >= _FINEST_WEIGHT_GRID else None


def _resize_grid(model: ModelWrapper, node: Any, grid: float) -> float | None:
    """Nearest copies input values (or, cropping, its extrapolation value); linear sums
    them weighted (its weights' grid); cubic's grid is not followed (bnfold's bicubic
    UpSampling2D is float: its values are not TensorFlow's to the last bit anyway)."""
    mode = _attribute(node, "mode", b"nearest")
    if _attribute(node, "coordinate_transformation_mode", b"") == b"tf_crop_and_resize":
        if mode != b"nearest":
            return None
        return _finest(grid, _power_of_two_grid(_attribute(node, "extrapolation_value", 0.0)))
    if mode == b"nearest":
        return grid
    weights = _linear_weights_grid(model, node) if mode == b"linear" else None
    return None if weights is None else grid * weights


def _pad_grid(model: ModelWrapper, node: Any, grid: float) -> float | None:
    """Pad copies its input, and in ``constant`` mode adds its constant (0 by default)."""
    if _attribute(node, "mode", b"constant") != b"constant":
        return grid
    constant = None
    if len(node.input) > 2 and node.input[2]:
        constant = model.get_initializer(node.input[2])
        if constant is None:
            return None
    elif get_by_name(node.attribute, "value") is not None:  # opsets before 11
        constant = _attribute(node, "value", 0.0)
    return _finest(grid, _power_of_two_grid(0.0 if constant is None else constant))


def _cast_grid(node: Any, grid: float | None) -> float | None:
    """A Cast to float32 or float64 keeps the values; to an integer type or bool it makes
    integers (of the input's grid if that is whole); to a narrower float it may round."""
    target = _attribute(node, "to", TensorProto.UNDEFINED)
    if target in (TensorProto.FLOAT, TensorProto.DOUBLE):
        return grid
    if target in (TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.STRING):
        return None
    return grid if grid is not None and grid >= 1 else 1.0


def _output_grid(model: ModelWrapper, node: Any, grids: dict[str, float | None]) -> float | None:
    """The grid step of ``node``'s outputs, or None when it is not a known power of two."""
    inputs = [grids.get(name) for name in node.input if name]
    if node.op_type == "MultiThreshold":
        attributes = {a.name: a.f for a in node.attribute if a.name in ("out_scale", "out_bias")}
        return _power_of_two_grid([attributes.get("out_scale", 1.0), attributes.get("out_bias", 0)])
    if node.op_type == "Quant":
        scale = model.get_initializer(node.input[1])
        return float(np.min(scale)) if scale is not None and _is_power_of_two(scale) else None
    if node.op_type in _BOOLEAN:
        return 1.0
    if node.op_type == "Cast":
        return _cast_grid(node, inputs[0])
    if node.op_type == "Where":  # values of its second input or of its third
        return _finest(*inputs[1:])
    if not inputs or inputs[0] is None:
        return None
    if node.op_type in _SAME_GRID:
        return inputs[0]
    if node.op_type == "Resize":
        return _resize_grid(model, node, inputs[0])
    if node.op_type == "Pad":
        return _pad_grid(model, node, inputs[0])
    if node.op_type == "Im2Col":  # FINN's: its padding holds pad_value
        return _finest(inputs[0], _power_of_two_grid(_attribute(node, "pad_value", 0)))
    if node.op_type == "LeakyRelu":  # x, or alpha * x
        alpha = np.float64(_attribute(node, "alpha", 0.01))
        return _finest(inputs[0], inputs[0] * alpha) if _is_power_of_two(alpha) else None
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


def _annotation(model: ModelWrapper, tensor: str, key: str) -> str | None:
    annotation = get_by_name(model.graph.quantization_annotation, tensor, "tensor_name")
    if annotation is None:
        return None
    entry = get_by_name(annotation.quant_parameter_tensor_names, key, "key")
    return None if entry is None else entry.value


def rounding_mode(model: ModelWrapper, node: Any) -> str:
    """The rounding mode of the Quant a MultiThreshold replaced.

    FINN writes the Quant's output from the MultiThreshold, or from the Add (offset)
    and Mul (scale) by constants it puts after it; the annotation is on that tensor.
    """
    tensor = node.output[0]
    while True:
        mode = _annotation(model, tensor, ROUNDING_ANNOTATION)
        if mode is not None:
            return mode.upper()
        consumers = model.find_consumers(tensor) or []
        if len(consumers) != 1 or consumers[0].op_type not in ("Add", "Mul"):
            return "ROUND"
        if model.get_initializer(consumers[0].input[1]) is None:
            return "ROUND"
        tensor = consumers[0].output[0]


def _raised_half_a_grid(
    thresholds: np.ndarray, down: np.ndarray, grid: float | None
) -> np.ndarray | None:
    """``thresholds`` on the input grid where ``down``, raised by half of it; None if the grid
    is not known or float32 cannot hold the raised values."""
    if grid is None or not math.isfinite(grid):
        return None
    exact = thresholds.astype(np.float64)
    ties = (np.mod(exact, grid) == 0) & down
    raised = np.where(ties, exact + grid / 2, exact).astype(np.float32)
    return raised if np.array_equal(raised.astype(np.float64) > exact, ties) else None


class RoundHalfToEven(Transformation):
    """Raise the thresholds of each MultiThreshold where its Quant rounds a tie down.

    ``ROUND`` (QKeras's half to even) and ``HALF_EVEN`` send the ties above an even
    level down, ``HALF_UP`` (half away from zero) those below zero, ``HALF_DOWN`` those
    above. Other modes are not to nearest: FINN's thresholds are wrong for them beyond
    ties, and they are left alone, with a warning.

    Run it on the graph ``ConvertQONNXtoFINN`` makes (FINN's
    ``step_qonnx_to_finn``), before streamlining.
    """

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        grids = tensor_grids(model)
        for node in model.get_nodes_by_op_type("MultiThreshold"):
            mode = rounding_mode(model, node)
            if mode not in _TIE_GOES_DOWN:
                logger.warning(
                    "MultiThreshold %s left as FINN made it: its Quant rounds %s, which "
                    "thresholds halfway between levels do not express",
                    node.name,
                    mode,
                )
                continue
            thresholds = model.get_initializer(node.input[1])
            levels = _lower_levels(model, node, thresholds.shape[1])
            if levels is None:
                logger.warning(
                    "MultiThreshold %s left rounding halves up: its levels are not integers",
                    node.name,
                )
                continue
            rows = max(thresholds.shape[0], levels.shape[0])
            thresholds = np.broadcast_to(thresholds.astype(np.float32), (rows, thresholds.shape[1]))
            down = _TIE_GOES_DOWN[mode](np.broadcast_to(levels, thresholds.shape))
            raised = _raised_half_a_grid(thresholds, down, grids.get(node.input[0]))
            if raised is None:
                logger.warning(
                    "MultiThreshold %s: the grid of its input %s is not known (or half of it "
                    "is below float32 precision); thresholds raised to the next float32, "
                    "which FINN's streamlining may round away when it moves them",
                    node.name,
                    node.input[0],
                )
                raised = np.where(down, np.nextafter(thresholds, np.float32(np.inf)), thresholds)
            model.set_initializer(node.input[1], raised)
        return model, False


def step_round_half_to_even(model: ModelWrapper, cfg: Any = None) -> ModelWrapper:
    """A FINN build step: ``RoundHalfToEven``; give it to FINN after ``step_qonnx_to_finn``.

    ``DataflowBuildConfig(..., inject_steps_after={"step_qonnx_to_finn":
    [step_round_half_to_even]})``, or in ``steps`` right after it.
    """
    return model.transform(RoundHalfToEven())
