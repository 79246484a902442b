"""The fixed-point type of the project: its values, its arithmetic, its names.

``FixedPoint(bits, integer, signed, narrow)`` counts integer bits as QKeras does,
without the sign bit: ``quantized_bits(8, 3, keep_negative=1)`` is
``FixedPoint(8, 3, True)`` with step ``2**(3 - 7)`` and range ``[-2**3, 2**3 - step]``.
A narrow signed type drops the most negative value, so ``min == -max``:
``quantized_bits(8, 3, symmetric=1)`` is ``FixedPoint(8, 3, True, narrow=True)``. The
four fields are exactly the parameters of a QKeras ``quantized_bits`` (bits, integer,
symmetric, keep_negative) and of a QONNX ``Quant`` node (bitwidth, scale=step, signed,
narrow). A QONNX unsigned ``Quant`` with ``narrow=1`` drops its largest code instead;
no ``FixedPoint`` is that. hls4ml's ``ap_fixed<W, I>`` counts the sign bit in ``I`` and
has no narrow form; :meth:`FixedPoint.hls` does that conversion.

A ``FixedPoint`` is a set of values: every multiple of ``step`` in ``[min, max]``.
:meth:`FixedPoint.from_quantizer` returns a type holding every value a QKeras quantizer
can output at inference. For ``quantized_bits`` and ``quantized_relu`` the type is
exactly the quantizer's grid; for power-of-two, binary and ternary quantizers it is the
narrowest grid holding their values (narrow when signed: they never output ``-2**integer``).

Accumulator arithmetic (:meth:`FixedPoint.product`, :meth:`FixedPoint.sum_of`,
:meth:`FixedPoint.widen`, :meth:`FixedPoint.union`) follows the ``ap_fixed`` rules,
which hls4ml's precision inference also uses, refined by narrowness. With narrow
(symmetric) weights, which QKeras's ``auto_po2`` kernels always are, the product rule
equals QKeras qtools's. The one difference: the product of two full-range (non-narrow)
signed types gets one more integer bit than qtools gives, because
``(-2**a) * (-2**b) = 2**(a + b)`` does not fit ``a + b`` integer bits (qtools overflows).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from bnfold.errors import QuantizerError
from bnfold.keras import quantizers

__all__ = ["FixedPoint", "QuantizerError"]


# hls4ml's types: ap_fixed<W,I> in C++, fixed<W,I> in its configuration; I counts the sign.
HLS_TYPE = re.compile(r"(?:ap_)?(u?)fixed<\s*(\d+)\s*,\s*(-?\d+)\s*>")


@dataclass(frozen=True)
class FixedPoint:
    """A binary fixed-point type: ``bits`` wide, ``integer`` bits left of the point.

    ``integer`` excludes the sign bit (the QKeras convention) and may be negative or
    larger than ``bits``. The values are the multiples of ``step`` in ``[min, max]``.
    A narrow signed type drops the most negative value, ``-2**integer``, so that
    ``min == -max`` (QKeras ``symmetric=1``, QONNX ``narrow=1``). An unsigned type is
    never narrow: ``narrow`` is normalized to ``signed and narrow``.

    Attributes:
        bits: Total width, sign bit included; at least 1.
        integer: Integer bits, sign bit excluded.
        signed: Whether the type is two's complement.
        narrow: Whether a signed type leaves out ``-2**integer``.
    """

    bits: int
    integer: int
    signed: bool
    narrow: bool = False

    def __post_init__(self) -> None:
        bits = plain_int(self.bits, "bits")
        integer = plain_int(self.integer, "integer")
        if self.signed not in (True, False):
            raise ValueError(f"FixedPoint.signed must be a bool. Received: signed={self.signed!r}")
        if self.narrow not in (True, False):
            raise ValueError(f"FixedPoint.narrow must be a bool. Received: narrow={self.narrow!r}")
        if bits < 1:
            raise ValueError(f"FixedPoint needs at least 1 bit. Received: bits={bits}")
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "integer", integer)
        object.__setattr__(self, "signed", bool(self.signed))
        object.__setattr__(self, "narrow", bool(self.signed and self.narrow))

    # ----------------------------------------------------------------- the value set

    @property
    def fractional(self) -> int:
        """Bits right of the binary point (negative when ``step`` is above 1)."""
        return self.bits - self.signed - self.integer

    @property
    def step(self) -> float:
        """Distance between neighbouring values, ``2**-fractional``."""
        return math.ldexp(1.0, -self.fractional)

    @property
    def min(self) -> float:
        """Smallest value: 0 if unsigned, ``-max`` if narrow, else ``-2**integer``.

        Exact like :attr:`max`; for wide narrow types it is the smallest float above the
        exact minimum, so ``value >= min`` stays an exact test for any float.
        """
        if not self.signed:
            return 0.0
        if self.narrow:
            return -self.max
        return -math.ldexp(1.0, self.integer)

    @property
    def max(self) -> float:
        """Largest value, ``2**integer - step``.

        Exact while ``bits - signed <= 53``; wider types return the largest float below
        the exact maximum, so ``value <= max`` stays an exact test for any float.
        """
        if self.bits - self.signed <= 53:
            return math.ldexp(1.0, self.integer) - self.step
        return math.nextafter(math.ldexp(1.0, self.integer), 0.0)

    def contains(self, values: Any) -> bool:
        """Whether every value is a multiple of ``step`` within ``[min, max]``.

        Args:
            values: A number or anything ``numpy.asarray`` accepts.

        Returns:
            True if the type represents every value exactly.
        """
        array = np.asarray(values, dtype=np.float64)
        if not np.all(np.isfinite(array)):
            return False
        codes = array / self.step  # exact: step is a power of two
        return bool(
            np.all(codes == np.floor(codes))
            and np.all(array >= self.min)
            and np.all(array <= self.max)
        )

    def holds(self, low: float, high: float) -> bool:
        """Whether ``[low, high]`` lies within ``[min, max]`` (the grid is not checked)."""
        low, high = float(low), float(high)
        if not (math.isfinite(low) and math.isfinite(high)):
            return False
        minimum, maximum = self._exact_bounds()
        return minimum <= Fraction(low) and Fraction(high) <= maximum

    def includes(self, other: FixedPoint) -> bool:
        """Whether every value of ``other`` is a value of this type."""
        minimum, maximum = self._exact_bounds()
        other_min, other_max = other._exact_bounds()
        return other.fractional <= self.fractional and minimum <= other_min and other_max <= maximum

    def quantize(self, values: Any) -> np.ndarray:
        """Rounds to the grid (half to even) and saturates, exactly as ``quantized_bits``.

        This is the numpy reference for :meth:`to_quantizer`: for float32 inputs whose
        magnitude is below ``2**24 * step`` it gives the same values as QKeras. A narrow
        type saturates at ``min == -max``, as QKeras's ``symmetric=1``.

        Args:
            values: Inputs, anything ``numpy.asarray`` accepts.

        Returns:
            A float64 array of values of this type.
        """
        codes = np.round(np.asarray(values, dtype=np.float64) / self.step)
        lowest = -(1 << (self.bits - 1)) + int(self.narrow) if self.signed else 0
        highest = (1 << (self.bits - self.signed)) - 1
        return np.clip(codes, lowest, highest) * self.step

    # ------------------------------------------------------------ accumulator algebra

    def product(self, other: FixedPoint) -> FixedPoint:
        """The type of ``a * b`` for ``a`` of this type and ``b`` of ``other``.

        Bits add, integer bits add, and the result is signed if either side is. Only
        when both sides are signed and neither is narrow does one more integer bit hold
        ``(-2**i) * (-2**j) = 2**(i + j)`` (qtools omits it; ``ap_fixed`` keeps it).
        Otherwise one side, say ``a``, has ``|a| <= 2**i - step_a``, so
        ``|a * b| <= (2**i - step_a) * 2**j < 2**(i + j)``; on the grid
        ``step_a * step_b`` that is at most ``2**(i + j) - step``: the product fits
        ``i + j`` integer bits and, when signed, is narrow.

        No bit is lost on the right: the step is the product of the steps, except for
        two signed sides of which one is narrow. Their product then has qtools's widths,
        two sign bits' worth of width for one sign, so its step is half the product of
        the steps (the last bit of every product is 0).
        """
        extra = self.signed and other.signed and not (self.narrow or other.narrow)
        return FixedPoint(
            self.bits + other.bits,
            self.integer + other.integer + extra,
            self.signed or other.signed,
            narrow=not extra,
        )

    def sum_of(self, count: int) -> FixedPoint:
        """The type of a sum of ``count`` values of this type: both widths grow by
        ``g = ceil(log2(count))``.

        A narrow type stays narrow: the sum lies within ``+-count * max``, and
        ``count * (2**i - step) <= 2**(i + g) - step``.
        """
        count = plain_int(count, "count")
        if count < 1:
            raise ValueError(f"sum_of needs at least one term. Received: count={count}")
        growth = (count - 1).bit_length()
        return self.widen(growth, growth)

    def widen(self, extra_bits: int = 0, extra_integer: int = 0) -> FixedPoint:
        """This type with ``extra_bits`` more bits, ``extra_integer`` of them integer bits.

        ``widen(1, 1)`` is the accumulator of a sum of products plus a bias of the
        sum-of-products type. ``narrow`` is kept: ``widen(1, 1)`` of a narrow type holds
        the sum of one of its values and one value of its non-narrow twin, since
        ``-(2**i - step) - 2**i = -(2**(i + 1) - step)``.
        """
        return FixedPoint(
            self.bits + extra_bits, self.integer + extra_integer, self.signed, self.narrow
        )

    def union(self, other: FixedPoint) -> FixedPoint:
        """A type holding every value of this type and of ``other``.

        Bits and integer bits are the narrowest that hold both. The result is narrow only
        when both types are narrow with the same ``integer``; otherwise it is full-range,
        a conservative superset.
        """
        signed = self.signed or other.signed
        integer = max(self.integer, other.integer)
        fractional = max(self.fractional, other.fractional)
        narrow = self.narrow and other.narrow and self.integer == other.integer
        return FixedPoint(integer + fractional + signed, integer, signed, narrow)

    @classmethod
    def narrowest_holding(cls, low: float, high: float, step: float) -> FixedPoint:
        """The narrowest type with this ``step`` whose range covers ``[low, high]``.

        Signed exactly when ``low < 0``, and then narrow exactly when the narrow type
        still covers ``low`` (for ``low`` on the grid: ``low > -2**integer``). Used where
        actual values are known (weights, power-of-two exponent ranges) and a type from
        widths alone would be too wide.

        Args:
            low: Smallest value to hold.
            high: Largest value to hold.
            step: Grid step, a positive power of two.

        Returns:
            The narrowest such ``FixedPoint``.

        Raises:
            ValueError: If ``step`` is not a power of two or the bounds are not finite
                with ``low <= high``.
        """
        if not (math.isfinite(low) and math.isfinite(high) and low <= high):
            raise ValueError(
                "narrowest_holding needs finite bounds with low <= high. "
                f"Received: low={low!r}, high={high!r}"
            )
        mantissa, exponent = math.frexp(step) if step > 0 else (0.0, 0)
        if mantissa != 0.5:
            raise ValueError(
                f"narrowest_holding needs a positive power-of-two step. Received: step={step!r}"
            )
        fractional = 1 - exponent
        signed = low < 0
        magnitude = max(abs(low), abs(high))
        # Start one below the binade of the largest magnitude (or at 1 bit) and climb.
        integer = 1 - signed - fractional
        if magnitude > 0:
            integer = max(integer, math.frexp(magnitude)[1] - 2)
        while True:
            candidate = cls(integer + fractional + signed, integer, signed)
            if candidate.holds(low, high):
                narrow = cls(candidate.bits, integer, signed, narrow=True)
                return narrow if narrow.holds(low, high) else candidate
            integer += 1

    # ------------------------------------------------------------------ conversions out

    def to_quantizer(self, *, alpha: float | None = 1) -> Any:
        """A QKeras ``quantized_bits`` whose outputs are exactly the values of this type.

        ``symmetric`` is ``int(narrow)``, so the quantizer reaches ``min`` and ``max``
        and :meth:`from_quantizer` gives this type back. ``alpha=1`` is explicit so that
        a QKeras layer never turns it into a per-channel ``"auto_po2"`` scale (layers do
        that to a kernel quantizer with ``alpha=None``).

        Args:
            alpha: 1, or None where the quantizer is never a kernel quantizer and
                should read as QKeras's own (a populated bias quantizer).

        Returns:
            A ``qkeras.quantizers.quantized_bits`` object.

        Raises:
            ValueError: For a 1-bit signed type, which QKeras reads as binary +-1, and
                for a negative ``integer``, which QKeras 0.9.0 cannot apply (it raises
                "Integers to negative integer powers are not allowed").
        """
        if alpha not in (1, None):
            raise ValueError(f"to_quantizer takes alpha 1 or None. Received: alpha={alpha!r}")
        self._check_expressible()
        return quantizers.quantized_bits(
            self.bits,
            self.integer,
            symmetric=int(self.narrow),
            keep_negative=self.signed,
            alpha=alpha,
        )

    def quantizer_string(self) -> str:
        """The QKeras string of :meth:`to_quantizer`, e.g. ``quantized_bits(10,3,1,1,alpha=1)``.

        Arguments are positional ``bits, integer, symmetric, keep_negative``; both
        :func:`parse_quantizer` and QKeras's own parser read it back. Raises
        ``ValueError`` for the same types as :meth:`to_quantizer`.
        """
        self._check_expressible()
        return (
            f"quantized_bits({self.bits},{self.integer},{int(self.narrow)},"
            f"{int(self.signed)},alpha=1)"
        )

    def hls(self) -> str:
        """The hls4ml type: ``ap_fixed<W,I>`` (``I`` counts the sign bit) or ``ap_ufixed``.

        ``ap_fixed`` has no narrow form; a narrow type maps to its full-range superset.
        """
        if self.signed:
            return f"ap_fixed<{self.bits},{self.integer + 1}>"
        return f"ap_ufixed<{self.bits},{self.integer}>"

    def hls4ml_precision(self, *, quantizing: bool = False) -> str:
        """The type in hls4ml's configuration syntax: ``fixed<W,I>`` or ``ufixed<W,I>``.

        ``I`` counts the sign bit, as in :meth:`hls`. Without ``quantizing`` hls4ml's
        default modes apply (truncate, wrap); they never act on a value the type holds,
        which is right for accumulators and results wide enough by construction. With
        ``quantizing`` the modes of a QKeras quantizer are appended, the ones hls4ml itself
        gives a QONNX ``Quant`` node: ``RND_CONV`` rounds half to even, ``SAT`` saturates,
        and ``SAT_SYM`` saturates a narrow type at ``-max``.
        """
        kind, integer = ("fixed", self.integer + 1) if self.signed else ("ufixed", self.integer)
        modes = f",RND_CONV,{'SAT_SYM' if self.narrow else 'SAT'}" if quantizing else ""
        return f"{kind}<{self.bits},{integer}{modes}>"

    def qonnx_datatype(self) -> str:
        """The QONNX name of the integer codes, ``value / step``: ``INTn``, ``UINTn``, ``BINARY``.

        A QONNX ``Quant`` node with ``bitwidth=bits``, ``scale=step``, ``zeropt=0``,
        ``signed`` and ``narrow`` produces this type; qonnx names integers this way and
        keeps the scale and narrowness apart (the codes of a narrow type are ``INTn``
        without its minimum). ``FIXED<w,i>`` is not used: qonnx 1.0.0 has no unsigned form of it and
        refuses types without fractional bits.
        """
        if not self.signed and self.bits == 1:
            return "BINARY"
        return f"{'INT' if self.signed else 'UINT'}{self.bits}"

    def value_datatype(self) -> str:
        """The QONNX name of the values themselves, for a graph input's ``finn_datatype``.

        Integer values are ``INTn``/``UINTn``; a grid with fractional bits is
        ``FIXED<w,i>``, whose ``i`` counts the sign and which has no unsigned form,
        so an unsigned grid is named by the signed type one bit wider.
        """
        if self.fractional == 0:
            return self.qonnx_datatype()
        if self.fractional < 0:
            return f"{'INT' if self.signed else 'UINT'}{self.integer + self.signed}"
        return f"FIXED<{self.bits + (not self.signed)},{self.integer + 1}>"

    def __str__(self) -> str:
        narrow = ",narrow" if self.narrow else ""
        return f"{'s' if self.signed else 'u'}fixed({self.bits},{self.integer}{narrow})"

    # ------------------------------------------------------------------- conversions in

    @classmethod
    def from_quantizer(
        cls, quantizer: Any, *, layer: str | None = None, allow_scale: bool = False
    ) -> FixedPoint:
        """The type holding every value a QKeras quantizer outputs at inference.

        Args:
            quantizer: A QKeras quantizer object, a string such as
                ``"quantized_bits(4,0,1)"``, or a serialized ``{"class_name": ...,
                "config": ...}`` dict.
            layer: Name of the layer the quantizer belongs to, for error messages.
            allow_scale: Accept ``alpha="auto"``/``"auto_po2"`` (per-channel scales that
                exist only after the quantizer has been applied) and return the grid
                that the scale multiplies: outputs equal ``quantizer.scale`` times values
                of the returned type. The caller then owns the scale.

        Returns:
            The ``FixedPoint`` holding every output, narrow when a signed quantizer
            never outputs ``-2**integer`` (``symmetric`` ``quantized_bits``, every
            ``alpha`` string, signed power-of-two, binary +-1 and ternary). A type
            from :meth:`to_quantizer` comes back unchanged. ``use_stochastic_rounding`` is
            accepted where it only changes training: inference outputs stay on the grid.
            A negative ``integer`` is read, although QKeras 0.9.0 cannot apply it.

        Raises:
            QuantizerError: For None or non-quantizers (float values), unknown or
                malformed quantizers, and quantizers without a fixed-point type.
        """
        from bnfold.quantizer_table import fixed_point_of  # it builds on this class

        return fixed_point_of(quantizer, layer=layer, allow_scale=allow_scale)

    @classmethod
    def from_hls(cls, text: str) -> FixedPoint:
        """The type an ``ap_fixed<W,I>`` or ``ap_ufixed<W,I>`` string names; inverts :meth:`hls`.

        hls4ml's configuration spellings ``fixed<W,I>`` and ``ufixed<W,I>`` (without modes,
        as :meth:`hls4ml_precision` writes them by default) mean the same. ``ap_fixed``
        has no narrow form, so the type is full-range.

        Args:
            text: An ``ap_fixed``/``ap_ufixed``/``fixed``/``ufixed`` type without modes.

        Returns:
            The ``FixedPoint`` whose :meth:`hls` is ``text`` with the ``ap_`` prefix.

        Raises:
            ValueError: If ``text`` is not such a type.
        """
        match = HLS_TYPE.fullmatch(text.strip())
        if match is None:
            raise ValueError(
                "An hls type must read ap_fixed<W,I>, ap_ufixed<W,I>, fixed<W,I> or "
                f"ufixed<W,I>. Received: {text!r}"
            )
        unsigned, bits, integer = match.groups()
        signed = not unsigned
        return cls(int(bits), int(integer) - signed, signed)

    @classmethod
    def from_qonnx_quant(
        cls, bitwidth: Any, scale: Any, *, signed: bool, narrow: bool
    ) -> FixedPoint:
        """The type of a QONNX ``Quant`` node's output, for zero point 0 and one scale.

        Inverts the Quant node bnfold writes for a type: ``bitwidth=bits``,
        ``scale=step``, ``signed``, ``narrow``.

        Args:
            bitwidth: The node's bit width, an integer (a numpy scalar or 1-element array).
            scale: The node's scale, a power of two (a number or an array of equal values).
            signed: The node's ``signed`` attribute.
            narrow: The node's ``narrow`` attribute.

        Returns:
            The ``FixedPoint`` holding exactly the node's output values.

        Raises:
            ValueError: For a bit width that is not an integer, a scale that is not one
                positive power of two, and an unsigned narrow node (it drops its largest
                code, which no ``FixedPoint`` does).
        """
        bits = plain_int(bitwidth, "bitwidth")
        scales = np.unique(np.asarray(scale, dtype=np.float64))
        mantissa, exponent = math.frexp(float(scales[0])) if scales.size == 1 else (0.0, 0)
        if mantissa != 0.5:
            raise ValueError(
                "A Quant node has a fixed-point type only with one positive power-of-two "
                f"scale. Received: scale={scale!r}"
            )
        if narrow and not signed:
            raise ValueError(
                "An unsigned narrow Quant node drops its largest code, which no FixedPoint "
                f"does. Received: bitwidth={bits}, signed={signed!r}, narrow={narrow!r}"
            )
        return cls(bits, bits - bool(signed) - (1 - exponent), bool(signed), bool(narrow))

    def _exact_bounds(self) -> tuple[Fraction, Fraction]:
        """``min`` and ``max`` as exact fractions, whatever the width."""
        top = Fraction(2) ** self.integer
        step = Fraction(2) ** -self.fractional
        if not self.signed:
            return Fraction(0), top - step
        return (step - top if self.narrow else -top), top - step

    def _check_expressible(self) -> None:
        """Refuses the types a QKeras 0.9.0 ``quantized_bits`` cannot apply as this grid."""
        if self.signed and self.bits == 1:
            raise ValueError(
                "QKeras cannot express a 1-bit signed fixed-point type: quantized_bits "
                f"with 1 bit and keep_negative outputs +-1. Received: {self!r}"
            )
        if self.integer < 0:
            # QKeras computes 2**integer on int32 tensors, which TensorFlow refuses.
            raise ValueError(
                "QKeras 0.9.0 cannot apply a quantized_bits with a negative integer; widen "
                f"the type first, e.g. fp.widen({-self.integer}, {-self.integer}), which "
                f"keeps its step. Received: {self!r}"
            )


def plain_int(value: Any, what: str) -> int:
    """An int from an int-like (numpy, 1-element tensor, integral float)."""
    if hasattr(value, "numpy"):
        value = value.numpy()
    array = np.asarray(value)
    if array.size != 1 or array.dtype.kind not in "iuf" or array.dtype == np.bool_:
        raise ValueError(f"{what} must be an integer. Received: {what}={value!r}")
    number = array.reshape(()).item()
    if number != int(number):
        raise ValueError(f"{what} must be an integer. Received: {what}={value!r}")
    return int(number)
