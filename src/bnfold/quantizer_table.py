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
    "quantized_bits (alpha None or 1), quantized_relu (use_sigmoid 0, negative_slope 0), "
    "quantized_po2, quantized_relu_po2 (negative_slope 0), binary and ternary "
    "(alpha None or 1); alpha 'auto' or 'auto_po2' only on kernels (allow_scale=True)"
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
        _check_widths(quantizer, _Context(repr(_describe(quantizer)), layer))
        return quantizer
    raise _Context(repr(_describe(quantizer)), layer).error(
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


def _describe(quantizer: Any) -> str:
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
    if alpha is not None and not _is_one(alpha):
        raise context.error("quantized_bits alpha must be None or 1")
    if bits == 1 and signed:
        # No magnitude bits left: QKeras outputs sign(x) in {-1, +1}, whatever symmetric.
        return FixedPoint.narrowest_holding(-1.0, 1.0, 1.0)
    return FixedPoint(bits, integer, signed, narrow=symmetric)


def _quantized_relu(quantizer: Any, context: _Context) -> FixedPoint:
    """``quantized_relu`` is the unsigned grid with step ``2**(integer - bits)``."""
    bits = _integer_field(quantizer, "bits", context)
    integer = _integer_field(quantizer, "integer", context)
    _check_plain_outputs(quantizer, context)
    if quantizer.use_sigmoid:
        raise context.error("quantized_relu must have use_sigmoid=0")
    if quantizer.negative_slope != 0:
        raise context.error("quantized_relu must have negative_slope=0")
    if bits < 1:
        raise context.error("quantized_relu needs at least 1 bit")
    result = FixedPoint(bits, integer, False)
    bound = quantizer.relu_upper_bound
    if bound and not quantizer.is_quantized_clip:
        # QKeras then replaces outputs above the bound by the bound itself.
        if not (bound >= result.max or (bound >= 0 and result.contains(bound))):
            raise context.error(
                "quantized_relu's relu_upper_bound must be on its grid when "
                "is_quantized_clip is False"
            )
    return result


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
    elif alpha is not None and not _is_one(alpha):
        raise context.error("binary alpha must be None or 1")
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
        if alpha is not None and not _is_one(alpha):
            raise context.error("ternary alpha must be None or 1")
        if quantizer.use_stochastic_rounding:
            raise context.error("ternary with a numeric alpha needs use_stochastic_rounding=False")
        if isinstance(quantizer.threshold, str):
            raise context.error("ternary threshold must be None or a number")
    return FixedPoint.narrowest_holding(-1.0, 1.0, 1.0)


# ---------------------------------------------------------------------------- the table


def _unchanged(quantizer: Any, x: Any) -> Any:
    """Nothing before the Quant node: the quantizer rounds and saturates its input."""
    return x


def _relu(quantizer: Any, x: Any) -> Any:
    """A Relu before the Quant node: ``quantized_relu`` outputs 0 for negative inputs."""
    return tf.nn.relu(x)


@dataclass(frozen=True)
class QuantizerKind:
    """What bnfold does with one QKeras quantizer class.

    Attributes:
        name: the QKeras class name.
        type_rule: the ``FixedPoint`` holding every output at inference, from the
            quantizer object; None for a quantizer without one.
        refused: why it has no fixed-point type, for a ``type_rule`` of None.
        activation: on an activation, the float op the float model applies before the
            Quant node (tf2onnx converts it), from the quantizer and the tensor; None
            where the quantizer is not exported on activations.
        onnx: what it is exported as, as the README shows it.
        exact: "exact" when the export reproduces QKeras bit for bit, or the condition.
        hls4ml: what hls4ml 1.3.0's ONNX front end makes of it.
        finn: what FINN (through QONNX) makes of it.
    """

    name: str
    type_rule: Callable[[Any, _Context], FixedPoint] | None
    refused: str | None
    activation: Callable[[Any, Any], Any] | None
    onnx: str
    exact: str
    hls4ml: str
    finn: str


_RANDOM = "it samples its output at random"

QUANTIZERS: dict[str, QuantizerKind] = {
    kind.name: kind
    for kind in (
        QuantizerKind(
            "quantized_bits",
            _quantized_bits,
            None,
            _unchanged,
            "Quant",
            "exact",
            "yes",
            "yes",
        ),
        QuantizerKind(
            "quantized_relu",
            _quantized_relu,
            None,
            _relu,
            "Relu + Quant on activations, Quant on weights",
            "exact",
            "yes",
            "yes",
        ),
        QuantizerKind(
            "quantized_po2",
            lambda quantizer, context: _power_of_two(quantizer, context, signed=True),
            None,
            None,
            "Quant on weights (the narrowest grid holding the powers of two)",
            "exact",
            "yes",
            "yes",
        ),
        QuantizerKind(
            "quantized_relu_po2",
            lambda quantizer, context: _power_of_two(quantizer, context, signed=False),
            None,
            None,
            "Quant on weights (the narrowest grid holding the powers of two)",
            "exact",
            "yes",
            "yes",
        ),
        QuantizerKind("binary", _binary, None, None, "Quant on weights", "exact", "yes", "yes"),
        QuantizerKind("ternary", _ternary, None, None, "Quant on weights", "exact", "yes", "yes"),
        QuantizerKind("bernoulli", None, _RANDOM, None, "refused", "-", "-", "-"),
        QuantizerKind("stochastic_binary", None, _RANDOM, None, "refused", "-", "-", "-"),
        QuantizerKind("stochastic_ternary", None, _RANDOM, None, "refused", "-", "-", "-"),
        QuantizerKind(
            "quantized_ulaw",
            None,
            "its levels are u-law companded, not a uniform grid",
            None,
            "refused",
            "-",
            "-",
            "-",
        ),
        QuantizerKind(
            "quantized_tanh",
            None,
            "it applies tanh before quantizing, which bnfold does not export",
            None,
            "refused",
            "-",
            "-",
            "-",
        ),
        QuantizerKind(
            "quantized_sigmoid",
            None,
            "it applies a sigmoid before quantizing, which bnfold does not export",
            None,
            "refused",
            "-",
            "-",
            "-",
        ),
        QuantizerKind(
            "quantized_hswish",
            None,
            "it applies hard swish before quantizing, which bnfold does not export",
            None,
            "refused",
            "-",
            "-",
            "-",
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
    context = _Context(repr(_describe(quantizer)), layer, allow_scale)
    kind = quantizer_kind(quantizer)
    if kind.type_rule is None:
        raise context.error(f"{kind.name} has no fixed-point type ({kind.refused})")
    return kind.type_rule(quantizer, context)
