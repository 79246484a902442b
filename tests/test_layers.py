from __future__ import annotations

import inspect

import numpy as np
import pytest

import bnfold
import builders
from bnfold.keras import keras, qkeras
from bnfold.layers import QDenseBatchnorm

# The constructor arguments of QDenseBatchnorm in newer QKeras sources.
CONFIG_KEYS = {
    "units",
    "activation",
    "use_bias",
    "kernel_initializer",
    "bias_initializer",
    "kernel_regularizer",
    "bias_regularizer",
    "activity_regularizer",
    "kernel_constraint",
    "bias_constraint",
    "kernel_quantizer",
    "bias_quantizer",
    "kernel_range",
    "bias_range",
    "axis",
    "momentum",
    "epsilon",
    "center",
    "scale",
    "beta_initializer",
    "gamma_initializer",
    "moving_mean_initializer",
    "moving_variance_initializer",
    "beta_regularizer",
    "gamma_regularizer",
    "beta_constraint",
    "gamma_constraint",
    "renorm",
    "renorm_clipping",
    "renorm_momentum",
    "fused",
    "trainable",
    "virtual_batch_size",
    "adjustment",
    "ema_freeze_delay",
    "folding_mode",
}
# Keras's BatchNormalization leaves these out of its config unless renorm or a
# virtual batch is used; QKeras's folded convolutions inherit the same.
OMITTED_BY_BATCHNORM = {
    "renorm",
    "renorm_clipping",
    "renorm_momentum",
    "fused",
    "virtual_batch_size",
    "adjustment",
}


def _dense_model(**settings):
    inputs = keras.Input((6,))
    outputs = QDenseBatchnorm(
        4,
        kernel_quantizer="quantized_bits(6,2,1,alpha=1)",
        bias_quantizer="quantized_bits(10,4,1)",
        name="dense",
        **settings,
    )(inputs)
    return builders.randomize_batchnorm(keras.Model(inputs, outputs))


def test_config_has_the_qkeras_keys_and_round_trips():
    layer = QDenseBatchnorm(
        3,
        kernel_quantizer="quantized_bits(4,0,1)",
        momentum=0.9,
        epsilon=1e-4,
        ema_freeze_delay=10,
        folding_mode="batch_stats_folding",
        name="d",
    )
    arguments = set(inspect.signature(QDenseBatchnorm.__init__).parameters) - {"self", "kwargs"}
    assert arguments == CONFIG_KEYS
    config = layer.get_config()
    assert (CONFIG_KEYS - OMITTED_BY_BATCHNORM) | {"name"} <= set(config)
    copy = QDenseBatchnorm.from_config(config)
    # QKeras's own Clip constraint adds two None fields to its config on a round trip.
    assert {**copy.get_config(), "kernel_constraint": None} == {**config, "kernel_constraint": None}
    assert (copy.batchnorm.momentum, copy.batchnorm.epsilon) == (0.9, 1e-4)


def test_unknown_folding_mode_is_refused():
    with pytest.raises(ValueError, match=r"folding_mode.*'bn_folding'"):
        QDenseBatchnorm(3, folding_mode="bn_folding")


@pytest.mark.parametrize("suffix", [".h5", ".keras", "_savedmodel"])
def test_save_and_load_round_trip(tmp_path, suffix):
    model = _dense_model()
    path = tmp_path / f"model{suffix}"
    model.save(path)
    loaded = bnfold.load_model(path)
    assert type(loaded.get_layer("dense")) is QDenseBatchnorm
    inputs = builders.grid_inputs(model)
    np.testing.assert_array_equal(
        loaded.predict(inputs, verbose=0), model.predict(inputs, verbose=0)
    )


def test_saved_class_name_is_plain_qdensebatchnorm():
    config = keras.layers.serialize(QDenseBatchnorm(2))
    assert config["class_name"] == "QDenseBatchnorm"


@pytest.mark.parametrize("folding_mode", ["ema_stats_folding", "batch_stats_folding"])
def test_fit_trains_weights_and_statistics(folding_mode):
    model = _dense_model(folding_mode=folding_mode, ema_freeze_delay=3)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    y = rng.normal(size=(64, 4)).astype(np.float32)
    layer = model.get_layer("dense")
    before = [w.copy() for w in layer.get_weights()]
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    after = dict(zip([w.name for w in layer.weights], layer.get_weights(), strict=True))
    changed = {
        name
        for (name, value), old in zip(after.items(), before, strict=True)
        if not np.array_equal(value, old)
    }
    assert any("kernel" in name for name in changed)
    assert any("moving_mean" in name for name in changed)
    assert int(layer._iteration.numpy()) == 8 - 1  # 8 steps, counted from -1


@pytest.mark.parametrize("folding_mode", ["ema_stats_folding", "batch_stats_folding"])
def test_training_matches_qkeras_folded_conv_on_one_pixel(folding_mode):
    """A dense layer is a 1x1 convolution on a 1x1 image: QKeras's folded conv is the reference."""
    # fused=False: Keras's fused batchnorm kernel, used only on 4-D inputs, updates the
    # moving variance with Bessel's correction, unlike the plain one a dense layer gets.
    settings = dict(
        kernel_quantizer="quantized_bits(8,2,1,alpha=1)",
        bias_quantizer="quantized_bits(12,4,1)",
        folding_mode=folding_mode,
        ema_freeze_delay=4,
        fused=False,
    )
    dense_in = keras.Input((5,))
    dense = keras.Model(dense_in, QDenseBatchnorm(3, name="f", **settings)(dense_in))
    conv_in = keras.Input((1, 1, 5))
    conv = keras.Model(conv_in, qkeras.QConv2DBatchnorm(3, 1, name="f", **settings)(conv_in))
    builders.randomize_batchnorm(dense)
    conv.get_layer("f").set_weights(
        [
            w.reshape(v.shape)
            for w, v in zip(
                dense.get_layer("f").get_weights(), conv.get_layer("f").weights, strict=True
            )
        ]
    )
    rng = np.random.default_rng(1)
    x = rng.normal(size=(48, 5)).astype(np.float32)
    y = rng.normal(size=(48, 3)).astype(np.float32)
    for model, data in ((dense, x), (conv, x.reshape(48, 1, 1, 5))):
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        model.fit(
            data,
            y.reshape(len(y), *model.output_shape[1:]),
            batch_size=8,
            epochs=2,
            shuffle=False,
            verbose=0,
        )
    for dense_weight, conv_weight in zip(
        dense.get_layer("f").get_weights(), conv.get_layer("f").get_weights(), strict=True
    ):
        np.testing.assert_allclose(dense_weight.ravel(), conv_weight.ravel(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        dense.predict(x, verbose=0),
        conv.predict(x.reshape(48, 1, 1, 5), verbose=0).reshape(48, 3),
        rtol=1e-4,
        atol=1e-4,
    )
