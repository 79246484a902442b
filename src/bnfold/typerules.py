"""How a layer's output type follows from its input types: one rule per kind of layer.

A value is either a ``FixedPoint`` or ``Untyped``, which carries the reason it
has no fixed-point type (a float activation, a float layer, a mean over a
window that is not a power of two, a batch normalization). The reason travels
with the value, so a MAC layer that reads it can say why it has no accumulator
type. The layer table (``bnfold.layer_table``) says which rule each Keras layer
class follows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bnfold.errors import QuantizerError
from bnfold.fixedpoint import FixedPoint


@dataclass(frozen=True)
class Untyped:
    """A value without a fixed-point type, and why: reported if a MAC layer needs it."""

    reason: str


Typed = FixedPoint | Untyped
TypeRule = Callable[[Any, list[Typed]], Typed]


def relu_of(value: Typed) -> Typed:
    """A ReLU keeps the non-negative part: the sign bit goes."""
    if isinstance(value, Untyped) or not value.signed:
        return value
    return FixedPoint(value.bits - 1, value.integer, False)


def quantizer_type(quantizer: Any, layer: Any) -> Typed:
    """The type a QKeras quantizer gives its outputs; Untyped for one without a grid."""
    try:
        return FixedPoint.from_quantizer(quantizer, layer=layer.name)
    except QuantizerError as error:
        return Untyped(str(error))


def activation_type(activation: Any, value: Typed, layer: Any) -> Typed:
    """The type after a layer's activation function or quantizer."""
    name = getattr(activation, "__name__", None)
    if activation is None or name == "linear":
        return value
    if name == "relu":
        return relu_of(value)
    if type(activation).__module__.startswith("qkeras"):
        return quantizer_type(activation, layer)
    return Untyped(f"layer {layer.name!r} applies the float activation {name or activation!r}")


def same(layer: Any, values: list[Typed]) -> Typed:
    """Outputs are some of the input values, moved or selected, or zeros."""
    return values[0]


def quantized(layer: Any, values: list[Typed]) -> Typed:
    """A QActivation: its quantizer's type."""
    return quantizer_type(layer.quantizer, layer)


def activation(layer: Any, values: list[Typed]) -> Typed:
    """An Activation layer: linear and relu keep a type, other functions are float."""
    return activation_type(layer.activation, values[0], layer)


def relu_layer(layer: Any, values: list[Typed]) -> Typed:
    """A plain ReLU keeps a type; a slope, threshold or maximum makes it float."""
    if layer.max_value is None and float(layer.negative_slope) == 0 and float(layer.threshold) == 0:
        return relu_of(values[0])
    return Untyped(f"layer {layer.name!r} is a ReLU with a slope, threshold or maximum")


def float_output(layer: Any, values: list[Typed]) -> Typed:
    """A layer whose outputs are float whatever its inputs (softmax, batch normalization...)."""
    return Untyped(f"layer {layer.name!r} ({type(layer).__name__}) computes in float")


def _average(layer: Any, values: list[Typed], count: int | None) -> Typed:
    """A mean of ``count`` values is fixed point only when ``count`` is a power of two."""
    value = values[0]
    if isinstance(value, Untyped):
        return value
    if not count or count & (count - 1):
        return Untyped(
            f"layer {layer.name!r} averages {count or 'an unknown number of'} values, not a "
            "power of two, so its output is not fixed point"
        )
    shift = count.bit_length() - 1
    return FixedPoint(value.bits + shift, value.integer, value.signed, value.narrow)


def pooled_area(layer: Any) -> int | None:
    """How many values each output of an average pooling layer averages (None: unknown)."""
    if hasattr(layer, "pool_size"):
        return math.prod(layer.pool_size)
    shape = layer.input_shape
    spatial = shape[1:-1] if layer.data_format == "channels_last" else shape[2:]
    return math.prod(spatial) if None not in spatial else None


def average_pooling(layer: Any, values: list[Typed]) -> Typed:
    """A mean over each pooling window."""
    if layer.padding != "valid":
        return Untyped(f"layer {layer.name!r} averages partial windows (padding='same')")
    return _average(layer, values, pooled_area(layer))


def global_average_pooling(layer: Any, values: list[Typed]) -> Typed:
    """A mean over all positions."""
    return _average(layer, values, pooled_area(layer))


def quantized_average_pooling(layer: Any, values: list[Typed]) -> Typed:
    """QAveragePooling2D, QGlobalAveragePooling2D: the mean, or with an ``average_quantizer``
    the sum times the quantized reciprocal of the count, then the activation.

    QKeras computes the sum as the float mean times the count, which is the exact sum
    when the count is a power of two; the product with the quantized reciprocal, a
    value of the quantizer's type, is then exact too.
    """
    quantizer = layer.average_quantizer_internal
    rule = global_average_pooling if not hasattr(layer, "pool_size") else average_pooling
    mean = rule(layer, values)
    if quantizer is None or isinstance(mean, Untyped):
        return activation_type(layer.activation, mean, layer)
    reciprocal = quantizer_type(quantizer, layer)
    if isinstance(reciprocal, Untyped):
        return reciprocal
    total = values[0].sum_of(pooled_area(layer))
    return activation_type(layer.activation, total.product(reciprocal), layer)


def upsampling(layer: Any, values: list[Typed]) -> Typed:
    """Nearest-neighbour copies values; bilinear interpolation between neighbours is fixed point
    when every factor is a power of two; other interpolations are float.

    TensorFlow samples the input at ``(x + 0.5) / f - 0.5`` (half-pixel centres), so the
    interpolation weights are multiples of ``1 / (2 f)`` along each axis scaled by ``f``: a
    convex combination on a grid ``2 f`` times finer per such axis, within the input's range.
    """
    value = values[0]
    interpolation = getattr(layer, "interpolation", "nearest")
    if interpolation == "nearest" or isinstance(value, Untyped):
        return value
    if interpolation != "bilinear":
        return Untyped(f"layer {layer.name!r} interpolates with {interpolation!r}, in float")
    factors = [factor for factor in layer.size if factor > 1]
    if any(factor & (factor - 1) for factor in factors):
        return Untyped(
            f"layer {layer.name!r} interpolates bilinearly by {tuple(layer.size)}, not powers "
            "of two, so its output is not fixed point"
        )
    finer = sum((2 * factor).bit_length() - 1 for factor in factors)
    return FixedPoint(value.bits + finer, value.integer, value.signed, value.narrow)


def union(layer: Any, values: list[Typed]) -> Typed:
    """A type holding every input's values (concatenation)."""
    untyped = [value for value in values if isinstance(value, Untyped)]
    if untyped:
        return untyped[0]
    result = values[0]
    for value in values[1:]:
        result = result.union(value)
    return result


def add(layer: Any, values: list[Typed]) -> Typed:
    """A sum of the inputs: their union, grown by the number summed."""
    total = union(layer, values)
    return total if isinstance(total, Untyped) else total.sum_of(len(values))


def _typed_or_reason(values: list[Typed]) -> list[FixedPoint] | Untyped:
    """The inputs' types, or the first input's reason for having none."""
    untyped = [value for value in values if isinstance(value, Untyped)]
    return untyped[0] if untyped else list(values)


def subtract(layer: Any, values: list[Typed]) -> Typed:
    """``a - b``: the narrowest type holding ``[a.min - b.max, a.max - b.min]`` on the finer grid.

    Signed even when both inputs are unsigned; from the bounds rather than the widths, so
    that two unsigned inputs cost no integer bit (their difference lies within either's
    magnitude).
    """
    typed = _typed_or_reason(values)
    if isinstance(typed, Untyped):
        return typed
    first, second = typed
    return FixedPoint.narrowest_holding(
        first.min - second.max, first.max - second.min, min(first.step, second.step)
    )


def multiply(layer: Any, values: list[Typed]) -> Typed:
    """A product of the inputs: widths add (``FixedPoint.product``), one input after another."""
    typed = _typed_or_reason(values)
    if isinstance(typed, Untyped):
        return typed
    result = typed[0]
    for value in typed[1:]:
        result = result.product(value)
    return result


def average(layer: Any, values: list[Typed]) -> Typed:
    """The mean of the inputs: their sum divided by their number, fixed point for 2, 4, 8..."""
    return _average(layer, [union(layer, values)], len(values))
