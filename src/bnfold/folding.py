"""Batch normalization folding: the maths once, each folded layer type as data.

At inference a folded layer computes, per output channel c,

    s[c]     = gamma[c] / sqrt(moving_variance[c] + epsilon)
    W_fold   = W * s                       (s broadcast over the output-channel axes of W)
    b_fold   = s * (b - moving_mean) + beta
    y        = act(quantize_w(W_fold) (*) x + quantize_b(b_fold))

where (*) is the layer's product (convolution, depthwise convolution, matrix
product). A plain QKeras layer holding W_fold and b_fold, with the same
quantizers, computes the same y. For that to hold bit for bit, W_fold and b_fold
are computed here with the same float32 TensorFlow operations, in the same
order, as the folded layers use.

The only differences between folded layer types are the plain class they
become, the name of their kernel, and how many trailing kernel axes index the
output channels. Those are the entries of ``FOLDED_LAYER_TYPES``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np

from bnfold.errors import InvalidWeightsError, UnsupportedLayerError
from bnfold.keras import keras, qkeras, tf


@dataclass(frozen=True)
class FoldedLayerType:
    """What distinguishes one folded layer class from another.

    Attributes:
        folded: class name of the folded layer, e.g. "QConv2DBatchnorm".
        plain: the QKeras class it unfolds into.
        kernel: attribute (and weight) name of its kernel.
        kernel_quantizer: constructor argument naming the kernel quantizer.
        output_channel_axes: how many trailing kernel axes index output channels
            (2 for a depthwise kernel [kh, kw, channels, multiplier], else 1).
    """

    folded: str
    plain: type
    kernel: str
    kernel_quantizer: str
    output_channel_axes: int = 1


FOLDED_LAYER_TYPES: dict[str, FoldedLayerType] = {
    entry.folded: entry
    for entry in (
        FoldedLayerType("QConv2DBatchnorm", qkeras.QConv2D, "kernel", "kernel_quantizer"),
        FoldedLayerType(
            "QDepthwiseConv2DBatchnorm",
            qkeras.QDepthwiseConv2D,
            "depthwise_kernel",
            "depthwise_quantizer",
            output_channel_axes=2,
        ),
        FoldedLayerType("QDenseBatchnorm", qkeras.QDense, "kernel", "kernel_quantizer"),
    )
}

# Layer constructor arguments that Keras takes through **kwargs.
_BASE_LAYER_ARGUMENTS = ("name", "dtype", "trainable")


def folded_layer_type(layer: Any) -> FoldedLayerType | None:
    """The table entry for ``layer``, or None when it is not a folded layer."""
    return FOLDED_LAYER_TYPES.get(type(layer).__name__)


def _require_folded_layer_type(layer: Any) -> FoldedLayerType:
    entry = folded_layer_type(layer)
    if entry is None:
        raise UnsupportedLayerError(
            f"Only folded batchnorm layers ({', '.join(FOLDED_LAYER_TYPES)}) can be unfolded. "
            f"Received: layer={getattr(layer, 'name', layer)!r} of class {type(layer).__name__}"
        )
    return entry


def batchnorm_scale(variance: Any, gamma: Any, epsilon: float) -> tf.Tensor:
    """Per-channel factor ``gamma / sqrt(variance + epsilon)``, as the folded layers compute it."""
    scale = tf.math.rsqrt(variance + epsilon)
    if gamma is not None:
        scale = scale * gamma
    return scale


def fold_kernel(kernel: Any, scale: Any, output_channel_axes: int) -> tf.Tensor:
    """Multiply each output channel of ``kernel`` by its batchnorm factor."""
    channel_shape = kernel.shape[-output_channel_axes:].as_list()
    return tf.reshape(scale, channel_shape) * kernel


def fold_bias(bias: Any, scale: Any, mean: Any, beta: Any) -> tf.Tensor:
    """Fold the batchnorm shift into the bias; ``bias`` may be 0 for a layer without one."""
    folded = scale * (bias - mean)
    if beta is not None:
        folded = folded + beta
    return folded


def _check_foldable(layer: Any, entry: FoldedLayerType) -> None:
    """Refuse weights that would silently produce NaN or inf after folding."""
    batchnorm = layer.batchnorm
    named = [(entry.kernel, getattr(layer, entry.kernel))]
    if layer.use_bias:
        named.append(("bias", layer.bias))
    named += [
        (name, getattr(batchnorm, name))
        for name in ("gamma", "beta", "moving_mean", "moving_variance")
        if getattr(batchnorm, name) is not None
    ]
    for name, variable in named:
        values = np.asarray(variable)
        if not np.all(np.isfinite(values)):
            raise InvalidWeightsError(
                f"Folded layer weights must be finite. Received: layer={layer.name!r} "
                f"({type(layer).__name__}) with NaN or inf in {name}"
            )
    variance = np.asarray(batchnorm.moving_variance)
    if np.any(variance < 0):
        raise InvalidWeightsError(
            "A batchnorm moving variance must not be negative. Received: "
            f"layer={layer.name!r} ({type(layer).__name__}) with moving_variance "
            f"min {variance.min()!r}"
        )


def folded_weights(layer: Any) -> tuple[np.ndarray, np.ndarray]:
    """The kernel and bias a plain layer needs to compute what ``layer`` computes at inference.

    Args:
        layer: a built folded layer (a class listed in ``FOLDED_LAYER_TYPES``).

    Returns:
        ``(kernel, bias)`` as float32 arrays, before quantization: the plain
        layer applies the same quantizers to them.

    Raises:
        UnsupportedLayerError: ``layer`` is not a folded layer.
        InvalidWeightsError: its weights hold NaN or inf, or a negative variance, or
            folding them overflows float32.
    """
    entry = _require_folded_layer_type(layer)
    _check_foldable(layer, entry)
    batchnorm = layer.batchnorm
    scale = batchnorm_scale(batchnorm.moving_variance, batchnorm.gamma, batchnorm.epsilon)
    kernel = fold_kernel(getattr(layer, entry.kernel), scale, entry.output_channel_axes)
    bias = fold_bias(
        layer.bias if layer.use_bias else 0, scale, batchnorm.moving_mean, batchnorm.beta
    )
    kernel, bias = kernel.numpy(), bias.numpy()
    for name, values in ((entry.kernel, kernel), ("bias", bias)):
        if not np.all(np.isfinite(values)):
            raise InvalidWeightsError(
                f"Folded weights must be finite. Received: layer={layer.name!r} "
                f"({type(layer).__name__}), whose folded {name} overflows float32 "
                f"(batchnorm scale up to {float(np.max(np.abs(scale))):g})"
            )
    return kernel, bias


def constructor_arguments(cls: type) -> set[str]:
    """The settings a Keras layer class accepts: its own arguments and the base layer's."""
    return set(inspect.signature(cls.__init__).parameters) | set(_BASE_LAYER_ARGUMENTS)


def convert_folded_layer_to_unfolded(layer: Any) -> keras.layers.Layer:
    """Replace a folded batchnorm layer by the plain QKeras layer that computes the same.

    The plain layer gets every setting of ``layer`` that its class has (strides,
    padding, dilation, data format, depth multiplier, activation, name, ...),
    ``use_bias=True``, and the very quantizer objects of ``layer``: a round trip
    through ``get_config`` would lose some of their fields. When ``layer`` is
    built, the plain layer is built too and holds the folded weights.

    Args:
        layer: a QConv2DBatchnorm, QDepthwiseConv2DBatchnorm or QDenseBatchnorm.

    Returns:
        A new QConv2D, QDepthwiseConv2D or QDense.

    Raises:
        UnsupportedLayerError: ``layer`` is not a folded layer.
    """
    entry = _require_folded_layer_type(layer)
    accepted = constructor_arguments(entry.plain)
    settings = {key: value for key, value in layer.get_config().items() if key in accepted}
    settings.update(
        {
            "use_bias": True,
            "activation": layer.activation,
            entry.kernel_quantizer: getattr(layer, f"{entry.kernel_quantizer}_internal"),
            "bias_quantizer": layer.bias_quantizer_internal,
        }
    )
    plain = entry.plain(**settings)
    if layer.built:
        plain.build_from_config(layer.get_build_config())
        plain.set_weights(list(folded_weights(layer)))
    return plain
