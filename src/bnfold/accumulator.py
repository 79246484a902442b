"""Accumulator types of multiply-accumulate layers, and filling empty bias quantizers.

Types flow from the model inputs (``source_quantizers``) through the graph: a
layer with a quantized output takes its quantizer's type, other layers the type
their operation implies (``_LAYER_RULES``). At each MAC layer, in the default
``mode="widths"``, the convention of QKeras's qtools, kept where it is right:

    products     = input x weight          bits and integer bits add
    sum          = products grown by ceil(log2(n))   n = products summed per output
    accumulator  = sum + bias              one more bit and integer bit

``sum`` is what ``populate_bias_quantizer_from_accumulator`` gives a folded
layer without a bias quantizer; hls4ml's own precision inference then lands on
the same accumulator. Where qtools is wrong, bnfold differs: a depthwise layer
sums kh*kw products per output, not kh*kw*channels; a kernel with per-channel
power-of-two scales (``alpha="auto_po2"``, what QKeras layers make of a kernel
quantizer with ``alpha=None``) has its binary point moved by those scales; and
the product of two full-range signed types needs one more integer bit.

``mode="weights"`` gives instead the narrowest type holding the exact range of
``sum(w * x) + b`` for the actual quantized weights over the input type's range.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from bnfold.errors import QuantizerError, RangeWarning, TypeInferenceError
from bnfold.fixedpoint import FixedPoint, as_quantizer
from bnfold.folding import folded_layer_type, folded_weights
from bnfold.graph import propagate
from bnfold.keras import keras
from bnfold.mac import QuantizedWeights, mac_layer_type, quantized_weights

Mode = Literal["widths", "weights"]
# QKeras's populate_bias_quantizer_from_accumulator assumes this for every input.
DEFAULT_SOURCE_QUANTIZER = "quantized_bits(8,0,1)"


@dataclass(frozen=True)
class Untyped:
    """A value without a fixed-point type, and why: reported if a MAC layer needs it."""

    reason: str


Typed = FixedPoint | Untyped


@dataclass(frozen=True)
class MacTypes:
    """The types inferred for one MAC layer.

    Attributes:
        input: type of the values the layer multiplies.
        sum_of_products: type of the sum before the bias is added.
        accumulator: type of the whole accumulator, bias included.
    """

    input: FixedPoint
    sum_of_products: FixedPoint
    accumulator: FixedPoint


@dataclass(frozen=True)
class MacLayer:
    """One MAC layer with the weights it computes with and its inferred types.

    ``types`` is None only from ``mac_types(..., strict=False)``, for a layer whose
    input or kernel has no fixed-point type; ``untyped`` then says why.
    """

    layer: Any
    weights: QuantizedWeights
    types: MacTypes | None
    untyped: str | None = None


def _relu(value: Typed) -> Typed:
    if isinstance(value, Untyped) or not value.signed:
        return value
    return FixedPoint(value.bits - 1, value.integer, False)


def _quantizer_type(quantizer: Any, layer: Any) -> Typed:
    try:
        return FixedPoint.from_quantizer(quantizer, layer=layer.name)
    except QuantizerError as error:
        return Untyped(str(error))


def _activation_type(activation: Any, value: Typed, layer: Any) -> Typed:
    """The type after a layer's activation function or quantizer."""
    name = getattr(activation, "__name__", None)
    if activation is None or name == "linear":
        return value
    if name == "relu":
        return _relu(value)
    if type(activation).__module__.startswith("qkeras"):
        return _quantizer_type(activation, layer)
    return Untyped(
        f"layer {layer.name!r} applies activation {name or activation!r}, which has no "
        "fixed-point type"
    )


def _same(layer: Any, values: list[Typed]) -> Typed:
    return values[0]


def _relu_layer(layer: Any, values: list[Typed]) -> Typed:
    if layer.max_value is None and float(layer.negative_slope) == 0 and float(layer.threshold) == 0:
        return _relu(values[0])
    return Untyped(f"layer {layer.name!r} is a ReLU with a slope, threshold or maximum")


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


def _average_pooling(layer: Any, values: list[Typed]) -> Typed:
    if layer.padding != "valid":
        return Untyped(f"layer {layer.name!r} averages partial windows (padding='same')")
    return _average(layer, values, math.prod(layer.pool_size))


def _global_average_pooling(layer: Any, values: list[Typed]) -> Typed:
    shape = layer.input_shape
    spatial = shape[1:-1] if layer.data_format == "channels_last" else shape[2:]
    return _average(layer, values, math.prod(spatial) if None not in spatial else None)


def _union(values: list[Typed]) -> Typed:
    untyped = [value for value in values if isinstance(value, Untyped)]
    if untyped:
        return untyped[0]
    result = values[0]
    for value in values[1:]:
        result = result.union(value)
    return result


def _add(layer: Any, values: list[Typed]) -> Typed:
    total = _union(values)
    return total if isinstance(total, Untyped) else total.sum_of(len(values))


# Layers whose outputs are some of their input values, moved or selected, or zeros.
VALUE_PRESERVING_LAYERS = (
    "MaxPooling1D",
    "MaxPooling2D",
    "GlobalMaxPooling1D",
    "GlobalMaxPooling2D",
    "Flatten",
    "Reshape",
    "Permute",
    "ZeroPadding1D",
    "ZeroPadding2D",
    "Cropping1D",
    "Cropping2D",
    "Dropout",
    "SpatialDropout1D",
    "SpatialDropout2D",
)

_LAYER_RULES: dict[str, Callable[[Any, list[Typed]], Typed]] = {
    "QActivation": lambda layer, values: _quantizer_type(layer.quantizer, layer),
    "Activation": lambda layer, values: _activation_type(layer.activation, values[0], layer),
    "ReLU": _relu_layer,
    "Add": _add,
    "Concatenate": lambda layer, values: _union(values),
    "AveragePooling1D": _average_pooling,
    "AveragePooling2D": _average_pooling,
    "GlobalAveragePooling1D": _global_average_pooling,
    "GlobalAveragePooling2D": _global_average_pooling,
    **dict.fromkeys(VALUE_PRESERVING_LAYERS, _same),
}


def _required(value: Typed, layer: Any, what: str) -> FixedPoint:
    if isinstance(value, Untyped):
        raise TypeInferenceError(
            f"An accumulator type needs a fixed-point {what}. Received: layer={layer.name!r} "
            f"({type(layer).__name__}) whose {what} has none: {value.reason}"
        )
    return value


def _mac_types(layer: Any, weights: QuantizedWeights, value: Typed, mode: Mode) -> MacTypes:
    source = _required(value, layer, "input")
    kernel = _required(
        weights.kernel_type or Untyped("the kernel is float (no kernel quantizer)"),
        layer,
        "kernel",
    )
    sum_of_products = source.product(kernel).sum_of(weights.products)
    if weights.bias is None:
        accumulator = sum_of_products
    else:
        # A float bias is the one populate fills, with the sum-of-products type.
        bias = weights.bias_type or sum_of_products
        accumulator = sum_of_products.union(bias).widen(1, 1)
    if mode == "weights":
        accumulator = _exact_accumulator(weights, source, kernel, sum_of_products)
    return MacTypes(source, sum_of_products, accumulator)


def _exact_accumulator(
    weights: QuantizedWeights, source: FixedPoint, kernel: FixedPoint, sum_of_products: FixedPoint
) -> FixedPoint:
    """The narrowest type holding every value of ``sum(w * x) + b`` for x in the input range."""
    values = weights.kernel.astype(np.float64)
    positive = np.where(values > 0, values, 0).sum(axis=weights.summed_axes)
    negative = np.where(values < 0, values, 0).sum(axis=weights.summed_axes)
    high = positive * source.max + negative * source.min
    low = positive * source.min + negative * source.max
    step = source.step * kernel.step
    if weights.bias is not None:
        bias_type = weights.bias_type or sum_of_products
        bias = weights.bias.astype(np.float64)
        if weights.bias_type is None:
            bias = bias_type.quantize(bias)
        high, low = high + bias.reshape(high.shape), low + bias.reshape(low.shape)
        step = min(step, bias_type.step)
    return FixedPoint.narrowest_holding(float(low.min()), float(high.max()), step)


def source_quantizers_for(model: keras.Model, given: Any) -> list[Any]:
    """One QKeras quantizer object per model input (None for a float input).

    Args:
        model: the model whose inputs they describe.
        given: None (QKeras's default for every input), one quantizer, or a
            list with one per input; each an object, a string or a config dict.

    Raises:
        QuantizerError: the count is wrong, or a quantizer cannot be read.
    """
    count = len(model.inputs)
    if given is None:
        given = [DEFAULT_SOURCE_QUANTIZER] * count
    elif not isinstance(given, list | tuple):
        given = [given]
    if len(given) != count:
        raise QuantizerError(
            f"source_quantizers needs one quantizer per model input ({count}). "
            f"Received: {len(given)} quantizers"
        )
    return [
        None if quantizer is None else as_quantizer(quantizer, layer=_input_name(tensor))
        for tensor, quantizer in zip(model.inputs, given, strict=True)
    ]


def _input_name(tensor: Any) -> str:
    return tensor.name.split(":")[0]


def _source_types(model: keras.Model, source_quantizers: Any) -> list[Typed]:
    return [
        Untyped(f"model input {_input_name(tensor)!r} has no source quantizer")
        if quantizer is None
        else FixedPoint.from_quantizer(quantizer, layer=_input_name(tensor))
        for tensor, quantizer in zip(
            model.inputs, source_quantizers_for(model, source_quantizers), strict=True
        )
    ]


def mac_types(
    model: keras.Model, source_quantizers: Any = None, mode: Mode = "widths", *, strict: bool = True
) -> dict[str, MacLayer]:
    """Every MAC layer of ``model`` by path (``block/conv`` when nested), with its types.

    With ``strict`` a MAC layer whose input or kernel is float raises
    ``TypeInferenceError``; without, it gets ``types=None`` (a float layer has
    no accumulator type, and neither has whatever its output feeds).
    """
    if mode not in ("widths", "weights"):
        raise ValueError(f"mode must be 'widths' or 'weights'. Received: mode={mode!r}")
    found: dict[str, MacLayer] = {}

    def visit(layer: Any, values: list[Typed], path: str) -> list[Typed]:
        if mac_layer_type(layer) is None:
            rule = _LAYER_RULES.get(type(layer).__name__)
            if rule is None:
                return [
                    Untyped(
                        f"bnfold has no type rule for layer {layer.name!r} ({type(layer).__name__})"
                    )
                ]
            return [rule(layer, values)]
        value = values[0]
        if path in found:
            # A shared layer: one type must serve every call.
            weights, previous = found[path].weights, found[path].types
            if previous is None:
                return [Untyped(found[path].untyped or "")]
            if not isinstance(value, Untyped):
                value = previous.input.union(value)
        else:
            weights = quantized_weights(layer)
        try:
            types = _mac_types(layer, weights, value, mode)
        except TypeInferenceError as error:
            if strict:
                raise
            found[path] = MacLayer(layer, weights, None, str(error))
            return [Untyped(str(error))]
        found[path] = MacLayer(layer, weights, types)
        return [_activation_type(layer.activation, types.accumulator, layer)]

    propagate(model, _source_types(model, source_quantizers), visit)
    return found


def accumulator_types(
    model: keras.Model, source_quantizers: Any = None, *, mode: Mode = "widths"
) -> dict[str, FixedPoint]:
    """The accumulator type, bias included, of every multiply-accumulate layer.

    Args:
        model: a Keras model with QKeras, bnfold or plain Keras layers.
        source_quantizers: one quantizer (object, string or config dict) per
            model input; None gives each input QKeras's default,
            ``quantized_bits(8,0,1)``.
        mode: "widths" for the type derived from the operand types alone (the
            QKeras and hls4ml convention), "weights" for the narrowest type
            holding every value the actual quantized weights can produce.

    Returns:
        Layer path (``"block/conv"`` inside nested models) to accumulator type.

    Raises:
        TypeInferenceError: a MAC layer's input or kernel has no fixed-point type.
        QuantizerError: a source quantizer has no fixed-point type.
    """
    return {
        path: mac.types.accumulator
        for path, mac in mac_types(model, source_quantizers, mode).items()
    }


def _reset_compiled_functions(model: keras.Model) -> None:
    """Forget traced predict/train/test functions, which would keep the old quantizers."""
    model.predict_function = model.train_function = model.test_function = None
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            _reset_compiled_functions(layer)


def populate_bias_quantizer_from_accumulator(
    model: keras.Model, source_quantizers: Sequence[Any] | None
) -> keras.Model:
    """Give each folded layer without a bias quantizer the type of its sum of products.

    Same contract as QKeras's function of that name: layers whose bias
    quantizer the user set are left alone, and the model is changed in place and
    returned. Works on every topology, nested models included, and on all three
    folded layer types. The model's own ``predict`` uses the new quantizers.

    Args:
        model: a model with folded layers.
        source_quantizers: one quantizer per model input (objects, strings or
            config dicts); None for QKeras's default ``quantized_bits(8,0,1)``.

    Returns:
        ``model``.

    Raises:
        TypeInferenceError: a folded layer to fill has a float input or kernel
            (other layers may be float).
    """
    for mac in mac_types(model, source_quantizers, strict=False).values():
        layer = mac.layer
        entry = folded_layer_type(layer)
        if entry is None or layer.bias_quantizer_internal is not None:
            continue
        if mac.types is None:
            raise TypeInferenceError(mac.untyped)
        bias_type = mac.types.sum_of_products
        if bias_type.integer < 0:
            # QKeras cannot apply quantized_bits with negative integer bits; same step.
            bias_type = bias_type.widen(-bias_type.integer, -bias_type.integer)
        quantizer = bias_type.to_quantizer(alpha=None)
        layer.bias_quantizer = quantizer
        layer.bias_quantizer_internal = quantizer
        layer.quantizers = [getattr(layer, f"{entry.kernel_quantizer}_internal"), quantizer]
    _reset_compiled_functions(model)
    return model


# Hardware accumulators are commonly 32-bit integers (FINN's default, DSP cascades).
MAX_ACCUMULATOR_BITS = 32


def _unquantized_bias(layer: Any) -> np.ndarray | None:
    """The bias before its quantizer: folded first for a folded layer."""
    if folded_layer_type(layer) is not None:
        return folded_weights(layer)[1]
    return np.asarray(layer.bias, dtype=np.float32) if layer.use_bias else None


def warn_unrepresentable(macs: dict[str, MacLayer], *, folded: Collection[str] = ()) -> None:
    """Warn, naming the layer, about numbers the fixed-point types do not hold.

    A bias beyond its quantizer's range is clipped by QKeras, and by the export
    that reproduces it, so this is a warning, not an error. Rounding (less than
    half a step beyond the range) is not reported. ``folded`` names the layers of an
    unfolded model that were folded layers, so that only their bias reads "folded bias".
    """
    for path, mac in macs.items():
        bias_type = mac.weights.bias_type
        quantizer = getattr(mac.layer, "bias_quantizer_internal", None)
        if bias_type is not None and quantizer is not None:
            bias = _unquantized_bias(mac.layer)
            low, high = (0.0, 0.0) if bias is None else (float(bias.min()), float(bias.max()))
            margin = bias_type.step / 2
            if low < bias_type.min - margin or high > bias_type.max + margin:
                was_folded = path in folded or folded_layer_type(mac.layer) is not None
                bias_kind = "folded bias" if was_folded else "bias"
                warnings.warn(
                    f"A {bias_kind} should lie within its bias quantizer's range; QKeras clips "
                    f"it, and so does the export. Received: layer={path!r} with {bias_kind} in "
                    f"[{low:g}, {high:g}] and bias quantizer {quantizer} holding "
                    f"[{bias_type.min:g}, {bias_type.max:g}]",
                    RangeWarning,
                    stacklevel=2,
                )
        accumulator = mac.types and mac.types.accumulator
        if accumulator is not None and accumulator.bits > MAX_ACCUMULATOR_BITS:
            warnings.warn(
                f"An accumulator should fit in {MAX_ACCUMULATOR_BITS} bits, the width many "
                f"hardware kernels accumulate in. Received: layer={path!r} needs "
                f"{accumulator.hls()} ({accumulator.bits} bits)",
                RangeWarning,
                stacklevel=2,
            )
