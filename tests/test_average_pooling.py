"""QAveragePooling2D and QGlobalAveragePooling2D, with and without an average_quantizer.

QKeras 0.9.0 computes the float mean; with an ``average_quantizer`` it multiplies the
mean by the count and then by the quantized reciprocal of the count, each product
rounded in float32; then the activation. The export writes the same float ops, so its
QONNX execution equals QKeras bit for bit; over a power-of-two count the result is
fixed point, of the type of the sum times the quantizer's type.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest

import bnfold
import builders
from bnfold.accumulator import infer_types
from bnfold.errors import UntypedAccumulatorWarning
from bnfold.export.verify import qonnx_outputs, sample_inputs
from bnfold.fixedpoint import FixedPoint
from bnfold.hls4ml import prepare_for_hls4ml
from bnfold.keras import keras, qkeras
from bnfold.typerules import Untyped, pooled_area
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


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_layer_table_names_the_average_quantizer_as_its_kernel(exported, name):
    """The quantized 1/count is the weight the average multiplies by; the table says so."""
    model, onnx_model = exported[name]
    metadata = {entry.key: entry.value for entry in onnx_model.metadata_props}
    (pool,) = [row for row in json.loads(metadata["bnfold.layers"]) if row["layer"] == "pool"]
    quantizer = model.get_layer("pool").average_quantizer
    assert pool["kernel_quantizer"] == (None if quantizer is None else str(quantizer))


# hls4ml computes the sum times the quantized 1/count; QKeras rounds the mean in float32
# first when the count is not a power of two (measured: no difference on window_3x3).
NOT_POWER_OF_TWO = ("window_3x3", "global_12x12")
FLOAT32_ROUNDING = 2**-20
# Fractional bits of the types prepare_for_hls4ml gives values computed in float: few, so
# that only values QKeras computes in float can be off (by less than 2**-4).
FRACTIONAL_BITS = 4
HLS4ML_MODELS = {
    **{name: MODELS[name] for name in ("global_8x8", "window_2x2", "window_3x3")},
    "quantized_pooling": builders.quantized_pooling,
}


def _as_qkeras(name: str, computed: np.ndarray, expected: np.ndarray, float_step: float) -> None:
    """Bit for bit over a power-of-two count. Over 9 or 144 values QKeras's pooled
    output and so the head's sums are float: within float32 rounding, plus the step
    ``float_step`` of the type a float value gets in hls4ml (truncated to it)."""
    if name in NOT_POWER_OF_TWO:
        bound = FLOAT32_ROUNDING * np.maximum(1.0, np.abs(expected)) + float_step
        assert np.all(np.abs(computed - expected) <= bound)
    else:
        np.testing.assert_array_equal(computed, expected)


@pytest.mark.parametrize("name", ["global_8x8", "global_12x12", "window_2x2", "window_3x3"])
def test_hls4ml_graph_has_one_conv_of_the_quantized_reciprocal_per_average(exported, name):
    """prepare_for_hls4ml makes the pool, its Mul by the count and its Mul by the quantized
    1/count one depthwise Conv whose weights are that quantized 1/count; qonnx's execution
    of the graph hls4ml reads equals QKeras."""
    model, onnx_model = exported[name]
    cleaned, config = prepare_for_hls4ml(onnx_model, fractional_bits=FRACTIONAL_BITS)
    assert "Mul" not in {node.op_type for node in cleaned.graph.node}
    (pool,) = [n for n in cleaned.graph.node if n.op_type == "Conv" and _layer(n) == "pool"]
    weights = cleaned.get_initializer(cleaned.find_producer(pool.input[1]).input[0])
    layer = model.get_layer("pool")
    reciprocal = layer.average_quantizer_internal(np.float32(1) / np.float32(pooled_area(layer)))
    assert np.all(weights == np.float32(reciprocal))
    assert FixedPoint.from_hls(config["LayerName"][pool.name]["Precision"]["accum"]).contains(
        weights.sum((1, 2, 3)) * FixedPoint.from_quantizer("quantized_relu(6,3)").max
    )
    inputs = sample_inputs(model, [FixedPoint.from_quantizer(SOURCE)], count=64, seed=6)
    (computed,) = qonnx_outputs(cleaned, inputs)
    _as_qkeras(name, computed, model.predict(inputs, verbose=0), 0.0)


def _layer(node: onnx.NodeProto) -> str | None:
    return next((e.value for e in node.metadata_props if e.key == "bnfold.layer"), None)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HLS4ML_MODELS))
def test_hls4ml_computes_quantized_averages_as_qkeras(tmp_path, name):
    """hls4ml 1.3.0's C simulation of QAveragePooling2D and QGlobalAveragePooling2D with an
    average_quantizer, then a QDense (quantized_pooling: a QSeparableConv2D between them):
    bit for bit over a power-of-two count, with so few fractional bits for float values
    that a pooled value typed as float would show."""
    predicted, expected, _ = hls4ml_predictions(
        HLS4ML_MODELS[name](), False, tmp_path, samples=64, fractional_bits=FRACTIONAL_BITS
    )
    _as_qkeras(name, predicted, expected, 2.0**-FRACTIONAL_BITS)
