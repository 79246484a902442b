"""Small folded QKeras models covering the topologies and layer settings users meet."""

from __future__ import annotations

import inspect
import json

import h5py
import numpy as np
import onnx

import bnfold
from bnfold.export.verify import qonnx_outputs, sample_inputs
from bnfold.fixedpoint import FixedPoint
from bnfold.folding import folded_layer_type
from bnfold.keras import keras, qkeras, quantizers

q = qkeras
INPUT_QUANTIZER = "quantized_bits(8,3,1,alpha=1)"


def randomize_folded_layer(layer, rng: np.random.Generator) -> None:
    """Give a built folded layer a random kernel and non-trivial batchnorm statistics."""
    variables = [getattr(layer, folded_layer_type(layer).kernel)]
    variables += [layer.bias] if layer.use_bias else []
    for variable in variables:
        variable.assign(rng.normal(0, 0.5, variable.shape).astype(np.float32))
    channels = layer.batchnorm.moving_mean.shape
    statistics = (
        rng.uniform(0.5, 2.0, channels) * rng.choice([-1, 1], channels),  # gamma
        rng.normal(0, 0.5, channels),  # beta
        rng.normal(0, 0.5, channels),  # moving mean
        rng.uniform(0.1, 3.0, channels),  # moving variance
    )
    layer.batchnorm.set_weights([w.astype(np.float32) for w in statistics])


def randomize_batchnorm(model: keras.Model, seed: int = 0) -> keras.Model:
    """Randomize every folded and batch normalization layer of ``model``, nested ones included.

    Standalone batch normalizations get statistics like a trained layer's: means
    and variances of the values that reach them, gamma and beta near 1 and 0.
    """
    rng = np.random.default_rng(seed)
    for layer in _all_layers(model):
        if folded_layer_type(layer) is not None:
            randomize_folded_layer(layer, rng)
        elif isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.moving_mean.shape
            statistics = {
                "gamma": rng.uniform(0.5, 1.5, channels),
                "beta": rng.normal(0, 0.3, channels),
                "moving_mean": rng.normal(0, 1.0, channels),
                "moving_variance": rng.uniform(0.5, 4.0, channels),
            }
            for name, values in statistics.items():
                if getattr(layer, name) is not None:
                    getattr(layer, name).assign(values.astype(np.float32))
    return model


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def grid_inputs(model: keras.Model, batch: int = 16, seed: int = 1) -> list[np.ndarray]:
    """Inputs on the grid of ``INPUT_QUANTIZER`` (step 1/16) over [-8, 8).

    -8 is one step below that symmetric quantizer's range: an exported graph's input
    Quant clips it to -127/16, while the QKeras model (no input quantizer) takes it as is.
    """
    rng = np.random.default_rng(seed)
    return [
        (rng.integers(-128, 128, (batch, *shape[1:])) / 16).astype(np.float32)
        for shape in (tensor.shape for tensor in model.inputs)
    ]


def sequential_conv() -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((10, 10, 3)),
            q.QConv2DBatchnorm(
                6,
                3,
                padding="same",
                kernel_quantizer="quantized_bits(4,0,1,alpha=1)",
                bias_quantizer="quantized_bits(10,4,1)",
                name="conv",
            ),
            q.QActivation("quantized_relu(4,1)", name="relu"),
            q.QDepthwiseConv2DBatchnorm(
                3,
                strides=2,
                depth_multiplier=2,
                depthwise_quantizer="quantized_bits(4,0,1)",
                bias_quantizer="quantized_bits(12,5,1)",
                use_bias=False,
                name="dw",
            ),
            q.QActivation("quantized_relu(6,2)", name="relu2"),
            keras.layers.Flatten(name="flatten"),
            bnfold.layers.QDenseBatchnorm(
                5,
                kernel_quantizer="quantized_bits(6,0,1)",
                bias_quantizer="quantized_bits(12,4,1)",
                name="dense",
            ),
        ],
        name="sequential_conv",
    )
    return randomize_batchnorm(model)


def multi_io() -> keras.Model:
    """Two inputs, two outputs, a skip connection, a shared layer, dilation, no bias quantizer."""
    image = keras.Input((16, 16, 2), name="image")
    side = keras.Input((7,), name="side")
    x = q.QConv2DBatchnorm(
        4,
        3,
        padding="same",
        dilation_rate=2,
        kernel_quantizer="quantized_bits(5,1,1)",
        bias_quantizer=None,
        activation="quantized_relu(6,3)",
        name="conv_a",
    )(image)
    y = q.QConv2DBatchnorm(
        4,
        1,
        kernel_quantizer="quantized_bits(4,0,1)",
        bias_quantizer="quantized_bits(8,3,1)",
        name="conv_b",
    )(x)
    x = keras.layers.Add(name="skip")([x, y])
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    shared = bnfold.layers.QDenseBatchnorm(
        4,
        kernel_quantizer="quantized_bits(6,1,1)",
        bias_quantizer="quantized_bits(10,4,1)",
        name="shared_dense",
    )
    side_features = q.QDense(
        4,
        kernel_quantizer="quantized_bits(4,0,1)",
        bias_quantizer="quantized_bits(8,3,1)",
        name="side_dense",
    )(side)
    first = shared(x)
    second = shared(side_features)
    merged = keras.layers.Concatenate(name="concat")([first, second])
    out_a = q.QActivation("quantized_relu(8,4)", name="out_a")(merged)
    out_b = bnfold.layers.QDenseBatchnorm(
        3,
        kernel_quantizer="quantized_bits(4,0,1)",
        bias_quantizer=None,
        name="head",
    )(second)
    return randomize_batchnorm(keras.Model([image, side], [out_a, out_b], name="multi_io"))


def nested() -> keras.Model:
    """A functional model holding a Sequential block and a functional block.

    The nested depthwise layer has no bias quantizer, for populate to fill.
    """
    block_in = keras.Input((8, 8, 4))
    block_out = q.QDepthwiseConv2DBatchnorm(
        3,
        padding="same",
        depthwise_quantizer="quantized_bits(4,0,1)",
        bias_quantizer=None,  # populate must reach inside nested models
        activation="quantized_relu(4,2)",
        name="dw",
    )(block_in)
    block = keras.Model(block_in, block_out, name="dw_block")
    stem = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            q.QConv2DBatchnorm(
                4,
                3,
                padding="same",
                kernel_quantizer="quantized_bits(4,0,1)",
                bias_quantizer="quantized_bits(10,4,1)",
                name="conv",
            ),
            q.QActivation("quantized_relu(4,2)", name="relu"),
        ],
        name="stem",
    )
    inputs = keras.Input((8, 8, 3), name="x")
    x = block(stem(inputs))
    x = keras.layers.Flatten(name="flatten")(x)
    x = bnfold.layers.QDenseBatchnorm(
        6,
        kernel_quantizer="quantized_bits(4,0,1)",
        bias_quantizer="quantized_bits(10,4,1)",
        name="dense",
    )(x)
    return randomize_batchnorm(keras.Model(inputs, x, name="nested"))


BUILDERS = {"sequential_conv": sequential_conv, "multi_io": multi_io, "nested": nested}


def all_layers(model: keras.Model):
    """Every layer of ``model``, inside nested models too."""
    return _all_layers(model)


def unpopulated() -> keras.Model:
    """All three folded types, some without a bias quantizer, one with a float Dense after."""
    inputs = keras.Input((8, 8, 3), name="x")
    x = q.QConv2DBatchnorm(
        4,
        3,
        padding="same",
        kernel_quantizer="quantized_bits(4,0,1)",
        bias_quantizer=None,
        activation="quantized_relu(4,1)",
        name="conv",
    )(inputs)
    x = q.QDepthwiseConv2DBatchnorm(
        3,
        depthwise_quantizer="quantized_bits(4,0,1)",
        bias_quantizer=None,
        name="dw",
    )(x)
    x = q.QActivation("quantized_relu(5,2)", name="relu")(x)
    x = q.QConv2DBatchnorm(
        4,
        1,
        kernel_quantizer="quantized_bits(4,0,1)",
        bias_quantizer="quantized_bits(12,5,1)",
        activation="quantized_relu(4,1)",
        name="pointwise",
    )(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = bnfold.layers.QDenseBatchnorm(
        5,
        kernel_quantizer="quantized_bits(5,0,1)",
        bias_quantizer=None,
        name="dense",
    )(x)
    return randomize_batchnorm(keras.Model(inputs, x, name="unpopulated"))


def zoo() -> keras.Model:
    """Every layer kind the exporter supports, in one small network."""
    image = keras.Input((16, 16, 3), name="image")
    x = keras.layers.ZeroPadding2D(1, name="pad")(image)
    x = q.QConv2DBatchnorm(
        8,
        3,
        strides=2,
        kernel_quantizer="quantized_bits(4,0,1)",
        bias_quantizer=None,
        name="stem",
    )(x)
    x = keras.layers.Activation("relu", name="stem_relu")(x)
    x = q.QActivation("quantized_bits(6,2,1)", name="stem_q")(x)
    y = q.QDepthwiseConv2DBatchnorm(
        3,
        padding="same",
        depthwise_quantizer="quantized_bits(4,0,1)",
        bias_quantizer=None,
        activation="quantized_relu(4,2)",
        name="dw",
    )(x)
    x = keras.layers.Add(name="add")([x, y])
    x = keras.layers.MaxPooling2D(2, name="max")(x)
    x = keras.layers.AveragePooling2D(2, name="avg")(x)
    x = q.QConv2D(
        8,
        1,
        kernel_quantizer="quantized_bits(5,1,1,alpha=1)",
        bias_quantizer="quantized_bits(10,4,1)",
        activation="relu",
        name="pw",
    )(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.Dropout(0.5, name="drop")(x)
    x = q.QActivation("quantized_relu(6,3)", name="pw_q")(x)
    pooled = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    sequence = keras.layers.Reshape((4, 8), name="to_sequence")(
        keras.layers.Flatten(name="flat")(x)
    )
    sequence = q.QConv1D(
        4,
        2,
        kernel_quantizer="quantized_bits(4,0,1)",
        bias_quantizer="quantized_bits(10,4,1)",
        activation="quantized_relu(6,3)",
        name="conv1d",
    )(sequence)
    x = keras.layers.Concatenate(name="concat")(
        [pooled, keras.layers.Flatten(name="flat_sequence")(sequence)]
    )
    x = bnfold.layers.QDenseBatchnorm(
        5,
        kernel_quantizer="quantized_bits(6,0,1)",
        bias_quantizer=None,
        name="head",
    )(x)
    return randomize_batchnorm(keras.Model(image, x, name="zoo"))


EXPORT_BUILDERS = {**BUILDERS, "unpopulated": unpopulated, "zoo": zoo}


def feature_map() -> keras.Model:
    """The first convolution and activation of ``sequential_conv``: a 4-D (feature map) output."""
    full = sequential_conv()
    return keras.Model(full.inputs, full.get_layer("relu").output, name="feature_map")


# Models shaped like published QKeras models whose tails compute in float.

KERNEL = "quantized_bits(6,0,1,alpha=1)"
BIAS = "quantized_bits(8,3,1,alpha=1)"
RELU = "quantized_relu(6,2)"


def _randomized(model: keras.Model, seed: int = 3) -> keras.Model:
    """Random kernels and biases of the plain Q layers too (the initial ones are too tame)."""
    rng = np.random.default_rng(seed)
    for layer in _all_layers(model):
        if isinstance(layer, q.QDense | q.QConv2D | keras.layers.Dense) and not folded_layer_type(
            layer
        ):
            for variable in layer.trainable_weights:
                variable.assign(rng.normal(0, 0.5, variable.shape).astype(np.float32))
    return randomize_batchnorm(model, seed)


def tutorial_cnn() -> keras.Model:
    """The hls4ml tutorial CNN, small: QConv2D + BatchNormalization + QActivation blocks,
    a float Dense output layer and a softmax."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = inputs
    for index, filters in enumerate((4, 6)):
        x = q.QConv2D(
            filters, 3, kernel_quantizer=KERNEL, bias_quantizer=BIAS, name=f"conv{index}"
        )(x)
        x = keras.layers.BatchNormalization(name=f"bn{index}")(x)
        x = q.QActivation(RELU, name=f"relu{index}")(x)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = q.QDense(8, kernel_quantizer=KERNEL, bias_quantizer=BIAS, name="dense")(x)
    x = keras.layers.BatchNormalization(name="bn_dense")(x)
    x = q.QActivation(RELU, name="relu_dense")(x)
    x = keras.layers.Dense(5, name="output")(x)
    x = keras.layers.Activation("softmax", name="softmax")(x)
    return _randomized(keras.Model(inputs, x, name="tutorial_cnn"))


def ds_cnn() -> keras.Model:
    """The MLPerf Tiny keyword-spotting DS-CNN, small: its 25x5 average pooling (125 values)
    feeds a QDense with a softmax."""
    inputs = keras.Input((50, 10, 1), name="mfcc")
    x = q.QConv2DBatchnorm(
        4, (10, 4), strides=2, padding="same", kernel_quantizer=KERNEL, name="conv"
    )(inputs)
    x = q.QActivation(RELU, name="relu")(x)
    x = q.QDepthwiseConv2DBatchnorm(
        3, padding="same", depthwise_quantizer=KERNEL, name="depthwise"
    )(x)
    x = q.QActivation(RELU, name="relu_dw")(x)
    x = q.QConv2DBatchnorm(6, 1, kernel_quantizer=KERNEL, name="pointwise")(x)
    x = q.QActivation(RELU, name="relu_pw")(x)
    x = keras.layers.AveragePooling2D((25, 5), name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = q.QDense(12, kernel_quantizer=KERNEL, bias_quantizer=BIAS, name="classifier")(x)
    x = keras.layers.Activation("softmax", name="softmax")(x)
    return _randomized(keras.Model(inputs, x, name="ds_cnn"))


def global_average_6x6() -> keras.Model:
    """A 6x6 global average (36 values) followed by a QDense."""
    inputs = keras.Input((6, 6, 3), name="image")
    x = q.QConv2DBatchnorm(4, 1, kernel_quantizer=KERNEL, name="conv")(inputs)
    x = q.QActivation(RELU, name="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="average")(x)
    x = q.QDense(3, kernel_quantizer=KERNEL, bias_quantizer=BIAS, name="head")(x)
    return _randomized(keras.Model(inputs, x, name="global_average_6x6"))


def jet_softmax_batchnorm() -> keras.Model:
    """The jet-tagging MLP trained without folding: QDense + BatchNormalization + QActivation,
    a QDense output and a softmax."""
    inputs = keras.Input((16,), name="features")
    x = inputs
    for index, units in enumerate((16, 8)):
        x = q.QDense(units, kernel_quantizer=KERNEL, bias_quantizer=BIAS, name=f"fc{index}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{index}")(x)
        x = q.QActivation(RELU, name=f"relu{index}")(x)
    x = q.QDense(5, kernel_quantizer=KERNEL, bias_quantizer=BIAS, name="output")(x)
    x = keras.layers.Activation("softmax", name="softmax")(x)
    return _randomized(keras.Model(inputs, x, name="jet_softmax_batchnorm"))


def qbatchnorm_mlp() -> keras.Model:
    """QDense + QBatchNormalization (QKeras's default quantizers) + QActivation."""
    inputs = keras.Input((10,), name="features")
    x = q.QDense(8, kernel_quantizer=KERNEL, bias_quantizer=BIAS, name="fc")(inputs)
    x = q.QBatchNormalization(name="qbn")(x)
    x = q.QActivation(RELU, name="relu")(x)
    x = q.QDense(4, kernel_quantizer=KERNEL, bias_quantizer=BIAS, name="output")(x)
    return _randomized(keras.Model(inputs, x, name="qbatchnorm_mlp"))


def softmax_classifier() -> keras.Model:
    """A jet-tagging-like classifier computed in fixed point up to its softmax."""
    inputs = keras.Input((16,), name="features")
    x = bnfold.layers.QDenseBatchnorm(16, kernel_quantizer=KERNEL, name="fc")(inputs)
    x = q.QActivation(RELU, name="relu")(x)
    x = q.QDense(5, kernel_quantizer=KERNEL, bias_quantizer=BIAS, name="logits")(x)
    x = keras.layers.Activation("softmax", name="softmax")(x)
    return _randomized(keras.Model(inputs, x, name="softmax_classifier"))


FLOAT_ACTIVATIONS = ("sigmoid", "tanh", "softplus", "softsign", "elu", "selu", "hard_sigmoid")


def activation_heads(functions: tuple[str, ...] = FLOAT_ACTIVATIONS) -> keras.Model:
    """One QDense read by a float activation of each kind, each its own output: the
    Activation layers of ``functions``, then LeakyReLU, ELU and ThresholdedReLU layers."""
    inputs = keras.Input((8,), name="features")
    x = q.QDense(6, kernel_quantizer=KERNEL, bias_quantizer=BIAS, name="fc")(inputs)
    outputs = [keras.layers.Activation(name, name=name)(x) for name in functions]
    outputs.append(keras.layers.LeakyReLU(0.2, name="leaky_relu_layer")(x))
    outputs.append(keras.layers.ELU(1.0, name="elu_layer")(x))
    outputs.append(keras.layers.ThresholdedReLU(0.5, name="thresholded_relu_layer")(x))
    return _randomized(keras.Model(inputs, outputs, name="activation_heads"))


FLOAT_TAIL_BUILDERS = {
    "tutorial_cnn": tutorial_cnn,
    "ds_cnn": ds_cnn,
    "global_average_6x6": global_average_6x6,
    "jet_softmax_batchnorm": jet_softmax_batchnorm,
    "qbatchnorm_mlp": qbatchnorm_mlp,
    "softmax_classifier": softmax_classifier,
}


# Layers that move, repeat or merge values, in shapes QKeras users build.

SMALL_KERNEL = "quantized_bits(4,0,1,alpha=1)"
WIDE_BIAS = "quantized_bits(10,4,1)"


def _spread_weights(model: keras.Model) -> keras.Model:
    """Every kernel and bias spread over its quantizer's range (the initial ones are tame)."""
    rng = np.random.default_rng(5)
    for layer in model.layers:
        for variable in layer.trainable_weights:
            variable.assign(rng.normal(0, 0.6, variable.shape).astype(np.float32))
    return model


def _qconv2d(
    filters: int, kernel: int, name: str, activation: str, **settings
) -> keras.layers.Layer:
    return q.QConv2D(
        filters,
        kernel,
        padding="same",
        kernel_quantizer=SMALL_KERNEL,
        bias_quantizer=WIDE_BIAS,
        activation=activation,
        name=name,
        **settings,
    )


def _qdense(units: int, name: str, activation: str | None = None) -> keras.layers.Layer:
    return q.QDense(
        units,
        kernel_quantizer=SMALL_KERNEL,
        bias_quantizer=WIDE_BIAS,
        activation=activation,
        name=name,
    )


def unet_decoder() -> keras.Model:
    """A U-Net-like encoder-decoder: pool down, upsample (nearest and bilinear), concatenate
    the skip connection, crop and pad back, permute to channels-first for the head."""
    image = keras.Input((8, 8, 2), name="image")
    skip = _qconv2d(4, 3, "enc", "quantized_relu(4,1)")(image)
    x = keras.layers.MaxPooling2D(2, name="down")(skip)
    x = _qconv2d(4, 3, "mid", "quantized_relu(5,2)")(x)
    nearest = keras.layers.UpSampling2D(2, name="up_nearest")(x)
    bilinear = keras.layers.UpSampling2D((2, 4), interpolation="bilinear", name="up_bilinear")(x)
    x = keras.layers.Concatenate(name="merge_skip")([nearest, skip])
    x = _qconv2d(4, 3, "dec", "quantized_relu(4,2)")(x)
    x = keras.layers.Cropping2D(((1, 0), (2, 1)), name="crop")(x)
    x = keras.layers.ZeroPadding2D(((0, 1), (1, 2)), name="pad")(x)
    x = keras.layers.Permute((3, 1, 2), name="to_channels_first")(x)
    head = _qdense(3, "head")(keras.layers.Flatten(name="flat")(x))
    side = _qconv2d(2, 1, "side", "quantized_relu(6,2)")(bilinear)
    outputs = [head, keras.layers.Flatten(name="side_flat")(side)]
    return _spread_weights(keras.Model(image, outputs, name="unet_decoder"))


def sequence_decoder() -> keras.Model:
    """1-D: a convolution, upsampled, cropped and padded; a code repeated over time."""
    sequence = keras.Input((8, 3), name="sequence")
    x = q.QConv1D(
        4,
        3,
        kernel_quantizer=SMALL_KERNEL,
        bias_quantizer=WIDE_BIAS,
        activation="quantized_relu(4,1)",
        name="conv",
    )(sequence)
    x = keras.layers.UpSampling1D(2, name="up")(x)
    x = keras.layers.Cropping1D((1, 2), name="crop")(x)
    x = keras.layers.ZeroPadding1D((2, 1), name="pad")(x)
    code = _qdense(5, "code", "quantized_bits(5,1,1)")(keras.layers.Flatten(name="flat")(x))
    x = keras.layers.RepeatVector(3, name="repeat")(code)
    x = q.QConv1D(2, 2, kernel_quantizer=SMALL_KERNEL, bias_quantizer=WIDE_BIAS, name="decode")(x)
    outputs = keras.layers.Flatten(name="out")(x)
    return _spread_weights(keras.Model(sequence, outputs, name="sequence_decoder"))


def merge_block() -> keras.Model:
    """A residual block with Subtract, an attention-like Multiply gate, Maximum and Minimum
    of two branches, an Add of three and a Concatenate (every merge hls4ml reads), then a
    Permute."""
    features = keras.Input((8,), name="features")
    context = keras.Input((8,), name="context")
    x = _qdense(6, "x", "quantized_bits(6,2,1)")(features)
    y = _qdense(6, "y", "quantized_relu(4,1)")(context)
    gate = _qdense(6, "gate", "quantized_relu(4,0)")(context)
    residual = keras.layers.Subtract(name="residual")([x, y])
    gated = keras.layers.Multiply(name="gated")([residual, gate])
    upper = keras.layers.Maximum(name="upper")([x, y])
    lower = keras.layers.Minimum(name="lower")([x, gated])
    total = keras.layers.Add(name="total")([upper, lower, gate])
    merged = keras.layers.Concatenate(name="merged")([total, gated])
    grid = keras.layers.Reshape((3, 4), name="grid")(merged)
    transposed = keras.layers.Permute((2, 1), name="transposed")(grid)
    outputs = _qdense(4, "head")(keras.layers.Flatten(name="flat")(transposed))
    return _spread_weights(keras.Model([features, context], outputs, name="merge_block"))


def averages() -> keras.Model:
    """Average of two and of four (fixed point) and of three (float) branches; a
    Concatenate of three."""
    inputs = keras.Input((8,), name="inputs")
    quantizers = ("quantized_bits(6,2,1)", "quantized_relu(4,1)", "quantized_bits(5,0,1)")
    branches = [
        _qdense(4, f"branch{index}", quantizer)(inputs)
        for index, quantizer in enumerate((*quantizers, "quantized_relu(3,2)"))
    ]
    two = keras.layers.Average(name="mean2")(branches[:2])
    four = keras.layers.Average(name="mean4")(branches)
    three = keras.layers.Average(name="mean3")(branches[:3])
    joined = keras.layers.Concatenate(name="joined")(branches[1:])
    heads = [_qdense(3, f"head{n}")(x) for n, x in ((2, two), (4, four), (3, three))]
    outputs = [*heads, _qdense(3, "head_joined")(joined)]
    return _spread_weights(keras.Model(inputs, outputs, name="averages"))


# One MAC layer with each QKeras quantizer kind on its kernel or on its activation.

QUANTIZER_SOURCE = "quantized_bits(8,3,0,1,alpha=1)"
_QUANTIZER_BIAS = "quantized_bits(8,3,1,alpha=1)"
_PO2_ALPHA = np.array([0.5, 1.0, 2.0, 0.25], dtype=np.float32)

# id: (kernel quantizer of the first layer, its activation quantizer or None, layer kind)
QUANTIZER_CASES = {
    "binary-kernel": ("binary()", None, "dense"),
    "binary-alpha1-kernel": ("binary(alpha=1)", None, "dense"),
    "stochastic_binary-kernel": ("stochastic_binary()", None, "dense"),
    "ternary-kernel": ("ternary()", None, "dense"),
    "ternary-threshold-kernel": ("ternary(alpha=1,threshold=0.5)", None, "dense"),
    "stochastic_ternary-kernel": ("stochastic_ternary()", None, "dense"),
    "po2-kernel": ("quantized_po2(4)", None, "dense"),
    "po2-max1-kernel": ("quantized_po2(5,1)", None, "conv"),
    "relu_po2-kernel": ("quantized_relu_po2(4)", None, "dense"),
    "bits-alpha-float-kernel": ("quantized_bits(4,0,1,alpha=0.5)", None, "dense"),
    "bits-alpha-array-kernel": (quantizers.quantized_bits(4, 0, 1, alpha=_PO2_ALPHA), None, "conv"),
    "ternary-alpha-float-kernel": ("ternary(alpha=0.25)", None, "dense"),
    "bits-unsigned-kernel": ("quantized_bits(4,1,0,0,alpha=1)", None, "dense"),
    "bits-symmetric-kernel": ("quantized_bits(4,1,1,1,alpha=1)", None, "conv"),
    "tanh-kernel": ("quantized_tanh(4)", None, "dense"),
    "bits-unsigned": (None, "quantized_bits(6,2,0,0,alpha=1)", "dense"),
    "bits-symmetric": (None, "quantized_bits(6,2,1,1,alpha=1)", "conv"),
    "relu-slope": (None, "quantized_relu(5,2,negative_slope=0.25)", "dense"),
    "relu-slope-half": (None, "quantized_relu(4,1,negative_slope=0.5)", "conv"),
    "binary": (None, "binary()", "dense"),
    "stochastic_binary": (None, "stochastic_binary()", "conv"),
    "ternary": (None, "ternary()", "dense"),
    "ternary-threshold": (None, "ternary(threshold=0.5)", "conv"),
    "stochastic_ternary": (None, "stochastic_ternary()", "dense"),
    "po2": (None, "quantized_po2(4)", "dense"),
    "po2-max": (None, "quantized_po2(5,4)", "conv"),
    "relu_po2": (None, "quantized_relu_po2(4,4)", "dense"),
    "relu_po2-quadratic": (None, "quantized_relu_po2(5,quadratic_approximation=True)", "dense"),
    "tanh": (None, "quantized_tanh(4)", "dense"),
    "tanh-symmetric-real": (None, "quantized_tanh(6,0,1,1)", "conv"),
    "sigmoid": (None, "quantized_sigmoid(5)", "dense"),
    "sigmoid-symmetric-real": (None, "quantized_sigmoid(6,1,1)", "dense"),
    "hswish": (None, "quantized_hswish(8,2)", "dense"),
    "hswish-symmetric": (None, "quantized_hswish(6,3,1)", "conv"),
}


def quantizer_model(kernel, activation, kind: str, seed: int = 0) -> keras.Model:
    """A MAC layer with ``kernel`` (or 4-bit weights), ``activation``, then a QDense."""
    kernel = kernel or "quantized_bits(4,0,1,alpha=1)"
    if kind == "conv":
        inputs = keras.Input((5, 5, 3))
        x = q.QConv2D(4, 3, kernel_quantizer=kernel, bias_quantizer=_QUANTIZER_BIAS, name="first")(
            inputs
        )
        x = keras.layers.Flatten(name="flat")(x)
    else:
        inputs = keras.Input((8,))
        x = q.QDense(6, kernel_quantizer=kernel, bias_quantizer=_QUANTIZER_BIAS, name="first")(
            inputs
        )
    if activation is not None:
        x = q.QActivation(activation, name="act")(x)
    x = q.QDense(
        3,
        kernel_quantizer="quantized_bits(6,0,1,alpha=1)",
        bias_quantizer=_QUANTIZER_BIAS,
        name="last",
    )(x)
    model = keras.Model(inputs, x)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if weights:
            layer.set_weights([rng.normal(0.0, 1.0, w.shape).astype(np.float32) for w in weights])
    return model


def by_name(name: str) -> tuple[keras.Model, list[str]]:
    """The model ``name`` makes and its input quantizers, for scripts that take builder names.

    ``name`` is a function of this module that takes no arguments (``unet_decoder``) or
    ``quantizer-`` and a key of ``QUANTIZER_CASES`` (``quantizer-ternary``).
    """
    case = name.removeprefix("quantizer-")
    if name.startswith("quantizer-") and case in QUANTIZER_CASES:
        return quantizer_model(*QUANTIZER_CASES[case]), [QUANTIZER_SOURCE]
    function = globals().get(name)
    takes_nothing = inspect.isfunction(function) and all(
        p.default is not p.empty for p in inspect.signature(function).parameters.values()
    )
    if name.startswith("_") or not takes_nothing:
        raise ValueError(f"No test model is called {name!r}")
    model = function()
    return model, [INPUT_QUANTIZER] * len(model.inputs)


def upsampling_2d(interpolation: str = "nearest") -> keras.Model:
    """One UpSampling2D between two convolutions, to see what FINN makes of it alone."""
    image = keras.Input((4, 4, 2), name="image")
    x = _qconv2d(3, 3, "before", "quantized_relu(4,1)")(image)
    x = keras.layers.UpSampling2D(2, interpolation=interpolation, name="up")(x)
    x = _qconv2d(2, 3, "after", "quantized_relu(6,2)")(x)
    return _spread_weights(keras.Model(image, x, name=f"upsampling_2d_{interpolation}"))


def upsampling_2d_bilinear() -> keras.Model:
    """``upsampling_2d`` with bilinear interpolation."""
    return upsampling_2d("bilinear")


def quantized_pooling() -> keras.Model:
    """QAveragePooling2D (2x2) and QGlobalAveragePooling2D, each with an average_quantizer,
    and a QSeparableConv2D with depth multiplier 1 between them."""
    image = keras.Input((8, 8, 2), name="image")
    x = _qconv2d(4, 3, "conv", "quantized_relu(4,1)")(image)
    x = q.QAveragePooling2D(2, average_quantizer="quantized_bits(8,2,1)", name="pool")(x)
    x = q.QSeparableConv2D(
        4,
        3,
        padding="same",
        depthwise_quantizer=SMALL_KERNEL,
        pointwise_quantizer=SMALL_KERNEL,
        bias_quantizer=WIDE_BIAS,
        name="separable",
    )(x)
    x = q.QActivation("quantized_relu(5,2)", name="act")(x)
    x = q.QGlobalAveragePooling2D(average_quantizer="quantized_bits(8,2,1)", name="gap")(x)
    outputs = _qdense(3, "head")(x)
    return _spread_weights(keras.Model(image, outputs, name="quantized_pooling"))


def assert_qonnx_equals_qkeras(model, onnx_model, source: str, *, count: int, seed: int) -> None:
    """The export passes onnx.checker's full check, and qonnx's execution of it equals
    QKeras bit for bit on ``count`` samples on the input quantizer ``source``'s grid."""
    onnx.checker.check_model(onnx_model, full_check=True)
    inputs = sample_inputs(model, [FixedPoint.from_quantizer(source)], count=count, seed=seed)
    (result,) = qonnx_outputs(onnx_model, inputs)
    np.testing.assert_array_equal(result, model.predict(inputs, verbose=0))


# Published QKeras models, small: each keeps the original's layer classes, quantizers
# (with their exact arguments, as objects or strings as the original passes them),
# activations, batch normalization and pooling; only filter and unit counts shrink, and
# image sizes where a comment says (the hls4ml C simulation compiles in minutes otherwise).


def _mnist_classifier(inputs, x, kernel_quantizer, bias_quantizer) -> keras.Model:
    """The QKeras examples' last layers: Flatten, a 10-unit QDense "dense", a softmax."""
    x = keras.layers.Flatten()(x)
    x = q.QDense(
        10, kernel_quantizer=kernel_quantizer, bias_quantizer=bias_quantizer, name="dense"
    )(x)
    x = keras.layers.Activation("softmax", name="softmax")(x)
    return keras.Model(inputs=[inputs], outputs=[x])


def qkeras_mnist() -> keras.Model:
    """google/qkeras examples/example_mnist.py: strided QConv2D blocks with 4-bit kernels
    and biases, quantized_relu(4,0), a QDense and a softmax."""
    x = x_in = keras.Input((28, 28, 1), name="input")
    for index, (filters, kernel) in enumerate(((4, 2), (6, 3), (6, 2))):
        x = q.QConv2D(
            filters,
            (kernel, kernel),
            strides=(2, 2),
            kernel_quantizer=quantizers.quantized_bits(4, 0, 1),
            bias_quantizer=quantizers.quantized_bits(4, 0, 1),
            name=f"conv2d_{index}_m",
        )(x)
        x = q.QActivation("quantized_relu(4,0)", name=f"act{index}_m")(x)
    return _mnist_classifier(
        x_in, x, quantizers.quantized_bits(4, 0, 1), quantizers.quantized_bits(4, 0, 1)
    )


def qkeras_mnist_po2() -> keras.Model:
    """google/qkeras examples/example_mnist_po2.py: a quantized_relu_po2 on the input,
    QConv2D with quantized_po2 kernels and biases (one with stochastic rounding),
    quantized_relu_po2 activations, a QDense and a softmax."""
    x = x_in = keras.Input((28, 28, 1), name="input")
    x = q.QActivation("quantized_relu_po2(4)", name="acti")(x)
    settings = (
        (4, 2, quantizers.quantized_po2(4, 1), "quantized_relu_po2(4,4)"),
        (
            6,
            3,
            quantizers.quantized_po2(4, 1),
            "quantized_relu_po2(4,4,use_stochastic_rounding=True)",
        ),
        (6, 2, quantizers.quantized_po2(4, 1, use_stochastic_rounding=True), "quantized_relu(4,1)"),
    )
    for index, (filters, kernel, kernel_quantizer, activation) in enumerate(settings):
        x = q.QConv2D(
            filters,
            (kernel, kernel),
            strides=(2, 2),
            kernel_quantizer=kernel_quantizer,
            bias_quantizer=quantizers.quantized_po2(4, 1),
            name=f"conv2d_{index}_m",
        )(x)
        x = q.QActivation(activation, name=f"act{index}_m")(x)
    return _mnist_classifier(
        x_in, x, quantizers.quantized_bits(4, 0, 1), quantizers.quantized_bits(4, 0, 1)
    )


def qkeras_mnist_bn() -> keras.Model:
    """google/qkeras examples/example_mnist_bn.py (WITH_BN=1): ternary QConv2D without bias,
    QBatchNormalization with power-of-two gamma, beta and variance quantizers,
    quantized_relu(3,1), max pooling, a QDense with a quantized_ulaw kernel, a softmax.

    The example's ``ternary(threshold=0.1)`` kernels fail in QKeras 0.9.0 itself (QConv2D
    makes their alpha "auto_po2", and ternary then asserts that threshold is None), so
    these are ``ternary(alpha=1, threshold=0.1)``, the closest kernel QKeras runs."""
    x = x_in = keras.Input((28, 28, 1), name="input")
    for index, filters in enumerate((4, 6, 4)):
        x = q.QConv2D(
            filters,
            (3, 3),
            strides=1,
            kernel_quantizer=quantizers.ternary(alpha=1, threshold=0.1),
            bias_quantizer=None,
            bias_range=None,
            use_bias=False,
            name=f"conv2d_{index}_m",
        )(x)
        x = q.QBatchNormalization(
            gamma_quantizer=quantizers.quantized_relu_po2(4, 8),
            variance_quantizer=quantizers.quantized_relu_po2(6),
            beta_quantizer=quantizers.quantized_po2(4, 4),
            gamma_range=8,
            beta_range=4,
            name=f"bn{index}",
        )(x)
        x = q.QActivation("quantized_relu(3,1)", name=f"act{index}_m")(x)
        x = keras.layers.MaxPooling2D(2, 2, name=f"mp_{index}")(x)
    return _mnist_classifier(
        x_in, x, quantizers.quantized_ulaw(4, 0, 1), quantizers.quantized_bits(4, 0, 1)
    )


def qkeras_qdense() -> keras.Model:
    """google/qkeras examples/example_qdense.py: quantized_relu(4) on the flat MNIST input,
    a QDense with ternary() weights, quantized_relu(2), a QDense and a softmax."""
    x = x_in = keras.Input((784,), name="input")
    x = q.QActivation("quantized_relu(4)", name="act_i")(x)
    x = q.QDense(
        16,
        kernel_quantizer=quantizers.ternary(),
        bias_quantizer=quantizers.quantized_bits(4, 0, 1),
        name="dense0",
    )(x)
    x = q.QActivation("quantized_relu(2)", name="act0")(x)
    x = q.QDense(
        10,
        kernel_quantizer=quantizers.quantized_bits(4, 0, 1),
        bias_quantizer=quantizers.quantized_bits(4, 0, 1),
        name="dense2",
    )(x)
    x = keras.layers.Activation("softmax", name="softmax")(x)
    return keras.Model(inputs=[x_in], outputs=[x])


def qkeras_keras_to_qkeras() -> keras.Model:
    """google/qkeras examples/example_keras_to_qkeras.py: the model ``model_quantize`` makes of
    the example's float Conv2D/relu/MaxPooling2D CNN with the example's dictionary: binary,
    ternary and 4-bit kernels, quantized_relu(4,0) for every relu but act2_m's
    quantized_relu(6,2), a QDense with 3-bit kernel and bias, a float softmax. Built
    directly: QKeras 0.9.0's ``model_quantize`` itself fails on TensorFlow 2.21 (its
    ``model_from_json`` cannot locate class 'QConv2D')."""
    x = x_in = keras.Input((22, 22, 3), name="input")  # 32x32 in the example
    kernels = ("binary()", "ternary()", "quantized_bits(4,0,1)")
    activations = ("quantized_relu(4,0)", "quantized_relu(4,0)", "quantized_relu(6,2)")
    for index, (filters, kernel, activation) in enumerate(
        zip((4, 6, 4), kernels, activations, strict=True)
    ):
        x = q.QConv2D(
            filters,
            (3, 3),
            strides=1,
            kernel_quantizer=kernel,
            bias_quantizer="quantized_bits(4,0,1)",
            name=f"conv2d_{index}_m",
        )(x)
        x = q.QActivation(activation, name=f"act{index}_m")(x)
        x = keras.layers.MaxPooling2D(2, 2, name=f"mp_{index}")(x)
    return _mnist_classifier(x_in, x, "quantized_bits(3,0,1)", "quantized_bits(3,0,1)")


def hls4ml_tutorial_jet_mlp() -> keras.Model:
    """fastmachinelearning/hls4ml-tutorial part 4 (quantization): a Sequential jet-tagging
    MLP of QDense layers with quantized_bits(6,0,alpha=1) kernels and biases, l1
    regularizers, quantized_relu(6) objects and a softmax."""
    regularizer = keras.regularizers.l1(0.0001)
    layers = []
    for index, units in enumerate((16, 8, 8), start=1):
        layers.append(
            q.QDense(
                units,
                name=f"fc{index}",
                kernel_quantizer=quantizers.quantized_bits(6, 0, alpha=1),
                bias_quantizer=quantizers.quantized_bits(6, 0, alpha=1),
                kernel_initializer="lecun_uniform",
                kernel_regularizer=regularizer,
            )
        )
        layers.append(q.QActivation(activation=quantizers.quantized_relu(6), name=f"relu{index}"))
    layers.append(
        q.QDense(
            5,
            name="output",
            kernel_quantizer=quantizers.quantized_bits(6, 0, alpha=1),
            bias_quantizer=quantizers.quantized_bits(6, 0, alpha=1),
            kernel_initializer="lecun_uniform",
            kernel_regularizer=regularizer,
        )
    )
    layers.append(keras.layers.Activation(activation="softmax", name="softmax"))
    model = keras.Sequential([keras.Input((16,)), *layers])
    return model


def hls4ml_tutorial_cnn() -> keras.Model:
    """fastmachinelearning/hls4ml-tutorial part 6 (CNNs, SVHN): QConv2DBatchnorm blocks
    with quantized_bits(6,0,alpha=1) kernels and biases, quantized_relu(6) and max
    pooling, QDense (no bias) + BatchNormalization + quantized_relu(6) blocks, a float
    Dense output and a softmax."""
    x = x_in = keras.Input(shape=(22, 22, 3))  # SVHN's 32x32 in the tutorial
    for index, filters in enumerate((4, 4, 6)):
        x = q.QConv2DBatchnorm(
            int(filters),
            kernel_size=(3, 3),
            strides=(1, 1),
            kernel_quantizer="quantized_bits(6,0,alpha=1)",
            bias_quantizer="quantized_bits(6,0,alpha=1)",
            kernel_initializer="lecun_uniform",
            kernel_regularizer=keras.regularizers.l1(0.0001),
            use_bias=True,
            name=f"fused_convbn_{index}",
        )(x)
        x = q.QActivation("quantized_relu(6)", name=f"conv_act_{index}")(x)
        x = keras.layers.MaxPooling2D(pool_size=(2, 2), name=f"pool_{index}")(x)
    x = keras.layers.Flatten()(x)
    for index, units in enumerate((8, 8)):
        x = q.QDense(
            units,
            kernel_quantizer="quantized_bits(6,0,alpha=1)",
            kernel_initializer="lecun_uniform",
            kernel_regularizer=keras.regularizers.l1(0.0001),
            name=f"dense_{index}",
            use_bias=False,
        )(x)
        x = keras.layers.BatchNormalization(name=f"bn_dense_{index}")(x)
        x = q.QActivation("quantized_relu(6)", name=f"dense_act_{index}")(x)
    x = keras.layers.Dense(10, name="output_dense")(x)
    x_out = keras.layers.Activation("softmax", name="output_softmax")(x)
    return keras.Model(inputs=[x_in], outputs=[x_out], name="qkeras")


def _eembc_conv(filters: int, kernel: int, stride: int, logit, layer=None) -> keras.layers.Layer:
    """A convolution of resnet_v1_eembc_quantized: QConv2DBatchnorm unless ``layer`` says."""
    return (layer or q.QConv2DBatchnorm)(
        filters,
        kernel_size=kernel,
        strides=stride,
        padding="same",
        kernel_quantizer=logit,
        bias_quantizer=logit,
        kernel_initializer="he_normal",
        kernel_regularizer=keras.regularizers.l1_l2(l1=0, l2=1e-4),
    )


def mlperf_tiny_resnet() -> keras.Model:
    """MLPerf Tiny v0.7 hls4ml-finn image classification (RN07), resnet_v1_eembc_quantized
    with its default arguments: QConv2DBatchnorm with quantized_bits(7,2,alpha=1) kernels
    and biases, quantized_relu(7,2), QActivation(quantized_bits) on the branches of each
    Add, a QConv2D on each strided skip, a QDense and a softmax."""
    logit = quantizers.quantized_bits(7, 2, alpha=1, use_stochastic_rounding=False)
    activation = quantizers.quantized_relu(7, 2, use_stochastic_rounding=False)
    inputs = keras.Input(shape=(8, 8, 3))  # CIFAR-10's 32x32 in the submission
    x = _eembc_conv(4, 3, 1, logit)(inputs)
    x = q.QActivation(activation=activation)(x)
    y = _eembc_conv(4, 3, 1, logit)(x)
    y = q.QActivation(activation=activation)(y)
    y = _eembc_conv(4, 3, 1, logit)(y)
    y = q.QActivation(activation=logit)(y)
    x = keras.layers.Add()([x, y])
    x = q.QActivation(activation=activation)(x)
    for filters in (6, 8):  # the second and third stacks: strides "212", kernels 3, 3, 1
        y = _eembc_conv(filters, 3, 2, logit)(x)
        y = q.QActivation(activation=activation)(y)
        y = _eembc_conv(filters, 3, 1, logit)(y)
        x = _eembc_conv(filters, 1, 2, logit, layer=q.QConv2D)(x)
        x = q.QActivation(activation=logit)(x)
        y = q.QActivation(activation=logit)(y)
        x = keras.layers.Add()([x, y])
        x = q.QActivation(activation=activation)(x)
    y = keras.layers.Flatten()(x)
    outputs = q.QDense(
        10, kernel_quantizer=logit, bias_quantizer=logit, kernel_initializer="he_normal"
    )(y)
    outputs = keras.layers.Activation("softmax", name="softmax")(outputs)
    return keras.Model(inputs=inputs, outputs=outputs)


def mlperf_tiny_autoencoder() -> keras.Model:
    """MLPerf Tiny v0.7 hls4ml-finn anomaly detection (AD08): get_qdense_batchnorm_model with
    ad08.yml's settings (64 inputs, encode and decode depth 2, latent 8): QDenseBatchnorm
    with quantized_bits(12,6,alpha=1) kernels and biases, quantized_relu(6,6), and a last
    QDense with quantized_bits(12,0,alpha=1)."""
    settings = {
        "kernel_quantizer": quantizers.quantized_bits(12, 6, alpha=1),
        "bias_quantizer": quantizers.quantized_bits(12, 6, alpha=1),
        "kernel_initializer": "lecun_uniform",
        "kernel_regularizer": keras.regularizers.l1(0),
    }
    folded = bnfold.layers.QDenseBatchnorm
    input_layer = keras.Input(shape=(64,))
    h = input_layer
    for units in (12, 12, 8, 12, 12):  # encoder, latent, decoder (72 -> 12 units)
        h = folded(units, **settings)(h)
        h = q.QActivation(activation=quantizers.quantized_relu(6, 6))(h)
    last = {
        **settings,
        "kernel_quantizer": quantizers.quantized_bits(12, 0, alpha=1),
        "bias_quantizer": quantizers.quantized_bits(12, 0, alpha=1),
    }
    h = q.QDense(64, **last)(h)
    return keras.Model(inputs=input_layer, outputs=h)


def qkeras_cifar10_po2() -> keras.Model:
    """google/qkeras examples/example_cifar10_po2.py: quantized_relu_po2(4,4) on the input,
    QConv2D with quantized_po2(4,1) kernels and quantized_po2(4,4) biases (bias_range=4), a
    ternary() activation, quantized_relu(6,2) and (4,2), a 4-bit QConv2D, max pooling, a
    QDense with a quantized_ulaw(4,0,1) kernel and a softmax. 4, 6 and 4 filters (128, 256
    and 128 in the example) on 22x22 images (CIFAR-10's 32x32)."""
    x = x_in = keras.Input((22, 22, 3), name="input")
    x = q.QActivation("quantized_relu_po2(4,4)", name="acti")(x)
    po2 = quantizers.quantized_po2
    settings = (  # a quantizer object per argument, as in the example
        (4, po2(4, 1), po2(4, 4), 4, "ternary()"),
        (6, po2(4, 1), po2(4, 4), 4, "quantized_relu(6,2)"),
        (
            4,
            quantizers.quantized_bits(4, 0, 1),
            quantizers.quantized_bits(4, 0, 1),
            None,
            "quantized_relu(4,2)",
        ),
    )
    for index, (filters, kernel, bias, bias_range, activation) in enumerate(settings):
        options = {} if bias_range is None else {"bias_range": bias_range}
        x = q.QConv2D(
            filters,
            (3, 3),
            strides=1,
            kernel_quantizer=kernel,
            bias_quantizer=bias,
            name=f"conv2d_{index}_m",
            **options,
        )(x)
        x = q.QActivation(activation, name=f"act{index}_m")(x)
        x = keras.layers.MaxPooling2D(2, 2, name=f"mp_{index}")(x)
    return _mnist_classifier(
        x_in, x, quantizers.quantized_ulaw(4, 0, 1), quantizers.quantized_bits(4, 0, 1)
    )


def qkeras_mnist_ae() -> keras.Model:
    """google/qkeras examples/example_mnist_ae.py: three valid QConv2D and three
    QConv2DTranspose with quantized_bits(4,0,1) kernels and biases, each followed by
    quantized_relu(4,0), a same-padded 1-filter QConv2D and a sigmoid. 6, 4, 2, 2, 4 and 6
    filters (32, 16, 8, 8, 16, 32 in the example) on 12x12 images (MNIST's 28x28).

    QKeras 0.9.0's QConv2DTranspose fails when called on TensorFlow 2.15 and later, so the model is
    built with Keras's Conv2DTranspose and ``SAVED_BY_OLDER_QKERAS`` turns those layers
    into the QConv2DTranspose a stack where it ran would have saved."""
    bits = quantizers.quantized_bits  # a quantizer object per argument, as in the example
    x = x_in = keras.Input((12, 12, 1))
    for filters in (6, 4, 2):
        x = q.QConv2D(
            filters,
            kernel_size=(3, 3),
            kernel_quantizer=bits(4, 0, 1),
            bias_quantizer=bits(4, 0, 1),
        )(x)
        x = q.QActivation("quantized_relu(4,0)")(x)
    for filters in (2, 4, 6):
        x = keras.layers.Conv2DTranspose(filters, kernel_size=(3, 3))(x)
        x = q.QActivation("quantized_relu(4,0)")(x)
    x = q.QConv2D(
        1,
        kernel_size=(3, 3),
        padding="same",
        kernel_quantizer=bits(4, 0, 1),
        bias_quantizer=bits(4, 0, 1),
    )(x)
    x = keras.layers.Activation("sigmoid")(x)
    return keras.Model(inputs=[x_in], outputs=[x])


def qkeras_mnist_prune() -> keras.Model:
    """google/qkeras examples/example_mnist_prune.py with prune_whole_model: its
    build_model is example_mnist.py's CNN (``qkeras_mnist``), wrapped whole by
    tensorflow-model-optimization's prune_low_magnitude with ConstantSparsity(0.75,
    begin_step=2000, frequency=100); the example saves it still wrapped."""
    import tensorflow_model_optimization as tfmot

    model = qkeras_mnist()
    schedule = tfmot.sparsity.keras.ConstantSparsity(0.75, begin_step=2000, frequency=100)
    return tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)


# name: Keras class -> the QKeras class the published model has in its place.
SAVED_BY_OLDER_QKERAS = {"qkeras_mnist_ae": {"Conv2DTranspose": "QConv2DTranspose"}}


def qkeras_qoctave() -> keras.Model:
    """google/qkeras examples/example_qoctave.py with its arguments: six QOctaveConv2D
    blocks (separable, quantized_bits(4,1) depthwise, pointwise and bias quantizers, a
    quantized_bits(6,2,1) depthwise activation, quantized_bits(16,7,1) accumulators,
    quantized_relu(6,2)), UpSampling2D, a QConv2D with quantized_bits(4,0,1) and a
    softmax. 8, 10, 10, 8, 8 and 8 filters (32, 64, 64, 32, 32, 32 in the example) on
    32x32 images (256x256 in the example).

    QKeras 0.9.0 itself fails to build it: its QOctaveConv2D passes arguments its own
    layers do not accept: ``depthwise_activation`` and ranges to QSeparableConv2D, and
    ``quantizer`` to QAveragePooling2D (with ``use_separable=False`` too)."""
    initializer = keras.initializers.he_normal(seed=42)
    common = {
        "kernel_initializer": initializer,
        "bias_initializer": "zeros",
        "bias_quantizer": "quantized_bits(4,1)",
        "depthwise_quantizer": "quantized_bits(4,1)",
        "depthwise_activation": "quantized_bits(6,2,1)",
        "pointwise_quantizer": "quantized_bits(4,1)",
        "acc_quantizer": "quantized_bits(16,7,1)",
        "activation": "quantized_relu(6,2)",
        "use_separable": True,
    }
    blocks = (
        ("block1_conv1", 8, 0.5, (2, 2), "valid"),
        ("block2_conv1", 10, 0.4, (2, 2), "same"),
        ("block3_conv1", 10, 0.4, (2, 2), "same"),
        ("block3_conv2", 8, 0.4, (1, 1), "same"),
        ("block3_conv3", 8, 0.3, (1, 1), "same"),
        ("block3_conv_down", 8, 0.0, (2, 2), "same"),
    )
    x_in = keras.Input(shape=(32, 32, 3))
    high, low = x_in, None
    for name, filters, alpha, strides, padding in blocks:
        high, low = q.QOctaveConv2D(
            filters, (3, 3), alpha=alpha, strides=strides, padding=padding, name=name, **common
        )([high, low])
    x = keras.layers.UpSampling2D(size=(2, 2), data_format="channels_last")(high)
    x = q.QConv2D(
        2,
        (2, 2),
        strides=(1, 1),
        kernel_initializer=initializer,
        bias_initializer="ones",
        kernel_quantizer=quantizers.quantized_bits(4, 0, 1),
        bias_quantizer=quantizers.quantized_bits(4, 0, 1),
        padding="same",
        name="conv_up",
    )(x)
    x = keras.layers.Activation("softmax", name="softmax")(x)
    return keras.Model(x_in, x, name="qoctave_network")


PUBLISHED_BUILDERS = {
    "qkeras_mnist": qkeras_mnist,
    "qkeras_mnist_po2": qkeras_mnist_po2,
    "qkeras_mnist_bn": qkeras_mnist_bn,
    "qkeras_qdense": qkeras_qdense,
    "qkeras_keras_to_qkeras": qkeras_keras_to_qkeras,
    "hls4ml_tutorial_jet_mlp": hls4ml_tutorial_jet_mlp,
    "hls4ml_tutorial_cnn": hls4ml_tutorial_cnn,
    "mlperf_tiny_resnet": mlperf_tiny_resnet,
    "mlperf_tiny_autoencoder": mlperf_tiny_autoencoder,
    # Last: each build draws initial weights from Keras's global random state, so models
    # added before others would change those models' weights.
    "qkeras_cifar10_po2": qkeras_cifar10_po2,
    "qkeras_mnist_ae": qkeras_mnist_ae,
    "qkeras_mnist_prune": qkeras_mnist_prune,
}


def save_trained(model: keras.Model, path, seed: int = 0) -> None:
    """``model`` compiled, fitted for one short epoch on random data of its input shape,
    and saved with ``model.save`` as its users save it (optimizer state and training
    config in the file). Batch normalization statistics are randomized first; a model
    wrapped for pruning trains with tensorflow-model-optimization's UpdatePruningStep."""
    randomize_batchnorm(model, seed)
    rng = np.random.default_rng(seed)
    shape = model.input_shape
    inputs = rng.uniform(0, 1, (64, *shape[1:])).astype(np.float32)
    last = getattr(model.layers[-1], "layer", model.layers[-1])  # through a pruning wrapper
    softmax = last.get_config().get("activation") == "softmax"
    outputs = (64, *model.output_shape[1:])
    if softmax:
        width = outputs[-1]
        targets = np.eye(width, dtype=np.float32)[rng.integers(0, width, outputs[:-1])]
        model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    else:
        targets = rng.uniform(0, 1, outputs).astype(np.float32)
        model.compile(optimizer="adam", loss="mean_squared_error")
    callbacks = []
    if any(type(layer).__name__ == "PruneLowMagnitude" for layer in model.layers):
        import tensorflow_model_optimization as tfmot

        callbacks.append(tfmot.sparsity.keras.UpdatePruningStep())
    model.fit(inputs, targets, batch_size=16, epochs=1, verbose=0, callbacks=callbacks)
    model.save(path)


def save_published(name: str, path) -> None:
    """Published model ``name`` built from seed 0, trained and saved by ``save_trained``;
    then, for a model with layers QKeras 0.9.0 cannot call on TensorFlow 2.15 or later, the
    file a stack where they ran would have saved (``SAVED_BY_OLDER_QKERAS``).

    Seeding each build gives every model the same weights whatever the order of
    ``PUBLISHED_BUILDERS`` (they came from Keras's global random state before)."""
    keras.utils.set_random_seed(0)
    save_trained(PUBLISHED_BUILDERS[name](), path)
    if name in SAVED_BY_OLDER_QKERAS:
        rename_layer_classes(path, SAVED_BY_OLDER_QKERAS[name])


def rename_layer_classes(path, classes: dict[str, str]) -> None:
    """Rename, in the .h5 file at ``path``, each layer of a Keras class in ``classes`` to
    the QKeras class given, with the kernel and bias quantizers QKeras saved for the
    model's first QConv2D: the file a stack where that QKeras class ran would save."""
    with h5py.File(path, "r+") as file:
        config = json.loads(file.attrs["model_config"])
        layers = config["config"]["layers"]
        qconv = next(layer["config"] for layer in layers if layer["class_name"] == "QConv2D")
        for layer in layers:
            if layer["class_name"] in classes:
                layer["class_name"] = classes[layer["class_name"]]
                for key in ("kernel_quantizer", "bias_quantizer"):
                    layer["config"][key] = qconv.get(key)
        file.attrs["model_config"] = json.dumps(config)


def save_pruned(model: keras.Model, checkpoint, stripped, seed: int = 0) -> None:
    """``model`` pruned to 75% sparsity by tensorflow-model-optimization as hls4ml's tutorial
    prunes, one short epoch: saved while still wrapped for pruning (what a ModelCheckpoint
    during training writes) to ``checkpoint``, and after ``strip_pruning`` to ``stripped``."""
    import tensorflow_model_optimization as tfmot

    sparsity = tfmot.sparsity.keras
    schedule = sparsity.ConstantSparsity(0.75, begin_step=0, frequency=1)
    pruned = sparsity.prune_low_magnitude(model, pruning_schedule=schedule)
    rng = np.random.default_rng(seed)
    inputs = rng.uniform(0, 1, (64, *model.input_shape[1:])).astype(np.float32)
    width = model.output_shape[-1]
    targets = np.eye(width, dtype=np.float32)[rng.integers(0, width, 64)]
    pruned.compile(optimizer="adam", loss="categorical_crossentropy")
    pruned.fit(
        inputs,
        targets,
        batch_size=16,
        epochs=1,
        verbose=0,
        callbacks=[sparsity.UpdatePruningStep()],
    )
    pruned.save(checkpoint)
    sparsity.strip_pruning(pruned).save(stripped)
