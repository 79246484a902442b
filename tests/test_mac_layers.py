"""Separable convolutions, 1-D depthwise convolutions and depth multipliers over 1.

A separable convolution is two MACs in one layer: QKeras quantizes the depthwise and
the pointwise kernels separately and does not round between them
(``tf.keras.backend.separable_conv2d`` on the quantized kernels), then adds the
quantized bias and applies the activation. The export writes a grouped Conv and a
Conv, each with its Quant on its kernel and its own accumulator type; the pointwise
accumulator follows from the depthwise one.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import bnfold
import builders
from bnfold.accumulator import mac_types
from bnfold.fixedpoint import FixedPoint
from bnfold.keras import keras, qkeras
from hls4ml_runs import hls4ml_predictions

SOURCE = builders.INPUT_QUANTIZER
# Plain Keras weights on this grid are read as fixed point.
GRID = 1 / 8


def _on_grid(model: keras.Model, seed: int = 5) -> keras.Model:
    """Random weights for every layer; a plain Keras layer's on the GRID, so it has types."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        for variable in layer.trainable_weights:
            values = rng.normal(0, 0.5, variable.shape)
            if not type(layer).__module__.startswith("qkeras"):
                values = np.round(values / GRID) * GRID
            variable.assign(values.astype(np.float32))
    return model


def separable_2d() -> keras.Model:
    """QSeparableConv2D with and without a depth multiplier, and a plain SeparableConv2D."""
    inputs = keras.Input((9, 9, 3), name="image")
    x = qkeras.QSeparableConv2D(
        6,
        3,
        depthwise_quantizer="quantized_bits(4,0,1)",  # auto_po2 per depth multiplier
        pointwise_quantizer="quantized_bits(5,1,1,alpha=1)",
        bias_quantizer="quantized_bits(8,3,1)",
        activation="quantized_relu(6,3)",
        name="sep",
    )(inputs)
    x = qkeras.QSeparableConv2D(
        4,
        (2, 3),
        strides=2,
        padding="same",
        depth_multiplier=2,
        depthwise_quantizer="quantized_bits(6,1,1,alpha=1)",
        pointwise_quantizer="quantized_bits(4,0,1)",
        use_bias=False,
        name="sep_multiplier",
    )(x)
    x = qkeras.QActivation("quantized_bits(8,4,1)", name="sep_multiplier_q")(x)
    x = keras.layers.SeparableConv2D(3, 2, name="sep_plain")(x)
    return _on_grid(keras.Model(inputs, x, name="separable_2d"))


def separable_1d() -> keras.Model:
    """QSeparableConv1D, a plain SeparableConv1D and DepthwiseConv1D.

    QKeras 0.9.0 cannot build a QSeparableConv1D with causal padding.
    """
    inputs = keras.Input((12, 4), name="sequence")
    x = qkeras.QSeparableConv1D(
        5,
        3,
        padding="same",
        depth_multiplier=2,
        depthwise_quantizer="quantized_bits(4,0,1,alpha=1)",
        pointwise_quantizer="quantized_bits(4,0,1)",
        bias_quantizer="quantized_bits(8,3,1)",
        activation="quantized_relu(6,3)",
        name="sep",
    )(inputs)
    x = keras.layers.SeparableConv1D(4, 2, strides=2, name="sep_plain")(x)
    x = keras.layers.DepthwiseConv1D(3, depth_multiplier=2, name="depthwise_plain")(x)
    return _on_grid(keras.Model(inputs, x, name="separable_1d"))


def depth_multipliers() -> keras.Model:
    """QDepthwiseConv2D and DepthwiseConv2D with depth multipliers over 1."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = qkeras.QDepthwiseConv2D(
        3,
        depth_multiplier=2,
        depthwise_quantizer="quantized_bits(4,0,1)",  # auto_po2 per depth multiplier
        bias_quantizer="quantized_bits(8,3,1)",
        activation="quantized_relu(6,3)",
        name="dw",
    )(inputs)
    x = keras.layers.DepthwiseConv2D(2, depth_multiplier=3, name="dw_plain")(x)
    model = _on_grid(keras.Model(inputs, x, name="depth_multipliers"))
    # Kernels of different magnitudes per depth multiplier, so their scales differ.
    kernel = model.get_layer("dw").depthwise_kernel
    kernel.assign(kernel * np.array([0.1, 2.0], np.float32))
    return model


def transposed() -> keras.Model:
    """Conv2DTranspose, strided, and with same padding.

    QKeras 0.9.0's QConv2DTranspose fails when called on TensorFlow 2.21
    (``array_ops.stack`` is gone): there is no QKeras reference to export.
    """
    inputs = keras.Input((5, 5, 3), name="image")
    x = qkeras.QActivation("quantized_bits(6,2,1)", name="image_q")(inputs)
    x = keras.layers.Conv2DTranspose(4, 3, strides=2, name="up")(x)
    x = qkeras.QActivation("quantized_relu(8,4)", name="up_q")(x)
    x = keras.layers.Conv2DTranspose(2, 2, padding="same", name="up_plain")(x)
    return _on_grid(keras.Model(inputs, x, name="transposed"))


def test_qkeras_qconv2dtranspose_cannot_run_on_tensorflow_2_21():
    inputs = keras.Input((4, 4, 2))
    with pytest.raises(AttributeError, match="stack"):
        qkeras.QConv2DTranspose(2, 3, kernel_quantizer="quantized_bits(4,0,1)")(inputs)


BUILDERS = {
    "separable_2d": separable_2d,
    "separable_1d": separable_1d,
    "dw": depth_multipliers,
    "transposed": transposed,
}


@pytest.fixture(scope="module")
def exported():
    """Each model with its export (verified by the export itself, too)."""
    result = {}
    for name, build in BUILDERS.items():
        model = build()
        result[name] = (model, bnfold.export_onnx(model, source_quantizers=[SOURCE]))
    return result


def _metadata(node: onnx.NodeProto) -> dict[str, str]:
    return {entry.key.removeprefix("bnfold."): entry.value for entry in node.metadata_props}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_qonnx_execution_equals_qkeras_bit_for_bit(exported, name):
    builders.assert_qonnx_equals_qkeras(*exported[name], SOURCE, count=16, seed=11)


def _interval(weights, low, high):
    """Exact range of each MAC output over inputs in [low, high], bias included."""
    kernel = weights.kernel.astype(np.float64)
    axes = weights.summed_axes
    top = np.maximum(kernel * high, kernel * low).sum(axis=axes)
    bottom = np.minimum(kernel * high, kernel * low).sum(axis=axes)
    if weights.bias is not None:
        top, bottom = (
            top + weights.bias.reshape(top.shape),
            bottom + weights.bias.reshape(top.shape),
        )
    return bottom.min(), top.max()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_mac_has_its_own_accumulator_holding_every_sum(name):
    model = BUILDERS[name]()
    for path, mac in mac_types(model, [SOURCE]).items():
        weights, types = mac.weights, mac.types
        assert types is not None, path
        if weights.before is not None:
            # The depthwise stage: no bias, and its sums are the pointwise stage's input.
            first, first_types = weights.before, types.before
            assert first.bias is None and first_types.accumulator == first_types.sum_of_products
            assert first_types.accumulator.holds(
                *_interval(first, first_types.input.min, first_types.input.max)
            ), path
            assert types.input == first_types.accumulator, path
            assert types.layer_input == first_types.input, path
        assert types.accumulator.holds(*_interval(weights, types.input.min, types.input.max)), path


def test_separable_products_are_kernel_area_then_channels_times_multiplier():
    model = separable_2d()
    mac = mac_types(model, [SOURCE])["sep_multiplier"]
    assert (mac.weights.before.products, mac.weights.products) == (2 * 3, 6 * 2)
    mac = mac_types(depth_multipliers(), [SOURCE])["dw"]
    assert mac.weights.products == 3 * 3


def test_separable_layers_become_a_grouped_conv_and_a_conv_each_with_its_types(exported):
    model, onnx_model = exported["separable_2d"]
    macs = mac_types(model, [SOURCE])
    convs = [node for node in onnx_model.graph.node if node.op_type == "Conv"]
    by_layer: dict[str, list[onnx.NodeProto]] = {}
    for node in convs:
        by_layer.setdefault(_metadata(node)["layer"], []).append(node)
    assert set(by_layer) == {"sep", "sep_multiplier", "sep_plain"}
    initializers = {t.name: numpy_helper.to_array(t) for t in onnx_model.graph.initializer}
    producers = {output: node for node in onnx_model.graph.node for output in node.output}
    for path, (depthwise, pointwise) in by_layer.items():
        types = macs[path].types
        groups = {a.name: a.i for a in depthwise.attribute}.get("group")
        assert groups == model.get_layer(path).input_shape[-1], path
        assert _metadata(depthwise)["accumulator"] == types.before.accumulator.quantizer_string()
        assert _metadata(pointwise)["accumulator"] == types.accumulator.quantizer_string()
        assert "bias_quantizer" not in _metadata(depthwise)
        for node, weights in (
            (depthwise, macs[path].weights.before),
            (pointwise, macs[path].weights),
        ):
            quant = producers.get(node.input[1])
            if path == "sep_plain":
                # A plain layer's kernel is float in Keras: it stays an initializer.
                assert quant is None
                continue
            assert quant.op_type == "Quant" and _metadata(quant)["role"] == "kernel"
            values = initializers[quant.input[0]]
            assert sorted(values.ravel()) == sorted(weights.kernel.ravel())


def test_depth_multiplier_scales_lie_along_the_conv_output_channels(exported):
    """QKeras's auto_po2 scale is per depth multiplier; ONNX orders outputs channel-major."""
    model, onnx_model = exported["dw"]
    weights = mac_types(model, [SOURCE])["dw"].weights
    initializers = {t.name: numpy_helper.to_array(t) for t in onnx_model.graph.initializer}
    quant = next(
        node
        for node in onnx_model.graph.node
        if node.op_type == "Quant"
        and (_metadata(node)["layer"], _metadata(node)["role"]) == ("dw", "kernel")
    )
    scale = (
        initializers[quant.input[1]]
        / FixedPoint.from_quantizer(
            model.get_layer("dw").depthwise_quantizer_internal, allow_scale=True
        ).step
    )
    # QKeras's scale: one per input channel and depth multiplier, or per multiplier.
    channel_scales = np.broadcast_to(weights.kernel_scale, (1, 1, 3, 2))
    assert len(np.unique(channel_scales)) > 1
    # ONNX output channel c * 2 + m: input channel c, multiplier m (channel-major).
    np.testing.assert_array_equal(scale.reshape(-1), channel_scales.reshape(-1))


@pytest.mark.slow
def test_hls4ml_predicts_the_qkeras_separable_outputs_bit_for_bit(tmp_path):
    """hls4ml 1.3.0 reads the grouped Conv and the Conv. Its C simulation aborts on a
    depth multiplier over 1 ("only a depth multiplier of 1 is currently supported") and
    its ONNX front end reads no 1-D Conv, so only the first layer of separable_2d."""
    full = separable_2d()
    model = keras.Model(full.input, full.get_layer("sep").output)
    predicted, expected, _ = hls4ml_predictions(model, False, tmp_path)
    np.testing.assert_array_equal(predicted, expected)
