"""QDenseBatchnorm, the folded dense layer that QKeras 0.9.0 lacks.

It has the class name, constructor arguments and config keys of the
QDenseBatchnorm in newer QKeras sources, so models saved with either load with
the other, and it behaves like QKeras's QConv2DBatchnorm with a matrix product
in place of the convolution: at inference the kernel and bias are folded with
the moving statistics, then quantized (see ``bnfold.folding``).
"""

from __future__ import annotations

from typing import Any

from bnfold.folding import (
    FOLDED_LAYER_TYPES,
    batchnorm_scale,
    fold_bias,
    fold_kernel,
    folded_weights,
)
from bnfold.keras import keras, qkeras, tf

_FOLDING_MODES = ("ema_stats_folding", "batch_stats_folding")

# Picks the branch at trace time when the condition is known (inference), so that
# the inference graph holds no control flow, as in QKeras's folded layers.
_smart_cond = tf.__internal__.smart_cond.smart_cond


class QDenseBatchnorm(qkeras.QDense):
    """A quantized dense layer with a batch normalization folded into its kernel and bias.

    Training follows QKeras's folded convolutions. In "ema_stats_folding" mode
    the kernel is always folded with the moving statistics and, while the
    batchnorm statistics are still being learned, the output is rescaled to the
    batch statistics; in "batch_stats_folding" mode kernel and bias are folded
    with the batch statistics until ``ema_freeze_delay`` steps have passed.
    """

    def __init__(
        self,
        units: int,
        activation: Any = None,
        use_bias: bool = True,
        kernel_initializer: Any = "he_normal",
        bias_initializer: Any = "zeros",
        kernel_regularizer: Any = None,
        bias_regularizer: Any = None,
        activity_regularizer: Any = None,
        kernel_constraint: Any = None,
        bias_constraint: Any = None,
        kernel_quantizer: Any = None,
        bias_quantizer: Any = None,
        kernel_range: Any = None,
        bias_range: Any = None,
        # batch normalization
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 0.001,
        center: bool = True,
        scale: bool = True,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        moving_mean_initializer: Any = "zeros",
        moving_variance_initializer: Any = "ones",
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        beta_constraint: Any = None,
        gamma_constraint: Any = None,
        renorm: bool = False,
        renorm_clipping: Any = None,
        renorm_momentum: float = 0.99,
        fused: Any = None,
        trainable: bool = True,
        virtual_batch_size: Any = None,
        adjustment: Any = None,
        # folding
        ema_freeze_delay: int | None = None,
        folding_mode: str = "ema_stats_folding",
        **kwargs: Any,
    ) -> None:
        if folding_mode not in _FOLDING_MODES:
            raise ValueError(
                f"folding_mode must be one of {', '.join(_FOLDING_MODES)}. "
                f"Received: folding_mode={folding_mode!r}"
            )
        super().__init__(
            units=units,
            activation=activation,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            activity_regularizer=activity_regularizer,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
            kernel_quantizer=kernel_quantizer,
            bias_quantizer=bias_quantizer,
            kernel_range=kernel_range,
            bias_range=bias_range,
            **kwargs,
        )
        self.batchnorm = keras.layers.BatchNormalization(
            axis=axis,
            momentum=momentum,
            epsilon=epsilon,
            center=center,
            scale=scale,
            beta_initializer=beta_initializer,
            gamma_initializer=gamma_initializer,
            moving_mean_initializer=moving_mean_initializer,
            moving_variance_initializer=moving_variance_initializer,
            beta_regularizer=beta_regularizer,
            gamma_regularizer=gamma_regularizer,
            beta_constraint=beta_constraint,
            gamma_constraint=gamma_constraint,
            renorm=renorm,
            renorm_clipping=renorm_clipping,
            renorm_momentum=renorm_momentum,
            fused=fused,
            trainable=trainable,
            virtual_batch_size=virtual_batch_size,
            adjustment=adjustment,
        )
        self.ema_freeze_delay = ema_freeze_delay
        self.folding_mode = folding_mode

    def build(self, input_shape: Any) -> None:
        super().build(input_shape)
        # Counts training steps, for ema_freeze_delay; -1 before the first one.
        self._iteration = tf.Variable(-1, trainable=False, name="iteration", dtype=tf.int64)

    def _bn_training(self, training: Any) -> Any:
        """Whether the batchnorm statistics are still being learned at this step."""
        if self.ema_freeze_delay is None or self.ema_freeze_delay < 0:
            return tf.cast(training, dtype=tf.bool)
        return tf.math.logical_and(
            training, tf.math.less_equal(self._iteration, self.ema_freeze_delay)
        )

    def call(self, inputs: Any, training: Any = None) -> Any:
        training = self.batchnorm._get_training_value(training)
        bn_training = self._bn_training(training)

        bias = self.bias if self.use_bias else 0
        unfolded = keras.backend.dot(inputs, self.kernel)
        if self.use_bias:
            unfolded = keras.backend.bias_add(unfolded, bias, data_format="channels_last")
        # Called for its side effect: it updates the moving statistics in training.
        self.batchnorm(unfolded, training=bn_training)
        self._iteration.assign_add(tf.cast(training, tf.int64))

        batchnorm = self.batchnorm
        reduction_axes = [i for i in range(unfolded.shape.rank) if i not in batchnorm.axis]
        batch_mean, batch_variance = tf.nn.moments(unfolded, reduction_axes)
        moving_scale = batchnorm_scale(
            batchnorm.moving_variance, batchnorm.gamma, batchnorm.epsilon
        )
        batch_scale = batchnorm_scale(batch_variance, batchnorm.gamma, batchnorm.epsilon)
        folded_bias = _smart_cond(
            bn_training,
            lambda: fold_bias(bias, batch_scale, batch_mean, batchnorm.beta),
            lambda: fold_bias(bias, moving_scale, batchnorm.moving_mean, batchnorm.beta),
        )
        if self.folding_mode == "batch_stats_folding":
            kernel_scale = _smart_cond(bn_training, lambda: batch_scale, lambda: moving_scale)
        else:
            kernel_scale = moving_scale
        folded_kernel = fold_kernel(
            self.kernel, kernel_scale, FOLDED_LAYER_TYPES["QDenseBatchnorm"].output_channel_axes
        )

        if self.kernel_quantizer_internal is not None:
            folded_kernel = self.kernel_quantizer_internal(folded_kernel)
        if self.bias_quantizer_internal is not None:
            folded_bias = self.bias_quantizer_internal(folded_bias)

        outputs = keras.backend.dot(inputs, folded_kernel)
        if training is True and self.folding_mode == "ema_stats_folding":
            # The kernel was folded with the moving statistics; rescale to the batch ones.
            correction = _smart_cond(
                bn_training,
                lambda: (
                    tf.math.sqrt(batchnorm.moving_variance + batchnorm.epsilon)
                    * tf.math.rsqrt(batch_variance + batchnorm.epsilon)
                ),
                lambda: tf.ones_like(batchnorm.moving_variance),
            )
            outputs = outputs * correction
        outputs = keras.backend.bias_add(outputs, folded_bias, data_format="channels_last")
        if self.activation is not None:
            return self.activation(outputs)
        return outputs

    def get_config(self) -> dict[str, Any]:
        config = {
            **super().get_config(),
            **self.batchnorm.get_config(),
            "ema_freeze_delay": self.ema_freeze_delay,
            "folding_mode": self.folding_mode,
        }
        config["name"] = self.name
        return config

    def get_quantization_config(self) -> dict[str, str]:
        return {
            "kernel_quantizer": str(self.kernel_quantizer_internal),
            "bias_quantizer": str(self.bias_quantizer_internal),
            "activation": str(self.activation),
            "units": str(self.units),
        }

    def get_folded_weights(self) -> list[tf.Tensor]:
        """The kernel and bias folded with the moving statistics, before quantization."""
        return [tf.constant(value) for value in folded_weights(self)]


# Saved models name the class "QDenseBatchnorm", as newer QKeras sources do.
keras.utils.get_custom_objects()["QDenseBatchnorm"] = QDenseBatchnorm
