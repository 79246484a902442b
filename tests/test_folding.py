from __future__ import annotations

import numpy as np
import pytest

import bnfold
import builders
from bnfold.errors import InvalidWeightsError, UnsupportedLayerError
from bnfold.keras import keras, qkeras, quantizers


def _built(layer, shape):
    layer(np.zeros((1, *shape), np.float32))  # builds the inner batchnorm too
    builders.randomize_folded_layer(layer, np.random.default_rng(0))


CASES = {
    "conv_strided_valid": (
        lambda: qkeras.QConv2DBatchnorm(
            5,
            (3, 2),
            strides=(2, 1),
            padding="valid",
            use_bias=False,
            kernel_quantizer=quantizers.quantized_bits(4, 0, 1),
            activation="quantized_relu(4,1)",
            bias_quantizer=quantizers.quantized_bits(8, 3, 1),
            name="c1",
        ),
        (9, 9, 3),
        {"filters": 5, "kernel_size": (3, 2), "strides": (2, 1), "padding": "valid"},
    ),
    "conv_dilated_same": (
        lambda: qkeras.QConv2DBatchnorm(
            4,
            3,
            padding="same",
            dilation_rate=(2, 2),
            kernel_quantizer="quantized_bits(6,1,1)",
            name="c2",
        ),
        (9, 9, 2),
        {"filters": 4, "dilation_rate": (2, 2), "padding": "same"},
    ),
    "depthwise_multiplier": (
        lambda: qkeras.QDepthwiseConv2DBatchnorm(
            3,
            strides=2,
            padding="same",
            depth_multiplier=3,
            depthwise_quantizer="quantized_bits(4,0,1)",
            bias_quantizer="quantized_bits(10,4,1)",
            activation="relu",
            name="d1",
        ),
        (8, 8, 2),
        {"depth_multiplier": 3, "strides": (2, 2), "kernel_size": (3, 3), "padding": "same"},
    ),
    "dense": (
        lambda: bnfold.layers.QDenseBatchnorm(
            7,
            kernel_quantizer="quantized_bits(5,0,1)",
            bias_quantizer="quantized_bits(9,3,1)",
            activation="quantized_relu(5,2)",
            use_bias=False,
            name="f1",
        ),
        (11,),
        {"units": 7},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_settings_quantizers_and_folded_weights_carry_over(case):
    build, shape, settings = CASES[case]
    layer = build()
    _built(layer, shape)
    plain = bnfold.convert_folded_layer_to_unfolded(layer)
    entry = bnfold.folding.folded_layer_type(layer)
    assert type(plain) is entry.plain
    config = plain.get_config()
    for key, value in settings.items():
        assert config[key] == value, key
    assert config["name"] == layer.name
    assert config["use_bias"] is True
    assert plain.activation is layer.activation
    kernel_quantizer = f"{entry.kernel_quantizer}_internal"
    assert getattr(plain, kernel_quantizer) is getattr(layer, kernel_quantizer)
    assert plain.bias_quantizer_internal is layer.bias_quantizer_internal
    kernel, bias = (w.numpy() for w in layer.get_folded_weights())
    np.testing.assert_array_equal(plain.get_weights()[0], kernel)
    np.testing.assert_array_equal(plain.get_weights()[1], bias)


@pytest.mark.parametrize("case", sorted(CASES))
def test_plain_layer_computes_what_folded_layer_computes(case):
    build, shape, _ = CASES[case]
    layer = build()
    _built(layer, shape)
    plain = bnfold.convert_folded_layer_to_unfolded(layer)
    rng = np.random.default_rng(3)
    inputs = (rng.integers(-64, 64, (4, *shape)) / 8).astype(np.float32)
    expected = layer(inputs, training=False).numpy()
    assert np.std(expected) > 0
    np.testing.assert_array_equal(plain(inputs).numpy(), expected)


def test_unbuilt_folded_layer_gives_unbuilt_plain_layer():
    plain = bnfold.convert_folded_layer_to_unfolded(qkeras.QConv2DBatchnorm(2, 3, name="c"))
    assert not plain.built and plain.name == "c"


@pytest.mark.parametrize(
    "layer",
    [keras.layers.Dense(3, name="plain_dense"), qkeras.QConv2D(2, 3, name="qconv")],
    ids=["Dense", "QConv2D"],
)
def test_non_folded_layer_is_refused_naming_layer_and_class(layer):
    with pytest.raises(UnsupportedLayerError, match=f"{layer.name}.*{type(layer).__name__}"):
        bnfold.convert_folded_layer_to_unfolded(layer)
    with pytest.raises(TypeError):
        bnfold.convert_folded_layer_to_unfolded(layer)


@pytest.mark.parametrize(
    ("index", "value", "what"),
    [(3, -0.5, "moving_variance"), (0, np.nan, "gamma"), (2, np.inf, "moving_mean")],
    ids=["negative_variance", "nan_gamma", "inf_mean"],
)
def test_unfoldable_weights_are_refused_naming_layer(index, value, what):
    layer = CASES["dense"][0]()
    _built(layer, (11,))
    statistics = layer.batchnorm.get_weights()
    statistics[index][0] = value
    layer.batchnorm.set_weights(statistics)
    with pytest.raises(InvalidWeightsError, match=f"'f1'.*{what}"):
        bnfold.convert_folded_layer_to_unfolded(layer)
