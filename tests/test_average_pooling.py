"""QAveragePooling2D and QGlobalAveragePooling2D, with and without an average_quantizer.

QKeras 0.9.0 computes the float mean; with an ``average_quantizer`` it multiplies the
mean by the count and then by the quantized reciprocal of the count, each product
rounded in float32; then the activation. The export writes the same float ops, so its
QONNX execution equals QKeras bit for bit; over a power-of-two count the result is
fixed point, of the type of the sum times the quantizer's type.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest

import bnfold
import builders
from bnfold.accumulator import infer_types
from bnfold.errors import UntypedAccumulatorWarning
from bnfold.export.verify import sample_inputs
from bnfold.fixedpoint import FixedPoint
from bnfold.keras import keras, qkeras
from bnfold.typerules import Untyped
from hls4ml_runs import hls4ml_predictions

SOURCE = builders.INPUT_QUANTIZER
KERNEL = "quantized_bits(4,0,1,alpha=1)"


def _pooled(size: int, pool: keras.layers.Layer, seed: int = 2) -> keras.Model:
    """A quantized conv, ``pool`` and a QDense reading it."""
    inputs = keras.Input((size, size, 3), name="image")
    x = qkeras.QConv2D(
        4,
        1,
        kernel_quantizer=KERNEL,
        bias_quantizer="quantized_bits(8,3,1)",
        activation="quantized_relu(6,3)",
        name="conv",
    )(inputs)
    x = keras.layers.Flatten(name="flatten")(pool(x))
    x = qkeras.QDense(
        3, kernel_quantizer=KERNEL, bias_quantizer="quantized_bits(8,3,1)", name="head"
    )(x)
    model = keras.Model(inputs, x, name=f"pooled_{pool.name}")
    rng = np.random.default_rng(seed)
    for variable in model.trainable_weights:
        variable.assign(rng.normal(0, 0.5, variable.shape).astype(np.float32))
    return model


MODELS = {
    "global_8x8": lambda: _pooled(
        8, qkeras.QGlobalAveragePooling2D(average_quantizer="quantized_bits(8,0,1)", name="pool")
    ),
    "global_12x12": lambda: _pooled(
        12, qkeras.QGlobalAveragePooling2D(average_quantizer="quantized_bits(8,0,1)", name="pool")
    ),
    "global_plain": lambda: _pooled(4, qkeras.QGlobalAveragePooling2D(name="pool")),
    "window_2x2": lambda: _pooled(
        8,
        qkeras.QAveragePooling2D(
            2,
            average_quantizer="quantized_bits(4,0,1)",
            activation="quantized_bits(8,2,1)",
            name="pool",
        ),
    ),
    "window_3x3": lambda: _pooled(
        9, qkeras.QAveragePooling2D(3, average_quantizer="quantized_bits(6,0,1)", name="pool")
    ),
}
# The pooling layer's output type: the sum of the count's values of quantized_relu(6,3)
# (unsigned, 6 bits, 3 integer) times the reciprocal's quantizer type, or the mean's.
FIXED = {
    "global_8x8": FixedPoint(12, 9, False).product(FixedPoint(8, 0, True, True)),
    "global_plain": FixedPoint(10, 3, False),
    "window_2x2": FixedPoint(8, 2, True, True),
}


@pytest.fixture(scope="module")
def exported():
    """Each model with its export; a QDense after a float average has no type, as tested."""
    result = {}
    for name, build in MODELS.items():
        model = build()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UntypedAccumulatorWarning)
            result[name] = (model, bnfold.export_onnx(model, source_quantizers=[SOURCE]))
    return result


@pytest.mark.parametrize("name", sorted(MODELS))
def test_qonnx_execution_equals_qkeras_bit_for_bit(exported, name):
    builders.assert_qonnx_equals_qkeras(*exported[name], SOURCE, count=64, seed=4)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_output_type_holds_every_pooled_value_and_types_the_next_accumulator(exported, name):
    model, _ = exported[name]
    types = infer_types(model, [SOURCE])
    (pooled,) = types.layers["pool"][1]
    if name not in FIXED:
        assert isinstance(pooled, Untyped) and "not a power of two" in pooled.reason
        assert types.macs["head"].types is None
        return
    assert pooled == FIXED[name]
    assert types.macs["head"].types.input == pooled
    inputs = sample_inputs(model, [FixedPoint.from_quantizer(SOURCE)], count=64, seed=5)
    values = keras.Model(model.input, model.get_layer("pool").output).predict(inputs, verbose=0)
    assert pooled.contains(values)


def test_the_quantized_reciprocal_is_a_mul_after_the_count(exported):
    model, onnx_model = exported["window_3x3"]
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in onnx_model.graph.initializer}
    muls = [node for node in onnx_model.graph.node if node.op_type == "Mul"]
    factors = [float(constants[name]) for node in muls for name in node.input if name in constants]
    reciprocal = float(model.get_layer("pool").average_quantizer_internal(np.float32(1 / 9)))
    assert factors == [9.0, reciprocal] and reciprocal != np.float32(1 / 9)


@pytest.mark.slow
def test_hls4ml_predicts_the_qkeras_global_average_bit_for_bit(tmp_path):
    """hls4ml 1.3.0 reads the global average and its two Muls; with a 2x2
    QAveragePooling2D its C simulation differs (measured: up to 6.8), as the README says."""
    predicted, expected, _ = hls4ml_predictions(MODELS["global_8x8"](), False, tmp_path)
    np.testing.assert_array_equal(predicted, expected)
