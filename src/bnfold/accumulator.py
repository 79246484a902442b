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

A separable convolution is two MACs (``MacLayerType.kernels``): the depthwise
sums, which QKeras does not round, are the pointwise MAC's input, so its type
is the depthwise accumulator (``MacTypes.before``).

``mode="weights"`` gives instead the narrowest type holding the exact range of
``sum(w * x) + b`` for the actual quantized weights over the input type's range.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from bnfold.errors import (
    InputQuantizerWarning,
    QuantizerError,
    RangeWarning,
    TypeInferenceError,
    UntypedAccumulatorWarning,
)
from bnfold.fixedpoint import FixedPoint
from bnfold.folding import folded_layer_type, folded_weights
from bnfold.graph import propagate
from bnfold.keras import keras
from bnfold.layer_table import check_supported, layer_spec, mac_layer_type
from bnfold.mac import QuantizedWeights, quantized_weights
from bnfold.quantizer_table import as_quantizer
from bnfold.typerules import Typed, Untyped, activation_type, quantizer_type

Mode = Literal["widths", "weights"]
# QKeras's populate_bias_quantizer_from_accumulator assumes this for every input.
DEFAULT_SOURCE_QUANTIZER = "quantized_bits(8,0,1)"


@dataclass(frozen=True)
class MacTypes:
    """The types inferred for one MAC layer.

    Attributes:
        input: type of the values the layer multiplies.
        sum_of_products: type of the sum before the bias is added.
        accumulator: type of the whole accumulator, bias included.
        before: the types of the MAC whose sums this one multiplies (a separable
            convolution's depthwise stage), or None.
    """

    input: FixedPoint
    sum_of_products: FixedPoint
    accumulator: FixedPoint
    before: MacTypes | None = None

    @property
    def layer_input(self) -> FixedPoint:
        """The type of the layer's input: the first MAC's input."""
        return self.input if self.before is None else self.before.layer_input


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


def _required(value: Typed, what: str) -> FixedPoint:
    if isinstance(value, Untyped):
        raise _Float(f"its {what} is not fixed point: {value.reason}")
    return value


class _Float(Exception):
    """A MAC layer's input or kernel has no fixed-point type; the message says why."""


def _mac_types(layer: Any, weights: QuantizedWeights, value: Typed, mode: Mode) -> MacTypes:
    before = None
    if weights.before is not None:
        # QKeras does not round between a separable convolution's two MACs.
        before = _mac_types(layer, weights.before, value, mode)
        value = before.accumulator
    source = _required(value, "input")
    kernel = _required(weights.kernel_type or Untyped("it has no kernel quantizer"), "kernel")
    sum_of_products = source.product(kernel).sum_of(weights.products)
    if weights.bias is None:
        accumulator = sum_of_products
    else:
        # A float bias is the one populate fills, with the sum-of-products type.
        bias = weights.bias_type or sum_of_products
        accumulator = sum_of_products.union(bias).widen(1, 1)
    if mode == "weights":
        accumulator = _exact_accumulator(weights, source, kernel, sum_of_products)
    return MacTypes(source, sum_of_products, accumulator, before)


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
        given: None (each input's own quantizer, see below), one quantizer, or a
            list with one per input; each an object, a string or a config dict.

    With ``given`` None, an input read only by a ``QActivation`` with a
    fixed-point quantizer has that quantizer's type; any other input gets QKeras's
    default, ``quantized_bits(8,0,1)``, with an ``InputQuantizerWarning``.

    Raises:
        QuantizerError: the count is wrong, or a quantizer cannot be read.

    Warns:
        InputQuantizerWarning: naming each input given the default.
    """
    count = len(model.inputs)
    if given is None:
        given = _own_input_quantizers(model)
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


def _own_input_quantizers(model: keras.Model) -> list[Any]:
    """Each input's quantizer: the QActivation that alone reads it, else the default."""
    readers: dict[int, list[Any]] = {index: [] for index in range(len(model.inputs))}

    def visit(layer: Any, values: list[Any], path: str) -> list[Any]:
        for value in values:
            if value is not None:
                readers[value].append(layer)
        return [None]

    propagate(model, list(range(len(model.inputs))), visit)
    quantizers = []
    for index, tensor in enumerate(model.inputs):
        layers = readers[index]
        if (
            len(layers) == 1
            and type(layers[0]).__name__ == "QActivation"
            and isinstance(quantizer_type(layers[0].quantizer, layers[0]), FixedPoint)
        ):
            quantizers.append(layers[0].quantizer)
            continue
        warnings.warn(
            "A model input needs a quantizer to have a fixed-point type: give one "
            "(source_quantizers, --input-quantizer), or read it with a QActivation. "
            f"Received: input {_input_name(tensor)!r} without one; assuming QKeras's "
            f"default {DEFAULT_SOURCE_QUANTIZER}",
            InputQuantizerWarning,
            stacklevel=4,
        )
        quantizers.append(DEFAULT_SOURCE_QUANTIZER)
    return quantizers


def _source_types(model: keras.Model, source_quantizers: Any) -> list[Typed]:
    return [
        Untyped(f"model input {_input_name(tensor)!r} has no source quantizer")
        if quantizer is None
        else FixedPoint.from_quantizer(quantizer, layer=_input_name(tensor))
        for tensor, quantizer in zip(
            model.inputs, source_quantizers_for(model, source_quantizers), strict=True
        )
    ]


@dataclass(frozen=True)
class TypeInference:
    """The types found in one model.

    Attributes:
        macs: every MAC layer by path (``block/conv`` when nested), with its types.
        layers: each layer's input and output types by path (a shared layer: its
            last call).
        outputs: the type of each model output.
        after_float: by path, whether each input of the layer was computed
            after a float op (a quantizer after it may round differently from
            the float reference, so such values are not bit-exact).
        outputs_after_float: the same for each model output.
    """

    macs: dict[str, MacLayer]
    layers: dict[str, tuple[list[Typed], list[Typed]]]
    outputs: list[Typed]
    after_float: dict[str, list[bool]]
    outputs_after_float: list[bool]


def infer_types(
    model: keras.Model,
    source_quantizers: Any = None,
    mode: Mode = "widths",
    *,
    strict: bool = False,
) -> TypeInference:
    """Push types from the model inputs through every layer, nested models included.

    A MAC layer whose input or kernel is not fixed point gets ``types=None`` and
    the reason in ``untyped``; its output is float. Every layer class must be in
    ``bnfold.layer_table``: one that is not is refused first, as itself.

    Raises:
        UnsupportedLayerError: a layer class or activation function bnfold has no entry for.
        TypeInferenceError: with ``strict``, a MAC layer has no accumulator type, or a
            layer computes values wider than float32 holds exactly.

    Warns:
        RangeWarning: without ``strict``, a layer other than a MAC layer computes values
            wider than float32 holds exactly (a Multiply's products), which QKeras rounds.
    """
    if mode not in ("widths", "weights"):
        raise ValueError(f"mode must be 'widths' or 'weights'. Received: mode={mode!r}")
    check_supported(model)
    found: dict[str, MacLayer] = {}
    layers: dict[str, tuple[list[Typed], list[Typed]]] = {}

    def visit(layer: Any, values: list[Typed], path: str) -> list[Typed]:
        outputs = [_layer_type(layer, values, path)]
        layers[path] = (values, outputs)
        return outputs

    def _layer_type(layer: Any, values: list[Typed], path: str) -> Typed:
        if mac_layer_type(layer) is None:
            output = layer_spec(layer).type_rule(layer, values)
            _check_float32_exact(layer, path, values, output, strict)
            return output
        value = values[0]
        if path in found:
            # A shared layer: one type must serve every call.
            weights, previous = found[path].weights, found[path].types
            if previous is None:
                return Untyped(f"layer {path!r} has no accumulator type")
            if not isinstance(value, Untyped):
                value = previous.layer_input.union(value)
        else:
            weights = quantized_weights(layer)
        try:
            types = _mac_types(layer, weights, value, mode)
        except _Float as reason:
            if strict:
                raise TypeInferenceError(
                    f"An accumulator type needs a fixed-point input and kernel. Received: "
                    f"layer={path!r} ({type(layer).__name__}): {reason}"
                ) from None
            found[path] = MacLayer(layer, weights, None, str(reason))
            return Untyped(f"layer {path!r} has no accumulator type: {reason}")
        found[path] = MacLayer(layer, weights, types)
        return activation_type(layer.activation, types.accumulator, layer)

    sources = _source_types(model, source_quantizers)
    outputs = propagate(model, sources, visit)
    after_float: dict[str, list[bool]] = {}

    def follow_float(layer: Any, flags: list[bool], path: str) -> list[bool]:
        after_float[path] = flags
        return [any(flags) or isinstance(layers[path][1][0], Untyped)]

    floats = [isinstance(value, Untyped) for value in sources]
    outputs_after_float = propagate(model, floats, follow_float)
    return TypeInference(found, layers, outputs, after_float, outputs_after_float)


# float32's significand: it holds every value of a fixed-point type with at most this many
# bits besides the sign, and TensorFlow rounds the values of a wider one.
FLOAT32_SIGNIFICAND_BITS = 24


def _check_float32_exact(
    layer: Any, path: str, values: list[Typed], output: Typed, strict: bool
) -> None:
    """Warn, or with ``strict`` refuse, where a layer computes values float32 rounds.

    QKeras computes every layer in float32; fixed-point hardware computes it exactly. A
    layer other than a MAC layer that makes new values (a Multiply's products, an Add's
    sums) whose type has more bits besides the sign than float32's significand, and more
    than each of its inputs (a wider input was rounded before), gives values QKeras
    rounds: the hardware's differ. MAC accumulators are checked at export against the
    hardware's width (``warn_unrepresentable``).
    """
    if not isinstance(output, FixedPoint):
        return
    width = output.bits - output.signed
    widths = [value.bits - value.signed for value in values if isinstance(value, FixedPoint)]
    if width <= FLOAT32_SIGNIFICAND_BITS or any(width <= other for other in widths):
        return
    message = (
        f"A {type(layer).__name__}'s values should fit float32's {FLOAT32_SIGNIFICAND_BITS}-bit "
        "significand, in which QKeras computes them: it rounds wider ones, and fixed-point "
        f"hardware does not. Received: layer={path!r} gives {output.hls()} ({width} bits "
        "besides the sign); quantize its inputs to fewer bits"
    )
    if strict:
        raise TypeInferenceError(message)
    warnings.warn(message, RangeWarning, stacklevel=5)


def mac_types(
    model: keras.Model,
    source_quantizers: Any = None,
    mode: Mode = "widths",
    *,
    strict: bool = False,
) -> dict[str, MacLayer]:
    """Every MAC layer of ``model`` by path (``block/conv`` when nested), with its types.

    See ``infer_types``; a MAC layer without a type has ``types=None``.
    """
    return infer_types(model, source_quantizers, mode, strict=strict).macs


def warn_untyped(macs: dict[str, MacLayer]) -> None:
    """One ``UntypedAccumulatorWarning`` per MAC layer without an accumulator type, saying why."""
    for path, mac in macs.items():
        if mac.types is None:
            warnings.warn(
                "A MAC layer has an accumulator type only when its input and kernel are fixed "
                f"point; this one has none (bnfold.accumulator says '{FLOAT_MARKER}...'). "
                f"Received: layer={path!r} ({type(mac.layer).__name__}): {mac.untyped}",
                UntypedAccumulatorWarning,
                stacklevel=3,
            )


# What ``bnfold.accumulator`` starts with on a MAC layer without a fixed-point type.
FLOAT_MARKER = "float: "


def accumulator_types(
    model: keras.Model,
    source_quantizers: Any = None,
    *,
    mode: Mode = "widths",
    strict: bool = False,
) -> dict[str, FixedPoint]:
    """The accumulator type, bias included, of every multiply-accumulate layer.

    Args:
        model: a Keras model with QKeras, bnfold or plain Keras layers.
        source_quantizers: one quantizer (object, string or config dict) per
            model input; None as in ``source_quantizers_for``.
        mode: "widths" for the type derived from the operand types alone (the
            QKeras and hls4ml convention), "weights" for the narrowest type
            holding every value the actual quantized weights can produce.
        strict: raise instead of warning when a MAC layer has no type.

    Returns:
        Layer path (``"block/conv"`` inside nested models) to accumulator type;
        a MAC layer whose input or kernel is float is left out, with a warning.

    Raises:
        UnsupportedLayerError: a layer class bnfold has no entry for.
        TypeInferenceError: with ``strict``, a MAC layer's input or kernel has no
            fixed-point type.
        QuantizerError: a source quantizer has no fixed-point type.

    Warns:
        UntypedAccumulatorWarning: naming each MAC layer left out, and why.
    """
    macs = mac_types(model, source_quantizers, mode, strict=strict)
    warn_untyped(macs)
    return {path: mac.types.accumulator for path, mac in macs.items() if mac.types is not None}


def _reset_compiled_functions(model: keras.Model) -> None:
    """Forget traced predict/train/test functions, which would keep the old quantizers."""
    model.predict_function = model.train_function = model.test_function = None
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            _reset_compiled_functions(layer)


def populate_bias_quantizer_from_accumulator(
    model: keras.Model, source_quantizers: Sequence[Any] | None, *, strict: bool = False
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
        strict: raise instead of warning when a folded layer has no type.

    Returns:
        ``model``.

    Raises:
        TypeInferenceError: with ``strict``, a MAC layer has a float input or kernel.

    Warns:
        UntypedAccumulatorWarning: a folded layer to fill has a float input or
            kernel; its bias quantizer stays None (QKeras leaves that bias float).
    """
    macs = mac_types(model, source_quantizers, strict=strict)
    unfilled = {}
    for path, mac in macs.items():
        layer = mac.layer
        entry = folded_layer_type(layer)
        if entry is None or layer.bias_quantizer_internal is not None:
            continue
        if mac.types is None:
            unfilled[path] = mac
            continue
        bias_type = mac.types.sum_of_products
        if bias_type.integer < 0:
            # QKeras cannot apply quantized_bits with negative integer bits; same step.
            bias_type = bias_type.widen(-bias_type.integer, -bias_type.integer)
        quantizer = bias_type.to_quantizer(alpha=None)
        layer.bias_quantizer = quantizer
        layer.bias_quantizer_internal = quantizer
        layer.quantizers = [getattr(layer, f"{entry.kernel_quantizer}_internal"), quantizer]
    warn_untyped(unfilled)
    _reset_compiled_functions(model)
    return model


# Hardware accumulators are commonly 32-bit integers (FINN's default, DSP cascades).
MAX_ACCUMULATOR_BITS = 32


def _unquantized_bias(layer: Any) -> np.ndarray | None:
    """The bias before its quantizer: folded first for a folded layer."""
    if folded_layer_type(layer) is not None:
        return folded_weights(layer)[1]
    return np.asarray(layer.bias, dtype=np.float32) if layer.use_bias else None


def warn_unrepresentable(macs: dict[str, MacLayer]) -> None:
    """Warn, naming the layer, about numbers the fixed-point types do not hold.

    A bias beyond its quantizer's range is clipped by QKeras, and by the export
    that reproduces it, so this is a warning, not an error. Rounding (less than
    half a step beyond the range) is not reported. Only a folded layer's bias
    reads "folded bias".
    """
    for path, mac in macs.items():
        bias_type = mac.weights.bias_type
        quantizer = getattr(mac.layer, "bias_quantizer_internal", None)
        if bias_type is not None and quantizer is not None:
            bias = _unquantized_bias(mac.layer)
            low, high = (0.0, 0.0) if bias is None else (float(bias.min()), float(bias.max()))
            margin = bias_type.step / 2
            if low < bias_type.min - margin or high > bias_type.max + margin:
                bias_kind = "folded bias" if folded_layer_type(mac.layer) else "bias"
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
