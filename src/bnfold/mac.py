"""Multiply-accumulate layers: which they are, and the weights they compute with.

Both the accumulator inference and the exporter need, for every MAC layer, the
kernel and bias exactly as QKeras applies them at inference (folded first for a
folded layer, then quantized), with their fixed-point types and, for a kernel
quantizer with ``alpha="auto_po2"``, the per-channel power-of-two scale that
exists only after the quantizer has been applied.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from bnfold.errors import InvalidWeightsError, UnsupportedLayerError
from bnfold.fixedpoint import FixedPoint, QuantizerError
from bnfold.folding import folded_layer_type, folded_weights
from bnfold.keras import tf
from bnfold.layer_table import LAYERS, Kernel, mac_layer_type
from bnfold.quantizer_table import describe

# The finest grid on which a plain Keras layer's float weights are read as fixed
# point; trained float weights need more, so they stay float.
_MAX_FRACTIONAL_BITS = 16


@dataclass(frozen=True)
class QuantizedWeights:
    """A MAC layer's kernel and bias as applied at inference.

    Attributes:
        kernel: kernel values after folding and quantization.
        kernel_grid: fixed-point type of ``kernel / kernel_scale``, or None if
            the kernel is not on a fixed-point grid.
        kernel_scale: per-output-channel power-of-two scale, of the kernel's rank
            with size 1 on the summed axes, or None when the quantizer has none.
        bias: bias values after folding and quantization; None without a bias.
        bias_type: fixed-point type of ``bias``, or None if it is float or absent.
            (A float bias is what populate_bias_quantizer_from_accumulator fills.)
        output_axes: the kernel axes (negative) that index outputs; the others
            are summed over.
        before: the MAC whose unrounded sums this one multiplies (a separable
            convolution's depthwise stage, without bias), or None.
    """

    kernel: np.ndarray
    kernel_grid: FixedPoint | None
    kernel_scale: np.ndarray | None
    bias: np.ndarray | None
    bias_type: FixedPoint | None
    output_axes: tuple[int, ...]
    before: QuantizedWeights | None = None

    @property
    def summed_axes(self) -> tuple[int, ...]:
        """The kernel axes a MAC sums over for one output."""
        rank = self.kernel.ndim
        return tuple(axis for axis in range(rank) if axis - rank not in self.output_axes)

    @property
    def products(self) -> int:
        """How many products are summed per output."""
        return math.prod(self.kernel.shape[axis] for axis in self.summed_axes)

    @property
    def kernel_type(self) -> FixedPoint | None:
        """The type holding every kernel value, per-channel scales included."""
        if self.kernel_grid is None or self.kernel_scale is None:
            return self.kernel_grid
        exponents = np.log2(self.kernel_scale).astype(int)
        low, high = int(exponents.min()), int(exponents.max())
        grid = self.kernel_grid
        return FixedPoint(grid.bits + high - low, grid.integer + high, grid.signed, grid.narrow)


# Traced quantizer calls, by everything that decides a quantizer's output: its
# class, config, scale_axis (which get_config omits) and the input rank.
_TRACED_QUANTIZERS: dict[tuple, Any] = {}


def _traced(quantizer: Any) -> Any:
    """A traced ``quantizer`` call returning its output and scale, shared by equal quantizers.

    QKeras's per-channel scale search runs dozens of small operations, about
    6 ms per kernel when run eagerly; traced once per configuration it runs in a
    fraction of that, in graph mode as inside ``predict``.
    """

    def apply(values: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        quantized = quantizer(values)
        scale = getattr(quantizer, "scale", None)
        return quantized, tf.cast(1.0 if scale is None else scale, tf.float32)

    return tf.function(apply, reduce_retracing=True, autograph=False)


def _quantize(
    quantizer: Any, values: np.ndarray, layer: Any, role: str
) -> tuple[np.ndarray, np.ndarray]:
    """Apply a QKeras quantizer; return the values and the scale it set (1 if none).

    Raises:
        InvalidWeightsError: the quantizer turned finite values into NaN or inf
            (QKeras's auto_po2 scale does, on values near the float32 limit).
    """
    config = tuple(sorted((key, repr(value)) for key, value in quantizer.get_config().items()))
    key = (type(quantizer), config, repr(getattr(quantizer, "scale_axis", None)), values.ndim)
    if key not in _TRACED_QUANTIZERS:
        _TRACED_QUANTIZERS[key] = _traced(quantizer)
    quantized, scale = (result.numpy() for result in _TRACED_QUANTIZERS[key](tf.constant(values)))
    if not np.all(np.isfinite(quantized)):
        raise InvalidWeightsError(
            f"A quantized {role} must be finite. Received: layer={layer.name!r} "
            f"({type(layer).__name__}), whose quantizer {str(quantizer)!r} gives NaN or inf "
            f"on {role} values up to {float(np.max(np.abs(values))):g} in magnitude"
        )
    return quantized, scale


def _power_of_two_scale(scale: Any, layer: Any, kernel: np.ndarray, quantizer: Any) -> np.ndarray:
    """The per-channel scale (``alpha``) a kernel quantizer set, broadcast to the kernel."""
    scale = np.asarray(scale, dtype=np.float32)
    exponents = np.log2(scale)
    if not np.all(exponents == np.round(exponents)):
        raise QuantizerError(
            "A kernel quantizer's scale must be a power of two to have a fixed-point type "
            "(use alpha='auto_po2', not 'auto', or powers of two). Received: "
            f"layer={layer.name!r} with quantizer={describe(quantizer)!r}, scales "
            f"{sorted(set(np.unique(scale).tolist()))[:4]}"
        )
    return np.broadcast_to(scale, (1,) * (kernel.ndim - scale.ndim) + scale.shape).copy()


def grid_of_values(values: np.ndarray) -> FixedPoint | None:
    """The narrowest fixed-point type holding float values, if they lie on a fine enough grid."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or not np.all(np.isfinite(values)):
        return None
    for fractional in range(-_MAX_FRACTIONAL_BITS, _MAX_FRACTIONAL_BITS + 1):
        codes = values * 2.0**fractional
        if np.all(codes == np.round(codes)):
            step = math.ldexp(1.0, -fractional)
            if not np.any(values):
                return FixedPoint(1, 0, False)
            return FixedPoint.narrowest_holding(float(values.min()), float(values.max()), step)
    return None


def quantized_weights(layer: Any) -> QuantizedWeights:
    """The kernel and bias ``layer`` computes with at inference, with their types.

    Raises:
        UnsupportedLayerError: ``layer`` is not a MAC layer.
        QuantizerError: a quantizer has no fixed-point meaning.
        InvalidWeightsError: a quantizer gives NaN or inf.
    """
    entry = mac_layer_type(layer)
    if entry is None:
        raise UnsupportedLayerError(
            "Only multiply-accumulate layers "
            f"({', '.join(name for name, spec in LAYERS.items() if spec.mac)}) have kernels. "
            f"Received: layer={layer.name!r} of class {type(layer).__name__}"
        )
    if folded_layer_type(layer) is not None:
        kernel, bias = folded_weights(layer)
        kernels = [kernel]
    else:
        kernels = [np.asarray(getattr(layer, k.attribute), np.float32) for k in entry.kernels]
        bias = np.asarray(layer.bias, dtype=np.float32) if layer.use_bias else None
    weights = None
    for values, kernel in zip(kernels, entry.kernels, strict=True):
        weights = QuantizedWeights(
            *_quantized_kernel(layer, kernel, values),
            None,
            None,
            kernel.output_axes,
            weights,
        )
    bias_quantizer = getattr(layer, "bias_quantizer_internal", None)
    bias_type = None
    if bias is not None and bias_quantizer is not None:
        bias_type = FixedPoint.from_quantizer(bias_quantizer, layer=layer.name)
        bias, _ = _quantize(bias_quantizer, bias, layer, "bias")
    elif bias is not None and entry.kernels[-1].quantizer is None:
        bias_type = grid_of_values(bias)
    return dataclasses.replace(weights, bias=bias, bias_type=bias_type)


def _quantized_kernel(
    layer: Any, kernel: Kernel, values: np.ndarray
) -> tuple[np.ndarray, FixedPoint | None, np.ndarray | None]:
    """A kernel as ``layer`` applies it: its values, their grid and per-channel scale."""
    quantizer = getattr(layer, kernel.quantizer) if kernel.quantizer else None
    if kernel.quantizer is None:
        return values, grid_of_values(values), None
    if quantizer is None:
        return values, None, None
    grid = FixedPoint.from_quantizer(quantizer, layer=layer.name, allow_scale=True)
    quantized, scale = _quantize(quantizer, values, layer, kernel.attribute.replace("_", " "))
    alpha = getattr(quantizer, "alpha", None)
    if isinstance(alpha, str) or not (alpha is None or np.all(np.asarray(alpha) == 1)):
        return quantized, grid, _power_of_two_scale(scale, layer, quantized, quantizer)
    return quantized, grid, None
