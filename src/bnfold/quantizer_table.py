"""What bnfold knows about each QKeras quantizer class, one entry each, and the one parser.

An entry (:class:`QuantizerKind`) says which ``FixedPoint`` holds the quantizer's
outputs (its type rule, or why it has none), whether it can quantize an activation
and which op comes before the QONNX ``Quant`` node there, and, as the README shows
them, what it is exported as, whether that is exact, and what hls4ml's ONNX front
end and FINN read of it. The README's table of quantizers is checked against this
one by a test. Quantizer strings, serialized quantizers and quantizer objects all go
through :func:`as_quantizer`; :func:`fixed_point_of` is
``FixedPoint.from_quantizer``.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from bnfold.errors import QuantizerError
from bnfold.fixedpoint import HLS_TYPE, FixedPoint, plain_int
from bnfold.keras import quantizers, tf

__all__ = [
    "QUANTIZERS",
    "QuantizerKind",
    "as_quantizer",
    "describe",
    "fixed_point_of",
    "is_quantizer_name",
    "parse_quantizer",
    "quantizer_kind",
]

# Widths a quantizer may declare. Beyond 64 bits no hardware type or numpy integer
# holds the values; the integer part must keep the largest value and the step
# within float32, in which QKeras computes (2**127 below its largest value, 2**-149
# its smallest subnormal).
MAX_BITS = 64
_FLOAT32_EXPONENTS = range(-149, 128)


_SUPPORTED = (
    "every QKeras quantizer but bernoulli and quantized_ulaw; quantized_relu with "
    "use_sigmoid 0 and negative_slope 0 or a power of two up to 1; quantized_relu_po2 with "
    "negative_slope 0; alpha 'auto', 'auto_po2' or a number other than 1 only on kernels "
    "(allow_scale=True)"
)

# ------------------------------------------------------------------------------ parsing


def parse_quantizer(text: str, *, layer: str | None = None) -> Any:
    """Builds the QKeras quantizer a string names, without evaluating any code.

    Accepts a call of a QKeras quantizer class with literal arguments, such as
    ``"quantized_bits(4,0,1,alpha='auto_po2')"``, or a bare class name (``"binary"``).
    Unlike QKeras's own parser it reads ``None`` as None and rejects unquoted strings.
    Also accepts an hls4ml type as hls4ml users write input types, ``ap_fixed<W,I>``,
    ``ap_ufixed<W,I>``, ``fixed<W,I>`` or ``ufixed<W,I>`` (``I`` counts the sign bit),
    as the ``quantized_bits`` with the same grid: ``ap_fixed<8,4>`` is
    ``quantized_bits(8,3,0,1,alpha=1)`` (not narrow), ``ap_ufixed<8,4>`` is
    ``quantized_bits(8,4,0,0,alpha=1)``.

    Args:
        text: The quantizer string.
        layer: Name of the layer it belongs to, for error messages.

    Returns:
        A ``qkeras.quantizers`` object.

    Raises:
        QuantizerError: If the string is not such a call, names something that is not a
            QKeras quantizer, or QKeras rejects the arguments.
    """
    context = _Context(repr(text), layer)
    if HLS_TYPE.fullmatch(text.strip()):
        return _hls_type_quantizer(text, context)
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        tree = None
    if isinstance(tree, ast.Name):
        tree = ast.Call(func=tree, args=[], keywords=[])
    if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name)):
        raise context.error(
            "A quantizer string must be a QKeras quantizer call with literal arguments, "
            "such as 'quantized_bits(4,0,1)', or an hls4ml type such as 'ap_fixed<8,4>'"
        )
    name = tree.func.id
    if name not in QUANTIZERS:
        raise context.error(f"A quantizer must be a QKeras quantizer; {name!r} is not one")
    try:
        args = [ast.literal_eval(node) for node in tree.args]
        kwargs = {}
        for keyword in tree.keywords:
            if keyword.arg is None:
                raise ValueError("** arguments are not literals")
            kwargs[keyword.arg] = ast.literal_eval(keyword.value)
    except ValueError as exc:
        raise context.error(
            "Quantizer arguments must be literals (numbers, quoted strings, True, False, None)"
        ) from exc
    return _instantiate(name, args, kwargs, context)


def _hls_type_quantizer(text: str, context: _Context) -> Any:
    """The ``quantized_bits`` whose grid is the hls4ml type ``text``; see :func:`parse_quantizer`.

    QKeras 0.9.0 cannot apply a negative ``integer`` and reads 1 signed bit as sign(x).
    """
    unsigned, bits, integer = HLS_TYPE.fullmatch(text.strip()).groups()
    least_bits, least_integer = (1, 0) if unsigned else (2, 1)
    if int(bits) < least_bits or int(integer) < least_integer:
        raise context.error(
            "An hls4ml type is read as a QKeras quantized_bits, which needs W >= 2 and I >= 1 "
            "for ap_fixed<W,I> and fixed<W,I>, W >= 1 and I >= 0 for ap_ufixed and ufixed"
        )
    quantizer = FixedPoint.from_hls(text).to_quantizer()
    _check_widths(quantizer, context)
    return quantizer


def as_quantizer(quantizer: Any, *, layer: str | None = None) -> Any:
    """A QKeras quantizer object from an object, a string or a serialized dict.

    Args:
        quantizer: What a layer or its config holds as a quantizer.
        layer: Name of the layer it belongs to, for error messages.

    Returns:
        The QKeras quantizer object (the same object if one was given).

    Raises:
        QuantizerError: For None, anything that is not a QKeras quantizer, and strings
            or dicts that do not describe one.
    """
    if quantizer is None:
        raise _Context("None", layer).error(
            "A fixed-point quantizer is required; None leaves the values in float"
        )
    if isinstance(quantizer, str):
        return parse_quantizer(quantizer, layer=layer)
    if isinstance(quantizer, dict):
        return _from_config(quantizer, layer)
    name = type(quantizer).__name__
    if name in QUANTIZERS and type(quantizer) is getattr(quantizers, name):
        _check_widths(quantizer, _Context(repr(describe(quantizer)), layer))
        return quantizer
    raise _Context(repr(describe(quantizer)), layer).error(
        "A fixed-point quantizer is required; this is not a QKeras quantizer, so its values "
        "stay float"
    )


def is_quantizer_name(name: Any) -> bool:
    """Whether ``name`` is the class name of a QKeras quantizer (``"quantized_bits"``)."""
    return isinstance(name, str) and name.strip() in QUANTIZERS


def _check_widths(quantizer: Any, context: _Context) -> None:
    """Refuse widths no fixed-point type holds (see ``MAX_BITS``), before any arithmetic."""
    bits = getattr(quantizer, "bits", None)
    integer = getattr(quantizer, "integer", None)
    try:
        bits = None if bits is None else plain_int(bits, "bits")
        integer = None if integer is None else plain_int(integer, "integer")
    except ValueError:
        return  # the converters name the field that is not an integer
    if bits is not None and not 1 <= bits <= MAX_BITS:
        raise context.error(f"A quantizer must have 1 to {MAX_BITS} bits (got {bits})")
    if integer is None:
        return
    exponents = [integer] + ([] if bits is None else [integer - bits])
    if not all(exponent in _FLOAT32_EXPONENTS for exponent in exponents):
        raise context.error(
            "A quantizer's integer part must keep its largest value and its step within "
            f"float32 (2**-149 to 2**127; got integer={integer})"
        )


def _from_config(config: dict, layer: str | None) -> Any:
    """Rebuilds a quantizer from Keras serialization, ``{"class_name", "config"}``."""
    context = _Context(repr(config), layer)
    name = config.get("class_name")
    arguments = config.get("config", {})
    if not isinstance(name, str) or not isinstance(arguments, dict):
        raise context.error(
            "A serialized quantizer must be a dict with a 'class_name' string and a 'config' dict"
        )
    if name not in QUANTIZERS:
        raise context.error(f"A quantizer must be a QKeras quantizer; {name!r} is not one")
    return _instantiate(name, [], dict(arguments), context)


def _instantiate(name: str, args: list, kwargs: dict, context: _Context) -> Any:
    """Calls the QKeras class; its argument checks are asserts, so those are caught too."""
    try:
        quantizer = getattr(quantizers, name)(*args, **kwargs)
    except (TypeError, ValueError, AssertionError, OverflowError) as exc:
        raise context.error(f"QKeras rejects these arguments for {name} ({exc})") from exc
    _check_widths(quantizer, context)
    return quantizer


# --------------------------------------------------------------------------- converters


@dataclass(frozen=True)
class _Context:
    """What an error message about one quantizer needs; ``shown`` is already quoted."""

    shown: str
    layer: str | None
    allow_scale: bool = False

    def error(self, constraint: str) -> QuantizerError:
        where = f"layer={self.layer!r} with " if self.layer is not None else ""
        return QuantizerError(
            f"{constraint}. Received: {where}quantizer={self.shown}. Supported: {_SUPPORTED}."
        )


def describe(quantizer: Any) -> str:
    """The quantizer's QKeras string, or its class and config where ``__str__`` fails."""
    try:
        return str(quantizer)
    except Exception:  # QKeras's __str__ asserts or formats None for some configurations
        config = getattr(quantizer, "get_config", dict)()
        arguments = ",".join(f"{key}={value!r}" for key, value in config.items())
        return f"{type(quantizer).__name__}({arguments})"


def _integer_field(quantizer: Any, field: str, context: _Context) -> int:
    """An integer attribute of a quantizer, refused with the quantizer's context."""
    try:
        return plain_int(getattr(quantizer, field), field)
    except ValueError as exc:
        raise context.error(f"{field} must be an integer") from exc


def _is_one(alpha: Any) -> bool:
    """Whether a numeric alpha (scalar or per-channel array) is 1 everywhere."""
    try:
        values = np.asarray(alpha, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return values.size > 0 and bool(np.all(values == 1.0))


def _check_plain_outputs(quantizer: Any, context: _Context) -> None:
    """A ``qnoise_factor`` below 1 mixes unquantized input into the output."""
    factor = getattr(quantizer, "qnoise_factor", 1.0)
    if hasattr(factor, "numpy"):
        factor = factor.numpy()
    if float(factor) != 1.0:
        raise context.error(f"qnoise_factor must be 1 for outputs on a grid (got {float(factor)})")


def _scaled_grid(name: str, alpha: str, context: _Context) -> None:
    """Refuses a per-channel scale unless the caller said it handles the scale."""
    if alpha not in ("auto", "auto_po2"):
        raise context.error(f"{name} alpha must be None, 1, 'auto' or 'auto_po2'")
    if not context.allow_scale:
        raise context.error(
            f"{name} with alpha={alpha!r} has a per-channel scale that exists only after "
            "it is applied to its tensor, so it has no fixed-point type of its own; pass "
            "allow_scale=True to get the grid the scale multiplies"
        )


def _numeric_alpha(name: str, alpha: Any, context: _Context) -> bool:
    """Whether a numeric ``alpha`` scales the outputs: QKeras multiplies the grid by it.

    Only a kernel can carry that scale (its Quant node's scale, per channel for an
    array); the caller checks that it is a power of two. Elsewhere it is refused.
    """
    if alpha is None or _is_one(alpha):
        return False
    try:
        values = np.asarray(alpha, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise context.error(f"{name} alpha must be None, a number or an array") from exc
    if values.size == 0 or not np.all(np.isfinite(values) & (values > 0)):
        raise context.error(f"{name} alpha must be positive")
    if not context.allow_scale:
        raise context.error(
            f"{name} with alpha={alpha!r} multiplies its outputs by alpha; bnfold exports "
            "that only on kernels (pass allow_scale=True to get the grid alpha multiplies)"
        )
    return True


def _symmetric_field(quantizer: Any, context: _Context) -> bool:
    """``symmetric`` as QKeras uses it: ``-2**(bits-1) + symmetric`` is the lowest code.

    Only 0 and 1 (or False and True) give a grid of this module; 2 would drop two codes.
    """
    value = quantizer.symmetric
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    try:
        number = plain_int(value, "symmetric")
    except ValueError as exc:
        raise context.error("quantized_bits symmetric must be 0 or 1") from exc
    if number not in (0, 1):
        raise context.error("quantized_bits symmetric must be 0 or 1")
    return bool(number)


def _quantized_bits(quantizer: Any, context: _Context) -> FixedPoint:
    """``quantized_bits`` is its own grid, except 1 signed bit, which is sign(x).

    ``symmetric`` makes a signed grid narrow (the lowest code is ``-2**(bits-1) + 1``).
    """
    bits = _integer_field(quantizer, "bits", context)
    integer = _integer_field(quantizer, "integer", context)
    signed = bool(quantizer.keep_negative)
    symmetric = _symmetric_field(quantizer, context)
    _check_plain_outputs(quantizer, context)
    if bits < 1:
        raise context.error("quantized_bits needs at least 1 bit")
    alpha = quantizer.alpha
    if isinstance(alpha, str):
        _scaled_grid("quantized_bits", alpha, context)
        if not signed or bits < 2:
            # With a string alpha QKeras ignores keep_negative and outputs signed levels.
            raise context.error(
                "quantized_bits with alpha 'auto'/'auto_po2' needs keep_negative and at "
                "least 2 bits"
            )
        if not symmetric:
            # QKeras's constructor sets symmetric for a string alpha, and its __call__
            # asserts it; only an object changed afterwards gets here.
            raise context.error("quantized_bits with alpha 'auto'/'auto_po2' must be symmetric")
        # Codes are clipped to +-(2**(bits-1) - 1): the narrow grid.
        return FixedPoint(bits, integer, True, narrow=True)
    _numeric_alpha("quantized_bits", alpha, context)
    if bits == 1 and signed:
        # No magnitude bits left: QKeras outputs sign(x) in {-1, +1}, whatever symmetric.
        return FixedPoint.narrowest_holding(-1.0, 1.0, 1.0)
    return FixedPoint(bits, integer, signed, narrow=symmetric)


def _quantized_relu(quantizer: Any, context: _Context) -> FixedPoint:
    """``quantized_relu`` is the unsigned grid with step ``2**(integer - bits)``.

    With a ``negative_slope`` one bit goes to the sign: step ``2**(integer - bits + 1)``,
    and negative inputs are scaled by the slope, rounded on that step and clipped at
    ``-slope * 2**integer``. QKeras allows only power-of-two slopes, which scale exactly.
    """
    bits = _integer_field(quantizer, "bits", context)
    integer = _integer_field(quantizer, "integer", context)
    _check_plain_outputs(quantizer, context)
    if quantizer.use_sigmoid:
        raise context.error("quantized_relu must have use_sigmoid=0")
    if bits < 1:
        raise context.error("quantized_relu needs at least 1 bit")
    slope = _negative_slope(quantizer, context)
    result = FixedPoint(bits, integer, False)
    if slope:
        if bits < 2:
            raise context.error("quantized_relu with a negative_slope needs at least 2 bits")
        step = math.ldexp(1.0, integer - bits + 1)
        top = math.ldexp(1.0, integer) - step
        result = FixedPoint.narrowest_holding(-slope * math.ldexp(1.0, integer), top, step)
    bound = quantizer.relu_upper_bound
    if bound and not quantizer.is_quantized_clip:
        # QKeras then replaces outputs above the bound by the bound itself.
        if not (bound >= result.max or (bound >= 0 and result.contains(bound))):
            raise context.error(
                "quantized_relu's relu_upper_bound must be on its grid when "
                "is_quantized_clip is False"
            )
    return result


def _negative_slope(quantizer: Any, context: _Context) -> float:
    """A ``quantized_relu``'s negative slope: 0, or a power of two (QKeras asserts that) up to 1.

    Above 1 the export does not reproduce QKeras (measured with a slope of 2).
    """
    slope = float(quantizer.negative_slope)
    if slope != 0 and not (0 < slope <= 1 and math.frexp(slope)[0] == 0.5):
        raise context.error("quantized_relu's negative_slope must be 0 or a power of two up to 1")
    return slope


def _exponent_sign_bit(max_value: float | None) -> int:
    """QKeras spends an exponent bit on its sign unless ``max_value`` is at most 1."""
    return 0 if max_value is not None and max_value <= 1 else 1


def _rounded_log2(log2: float, rounding: str) -> int:
    """Upper bound of QKeras's float32 ``round``/``floor`` of a base-2 logarithm.

    Near a rounding boundary float32 ``log`` may land either side, so take the larger.
    """
    tolerance = 1e-5
    if rounding == "floor":
        ceiling = math.ceil(log2)
        return ceiling if ceiling - log2 < tolerance else math.floor(log2)
    if abs(log2 - math.floor(log2) - 0.5) < tolerance:
        return math.ceil(log2)
    return round(log2)


def _power_of_two(quantizer: Any, context: _Context, *, signed: bool) -> FixedPoint:
    """The narrowest grid holding ``+-2**e`` over the exponents QKeras can output.

    A signed one is narrow: its largest magnitude ``2**e`` needs ``integer > e``.
    """
    name = type(quantizer).__name__
    bits = _integer_field(quantizer, "bits", context)
    _check_plain_outputs(quantizer, context)
    if not signed and quantizer.negative_slope != 0:
        raise context.error("quantized_relu_po2 must have negative_slope=0")
    if quantizer.log2_rounding not in ("rnd", "floor"):
        raise context.error(f"{name} log2_rounding must be 'rnd' or 'floor'")
    max_value = quantizer.max_value
    # Bits left for the exponent magnitude, as QKeras's constructor counts them.
    exponent_bits = bits - signed - _exponent_sign_bit(max_value)
    if exponent_bits < 0:
        raise context.error(f"{name} has too few bits for an exponent")
    min_exp = -(2**exponent_bits)
    max_exp = 2**exponent_bits - 1
    factor = 1
    if quantizer.quadratic_approximation:
        max_exp = 2 * (max_exp // 2)
        factor = 2  # QKeras rounds log2(sqrt(x)) and doubles the clipped exponent.
    top = max_exp
    if max_value is not None:
        # Inputs are clipped to max_value before log2, whose rounding may go above it;
        # max_value 0 sends every input to the smallest exponent.
        top = min_exp
        if max_value > 0:
            top = _rounded_log2(math.log2(max_value) / factor, quantizer.log2_rounding)
        top = min(max(top, min_exp), max_exp)
    # Inputs below Keras's epsilon (zero included) map to 2**min_exp, not doubled.
    high_exp = max(factor * top, min_exp)
    low_exp = factor * min_exp
    high = math.ldexp(1.0, high_exp)
    low = -high if signed else math.ldexp(1.0, low_exp)
    return FixedPoint.narrowest_holding(low, high, math.ldexp(1.0, low_exp))


def _binary(quantizer: Any, context: _Context) -> FixedPoint:
    """``binary`` outputs +-1 (narrow ``sfixed(2,1)``), or 0 and 1 with ``use_01``."""
    alpha = quantizer.alpha
    if isinstance(alpha, str):
        _scaled_grid("binary", alpha, context)
    else:
        _numeric_alpha("binary", alpha, context)
    if quantizer.use_01:
        return FixedPoint.narrowest_holding(0.0, 1.0, 1.0)
    return FixedPoint.narrowest_holding(-1.0, 1.0, 1.0)


def _ternary(quantizer: Any, context: _Context) -> FixedPoint:
    """``ternary`` outputs -1, 0 and 1: narrow ``sfixed(2,1)``, which never has -2."""
    alpha = quantizer.alpha
    if isinstance(alpha, str):
        _scaled_grid("ternary", alpha, context)
        if quantizer.threshold is not None:
            raise context.error("ternary with alpha 'auto'/'auto_po2' needs threshold=None")
    else:
        _numeric_alpha("ternary", alpha, context)
        if quantizer.use_stochastic_rounding:
            raise context.error("ternary with a numeric alpha needs use_stochastic_rounding=False")
        if isinstance(quantizer.threshold, str):
            raise context.error("ternary threshold must be None or a number")
    return FixedPoint.narrowest_holding(-1.0, 1.0, 1.0)


def _quantized_tanh(quantizer: Any, context: _Context) -> FixedPoint:
    """``quantized_tanh`` rounds to ``bits`` signed bits with step ``2**(1 - bits)``.

    Its outputs lie in ``[-1, 1 - step]``; ``symmetric`` drops -1 (the narrow grid).
    """
    bits = _integer_field(quantizer, "bits", context)
    if bits < 1:
        raise context.error("quantized_tanh needs at least 1 bit")
    return FixedPoint(bits, 0, True, narrow=bool(quantizer.symmetric))


def _quantized_sigmoid(quantizer: Any, context: _Context) -> FixedPoint:
    """``quantized_sigmoid`` rounds to ``bits`` unsigned bits with step ``2**-bits``.

    ``symmetric`` only raises the lowest output from 0 to one step, still on this grid.
    """
    bits = _integer_field(quantizer, "bits", context)
    if bits < 1:
        raise context.error("quantized_sigmoid needs at least 1 bit")
    return FixedPoint(bits, 0, False)


def _quantized_hswish(quantizer: Any, context: _Context) -> FixedPoint:
    """``quantized_hswish`` is a ``quantized_bits`` applied to the hard swish of its input."""
    if not (quantizer.relu_shift > 0 and quantizer.relu_upper_bound > 0):
        raise context.error("quantized_hswish needs a positive relu_shift and relu_upper_bound")
    return _quantized_bits(quantizer, context)


# ---------------------------------------------------------------------------- the table


def _unchanged(quantizer: Any, x: Any) -> Any:
    """Nothing before the Quant node: the quantizer rounds and saturates its input."""
    return x


def _relu(quantizer: Any, x: Any) -> Any:
    """``quantized_relu``: a Relu, or with a slope a LeakyRelu clipped where QKeras clips."""
    slope = float(quantizer.negative_slope)
    if not slope:
        return tf.nn.relu(x)
    lowest = -slope * 2.0 ** float(plain_int(quantizer.integer, "integer"))
    return tf.maximum(tf.nn.leaky_relu(x, alpha=slope), lowest)


def _qkeras_ops(quantizer: Any, x: Any) -> Any:
    """The quantizer's own TensorFlow ops (for power-of-two exponents: Log, Round, Pow)."""
    return quantizer(x)


def _ternary_threshold(quantizer: Any, x: Any) -> Any:
    """``x / (2 * threshold)``: the Quant after it, rounding halves up, gives +-1 where
    ``|x| >= threshold`` and 0 elsewhere, as QKeras's comparison does."""
    threshold = quantizer.default_threshold if quantizer.threshold is None else quantizer.threshold
    return tf.math.divide(x, tf.constant(2.0 * float(threshold), tf.float32))


def _internal_sigmoid(x: Any) -> Any:
    """QKeras's internal sigmoid (hard by default; ``set_internal_sigmoid`` changes it)."""
    return quantizers._sigmoid(x)


def _tanh(quantizer: Any, x: Any) -> Any:
    """What ``quantized_tanh`` rounds: tanh, or ``2 * sigmoid(x) - 1`` with QKeras's sigmoid."""
    if quantizer.use_real_tanh:
        return tf.math.tanh(x)
    return 2.0 * _internal_sigmoid(x) - 1.0


def _sigmoid(quantizer: Any, x: Any) -> Any:
    """What ``quantized_sigmoid`` rounds; ``symmetric`` lifts it to at least one step."""
    p = tf.math.sigmoid(x) if quantizer.use_real_sigmoid else _internal_sigmoid(x)
    if quantizer.symmetric:
        # QKeras clips the rounded value at one step; clipping first rounds the same.
        p = tf.maximum(p, 2.0 ** -float(plain_int(quantizer.bits, "bits")))
    return p


def _hswish(quantizer: Any, x: Any) -> Any:
    """The hard swish ``quantized_hswish`` computes before its ``quantized_bits``."""
    shifted = x + quantizer.relu_shift
    bound = quantizer.relu_upper_bound
    clipped = tf.where(shifted <= bound, tf.nn.relu(shifted), tf.ones_like(shifted) * bound)
    return tf.math.multiply(x, clipped) / bound


@dataclass(frozen=True)
class ActivationForm:
    """How a quantizer on an activation is exported: a float op, then a QONNX node.

    Attributes:
        before: the float op before the node, from the quantizer and the tensor; the
            strip stage applies it in the float model, tf2onnx converts it.
        node: ``"Quant"``, or ``"BipolarQuant"`` (outputs +-1, +1 for 0).
        rounding: the Quant node's ``rounding_mode``.
    """

    before: Callable[[Any, Any], Any] = _unchanged
    node: str = "Quant"
    rounding: str = "ROUND"


@dataclass(frozen=True)
class QuantizerKind:
    """What bnfold does with one QKeras quantizer class.

    On kernels and biases every quantizer with a type is exported alike: the
    initializer holds the values QKeras computed, and a Quant node of the type's grid
    (times the per-channel scale, if any) gives them back exactly.

    Attributes:
        name: the QKeras class name.
        type_rule: the ``FixedPoint`` holding every output at inference, from the
            quantizer object; None for a quantizer without one.
        refused: why it has no fixed-point type, for a ``type_rule`` of None.
        activation: how it is exported on an activation; None where it is not.
        onnx: what it is exported as, as the README shows it.
        exact: "exact" when the export reproduces QKeras bit for bit, or the condition.
        hls4ml: what hls4ml 1.3.0's ONNX front end makes of it.
        finn: what FINN (through QONNX) makes of it.
    """

    name: str
    type_rule: Callable[[Any, _Context], FixedPoint] | None
    refused: str | None
    activation: ActivationForm | None
    onnx: str
    exact: str
    hls4ml: str
    finn: str


_RANDOM = "it samples its output at random, in inference too"
_REFUSED = ("refused (QuantizerError)", "-", "-", "-")
_ON_WEIGHTS = "Quant on weights"
_FLOAT_OP_EXACT = "exact where onnxruntime's float op rounds as TensorFlow's (checked at export)"


def _po2(signed: bool) -> Callable[[Any, _Context], FixedPoint]:
    return lambda quantizer, context: _power_of_two(quantizer, context, signed=signed)


# What FINN's build steps made of the quantizers in the test models (README, FINN section).
_FINN_BINARY = (
    "weights yes; activations after a Dense yes, after a convolution no (step_convert_to_hw "
    "stops: MultiThreshold out_scale must be 1)"
)
_FINN_HARD_SIGMOID = (
    "Tanh/Sigmoid: yes (PWPolyF); the hard sigmoid: no (its Min stays in software at "
    "step_convert_to_hw)"
)

QUANTIZERS: dict[str, QuantizerKind] = {
    kind.name: kind
    for kind in (
        QuantizerKind(
            "quantized_bits",
            _quantized_bits,
            None,
            ActivationForm(),
            "Quant; a numeric alpha (power of two, kernels only) is the Quant scale",
            "exact",
            "yes",
            "yes",
        ),
        QuantizerKind(
            "quantized_relu",
            _quantized_relu,
            None,
            ActivationForm(_relu),
            "Relu + Quant (negative_slope, a power of two: LeakyRelu + Max + Quant)",
            "exact",
            "yes (negative_slope: no, it fails on the Max with a constant: IndexError)",
            "yes (negative_slope: no, its LeakyRelu stays in software at step_convert_to_hw)",
        ),
        QuantizerKind(
            "quantized_po2",
            _po2(True),
            None,
            ActivationForm(_qkeras_ops),
            f"{_ON_WEIGHTS} (the grid holding the powers of two); on activations QKeras's "
            "ops (Abs, Log, Round, Min, Max, Pow, Sign, ...) + Quant",
            f"exact on weights; on activations {_FLOAT_OP_EXACT}",
            "weights yes; activations no (no handler for Log)",
            "weights yes; activations no (streamlined exactly, then step_convert_to_hw stops: "
            "MultiThreshold out_scale must be 1)",
        ),
        QuantizerKind(
            "quantized_relu_po2",
            _po2(False),
            None,
            ActivationForm(_qkeras_ops),
            f"{_ON_WEIGHTS} (the grid holding the powers of two); on activations QKeras's "
            "ops (Relu, Log, Round, Min, Max, Pow, ...) + Quant",
            f"exact on weights; on activations {_FLOAT_OP_EXACT}",
            "weights yes; activations no (no handler for Log)",
            "weights yes; activations no (its Log, Pow, Round, Neg, Not, Cast stay in software "
            "at step_convert_to_hw)",
        ),
        QuantizerKind(
            "binary",
            _binary,
            None,
            ActivationForm(node="BipolarQuant"),
            f"{_ON_WEIGHTS}; BipolarQuant on activations (not use_01)",
            "exact",
            "yes",
            _FINN_BINARY,
        ),
        QuantizerKind(
            "stochastic_binary",
            _binary,
            None,
            ActivationForm(node="BipolarQuant"),
            "as binary (deterministic at inference)",
            "exact",
            "yes",
            _FINN_BINARY,
        ),
        QuantizerKind(
            "ternary",
            _ternary,
            None,
            ActivationForm(_ternary_threshold, rounding="HALF_UP"),
            f"{_ON_WEIGHTS}; on activations Mul by 1/(2*threshold) + Quant (HALF_UP)",
            "exact on weights; on activations exact unless an input lies within float32 "
            "rounding of the threshold (checked at export)",
            "weights yes; activations no (its Quant reads only ROUND and FLOOR)",
            "yes",
        ),
        QuantizerKind(
            "stochastic_ternary",
            _ternary,
            None,
            ActivationForm(_ternary_threshold, rounding="HALF_UP"),
            "as ternary (deterministic at inference)",
            "as ternary",
            "weights yes; activations no (its Quant reads only ROUND and FLOOR)",
            "yes",
        ),
        QuantizerKind(
            "quantized_tanh",
            _quantized_tanh,
            None,
            ActivationForm(_tanh),
            "2 * hard sigmoid - 1 (Mul, Add, Min, Max) or Tanh (use_real_tanh) + Quant",
            f"exact with the hard sigmoid; Tanh: {_FLOAT_OP_EXACT}",
            "no (hls4ml 1.3.0 fails on its Min/Max with a constant: IndexError)",
            _FINN_HARD_SIGMOID,
        ),
        QuantizerKind(
            "quantized_sigmoid",
            _quantized_sigmoid,
            None,
            ActivationForm(_sigmoid),
            "hard sigmoid (Mul, Add, Min, Max) or Sigmoid (use_real_sigmoid) + Quant",
            f"exact with the hard sigmoid; Sigmoid: {_FLOAT_OP_EXACT}",
            "no (hls4ml 1.3.0 fails on its Min/Max with a constant: IndexError)",
            _FINN_HARD_SIGMOID,
        ),
        QuantizerKind(
            "quantized_hswish",
            _quantized_hswish,
            None,
            ActivationForm(_hswish),
            "hard swish (Add, LessOrEqual, Not, Cast, Relu, Mul) + Quant",
            _FLOAT_OP_EXACT,
            "no (no handler for LessOrEqual)",
            "no (exact through step_streamline with --round-half-even; at step_convert_to_hw its"
            " LessOrEqual becomes a hardware layer with a float output, which the Not left in"
            " software refuses)",
        ),
        QuantizerKind("bernoulli", None, _RANDOM, None, *_REFUSED),
        QuantizerKind(
            "quantized_ulaw",
            None,
            "its levels are u-law companded, not a uniform grid",
            None,
            *_REFUSED,
        ),
    )
}


def quantizer_kind(quantizer: Any) -> QuantizerKind:
    """The table entry of a QKeras quantizer object (see :func:`as_quantizer`)."""
    return QUANTIZERS[type(quantizer).__name__]


def fixed_point_of(
    quantizer: Any, *, layer: str | None = None, allow_scale: bool = False
) -> FixedPoint:
    """The type holding every output of a QKeras quantizer; see ``FixedPoint.from_quantizer``."""
    quantizer = as_quantizer(quantizer, layer=layer)
    context = _Context(repr(describe(quantizer)), layer, allow_scale)
    kind = quantizer_kind(quantizer)
    if kind.type_rule is None:
        raise context.error(f"{kind.name} has no fixed-point type ({kind.refused})")
    return kind.type_rule(quantizer, context)
