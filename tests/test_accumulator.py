from __future__ import annotations

import warnings

import numpy as np
import pytest
from qkeras import bn_folding_utils

import bnfold
import builders
from bnfold.accumulator import (
    accumulator_types,
    mac_types,
    populate_bias_quantizer_from_accumulator,
)
from bnfold.errors import (
    RangeWarning,
    TypeInferenceError,
    UnsupportedLayerError,
    UntypedAccumulatorWarning,
)
from bnfold.fixedpoint import FixedPoint, QuantizerError
from bnfold.folding import folded_layer_type
from bnfold.keras import keras, qkeras, quantizers
from bnfold.mac import quantized_weights


def _conv_model(kernel_quantizer, filters=2, kernel_size=(2, 2), channels=1, second=None):
    inputs = keras.Input((6, 6, channels))
    x = qkeras.QConv2DBatchnorm(
        filters, kernel_size, kernel_quantizer=kernel_quantizer, bias_quantizer=None, name="c1"
    )(inputs)
    if second:
        x = qkeras.QActivation("quantized_relu(6,2)", name="relu")(x)
        x = qkeras.QConv2DBatchnorm(3, 3, kernel_quantizer=second, bias_quantizer=None, name="c2")(
            x
        )
    return builders.randomize_batchnorm(keras.Model(inputs, x))


QKERAS_CASES = {
    # QKeras's own test: relu(4,1) input, 2x2 kernel on one channel -> quantized_bits(10,3,1).
    "qkeras_test": (
        dict(kernel_quantizer="quantized_bits(4,0,1,alpha=1)"),
        quantizers.quantized_relu(4, 1),
    ),
    "wide_kernel": (
        dict(kernel_quantizer="quantized_bits(6,2,1,alpha=1)", kernel_size=(3, 3), channels=4),
        quantizers.quantized_relu(8, 3),
    ),
    "signed_input": (
        dict(kernel_quantizer="quantized_bits(4,0,1,alpha=1)", channels=3),
        quantizers.quantized_bits(8, 3, 1),
    ),
    "two_convs": (
        dict(
            kernel_quantizer="quantized_bits(4,0,1,alpha=1)",
            channels=2,
            second="quantized_bits(5,1,1,alpha=1)",
        ),
        quantizers.quantized_relu(4, 1),
    ),
}


@pytest.mark.parametrize("case", sorted(QKERAS_CASES))
def test_populated_bias_quantizers_equal_qkeras_where_qkeras_is_right(case):
    settings, source = QKERAS_CASES[case]
    ours, theirs = _conv_model(**settings), _conv_model(**settings)
    populate_bias_quantizer_from_accumulator(ours, [source])
    bn_folding_utils.populate_bias_quantizer_from_accumulator(theirs, [source])
    for name in ("c1", "c2") if "second" in settings else ("c1",):
        assert str(ours.get_layer(name).bias_quantizer_internal) == str(
            theirs.get_layer(name).bias_quantizer_internal
        ), name
    if case == "qkeras_test":
        assert str(ours.get_layer("c1").bias_quantizer) == "quantized_bits(10,3,1)"


def test_depthwise_sums_kernel_area_not_times_channels():
    """QKeras counts kh*kw*channels products for a depthwise layer; only kh*kw are summed."""
    inputs = keras.Input((6, 6, 8))
    x = qkeras.QDepthwiseConv2DBatchnorm(
        3, depthwise_quantizer="quantized_bits(4,0,1,alpha=1)", bias_quantizer=None, name="dw"
    )(inputs)
    model = builders.randomize_batchnorm(keras.Model(inputs, x))
    types = mac_types(model, [quantizers.quantized_relu(4, 1)])["dw"].types
    # relu(4,1) x bits(4,0,1): (8,1) per product; 9 products grow it by 4 bits, not 7 (72).
    assert (types.sum_of_products.bits, types.sum_of_products.integer) == (12, 5)


def test_po2_scales_move_the_binary_point():
    inputs = keras.Input((4,))
    x = bnfold.layers.QDenseBatchnorm(
        3, kernel_quantizer="quantized_bits(4,0,1)", bias_quantizer=None, name="d"
    )(inputs)
    model = builders.randomize_batchnorm(keras.Model(inputs, x))
    weights = quantized_weights(model.get_layer("d"))
    exponents = np.log2(weights.kernel_scale)
    assert weights.kernel_scale is not None and exponents.min() < exponents.max()
    kernel = weights.kernel_type
    assert kernel.contains(weights.kernel)
    assert kernel.integer == 0 + exponents.max()
    assert kernel.bits == 4 + exponents.max() - exponents.min()


def _interval(weights, source, bias):
    """Exact range of each MAC output, from the quantized weights, by interval arithmetic."""
    kernel = weights.kernel.astype(np.float64)
    axes = weights.summed_axes
    high = (np.maximum(kernel * source.max, kernel * source.min)).sum(axis=axes)
    low = (np.minimum(kernel * source.max, kernel * source.min)).sum(axis=axes)
    if bias is not None:
        high, low = high + bias.reshape(high.shape), low + bias.reshape(low.shape)
    return low.min(), high.max()


def _populated(build):
    model = build()
    populate_bias_quantizer_from_accumulator(model, None)
    return model


@pytest.mark.parametrize("name", sorted(builders.BUILDERS))
def test_accumulators_hold_every_value_the_sum_can_take(name):
    model = _populated(builders.BUILDERS[name])
    widths = mac_types(model)
    exact = mac_types(model, mode="weights")
    assert set(widths) == set(exact) and widths
    for path, mac in widths.items():
        weights, types = mac.weights, mac.types
        low, high = _interval(weights, types.input, weights.bias)
        assert types.accumulator.holds(low, high), path
        products_low, products_high = _interval(weights, types.input, None)
        assert types.sum_of_products.holds(products_low, products_high), path
        # In weights mode the inputs are narrower too: types flow from exact accumulators.
        exact_types = exact[path].types
        assert types.input.includes(exact_types.input), path
        low, high = _interval(weights, exact_types.input, weights.bias)
        assert exact_types.accumulator.holds(low, high), path
        assert exact_types.accumulator.bits <= types.accumulator.bits, path


def test_populate_fills_exactly_the_empty_bias_quantizers_of_all_folded_types():
    model = builders.unpopulated()
    given = {
        layer.name: layer.bias_quantizer_internal
        for layer in builders.all_layers(model)
        if folded_layer_type(layer) is not None
    }
    assert any(q is None for q in given.values()) and any(q is not None for q in given.values())
    assert populate_bias_quantizer_from_accumulator(model, ["quantized_bits(8,3,1)"]) is model
    types = mac_types(model, ["quantized_bits(8,3,1)"])
    filled = set()
    for path, found in types.items():
        layer, mac = found.layer, found.types
        if folded_layer_type(layer) is None:
            continue
        quantizer = layer.bias_quantizer_internal
        if given[layer.name] is None:
            filled.add(type(layer).__name__)
            assert FixedPoint.from_quantizer(quantizer) == mac.sum_of_products, path
        else:
            assert quantizer is given[layer.name], path
    assert filled == {"QConv2DBatchnorm", "QDepthwiseConv2DBatchnorm", "QDenseBatchnorm"}


def test_populated_quantizers_reach_predict_and_unfold():
    model = builders.unpopulated()
    inputs = builders.grid_inputs(model)
    before = model.predict(inputs, verbose=0)
    populate_bias_quantizer_from_accumulator(model, [quantizers.quantized_bits(8, 3, 1)])
    after = model.predict(inputs, verbose=0)
    assert not np.array_equal(before, after), "predict still uses the float biases"
    eager = model(inputs, training=False).numpy()
    np.testing.assert_array_equal(after, eager)
    unfolded = bnfold.unfold_model(model)
    for layer in builders.all_layers(unfolded):
        if hasattr(layer, "bias_quantizer_internal") and layer.use_bias:
            assert layer.bias_quantizer_internal is not None, layer.name
    np.testing.assert_array_equal(unfolded.predict(inputs, verbose=0), after)


@pytest.mark.parametrize("name", ["multi_io", "nested"])
def test_populate_works_on_nested_and_multi_input_models(name):
    model = builders.BUILDERS[name]()
    folded = [layer for layer in builders.all_layers(model) if folded_layer_type(layer)]
    empty = {layer.name for layer in folded if layer.bias_quantizer_internal is None}
    assert empty, "the test model must have empty bias quantizers to fill"
    populate_bias_quantizer_from_accumulator(model, None)
    for layer in folded:
        assert layer.bias_quantizer_internal is not None, layer.name
    nested_paths = [path for path in accumulator_types(model) if "/" in path]
    assert (name == "nested") == bool(nested_paths)


@pytest.mark.parametrize("source", ["quantized_ulaw(8,0)", "bernoulli()"])
def test_source_quantizer_without_fixed_point_type_is_refused(source):
    with pytest.raises(QuantizerError, match=source.split("(")[0]):
        accumulator_types(builders.sequential_conv(), [source])


@pytest.mark.parametrize(
    ("hls_type", "quantizer"),
    [
        ("ap_fixed<8,4>", "quantized_bits(8,3,0,1,alpha=1)"),
        ("fixed<8,4>", "quantized_bits(8,3,0,1,alpha=1)"),
        ("ap_ufixed<6,2>", "quantized_bits(6,2,0,0,alpha=1)"),
        ("ufixed<6,2>", "quantized_bits(6,2,0,0,alpha=1)"),
    ],
)
def test_source_quantizers_accept_hls4ml_types(hls_type, quantizer):
    model = builders.sequential_conv()
    assert accumulator_types(model, [hls_type]) == accumulator_types(model, [quantizer])


def _float_input_model():
    inputs = keras.Input((5,))
    x = keras.layers.Activation("sigmoid", name="squash")(inputs)
    x = qkeras.QDense(3, kernel_quantizer="quantized_bits(4,0,1)", name="after")(x)
    return keras.Model(inputs, x)


def test_float_input_to_a_mac_layer_is_a_warning_naming_the_layer_and_why():
    with pytest.warns(UntypedAccumulatorWarning, match=r"'after'.*'squash'.*sigmoid"):
        assert accumulator_types(_float_input_model()) == {}


def test_strict_float_input_to_a_mac_layer_is_an_error_naming_the_layer():
    with pytest.raises(TypeInferenceError, match=r"'after'.*sigmoid"):
        accumulator_types(_float_input_model(), strict=True)


def test_populate_leaves_a_float_fed_folded_layer_unfilled_with_a_warning():
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.AveragePooling2D(3, name="pool")(inputs)
    x = qkeras.QConv2DBatchnorm(
        2, 1, kernel_quantizer="quantized_bits(4,0,1,alpha=1)", bias_quantizer=None, name="c"
    )(x)
    model = keras.Model(inputs, x)
    with pytest.warns(UntypedAccumulatorWarning, match=r"'c'.*'pool' averages 9 values"):
        populate_bias_quantizer_from_accumulator(model, ["quantized_bits(8,3,1)"])
    assert model.get_layer("c").bias_quantizer_internal is None
    with pytest.raises(TypeInferenceError, match=r"'c'.*'pool' averages 9 values"):
        populate_bias_quantizer_from_accumulator(model, ["quantized_bits(8,3,1)"], strict=True)


def test_unsupported_layer_is_named_before_any_type_inference():
    inputs = keras.Input((4,))
    x = keras.layers.Dot(axes=1, name="dot")([inputs, inputs])
    x = qkeras.QDense(3, kernel_quantizer="quantized_bits(4,0,1)", name="after")(x)
    with pytest.raises(UnsupportedLayerError, match=r"'dot' of class Dot. Supported: "):
        accumulator_types(keras.Model(inputs, x))


def test_wrong_number_of_source_quantizers():
    with pytest.raises(ValueError, match="one quantizer per model input"):
        accumulator_types(builders.multi_io(), ["quantized_bits(8,3,1)"])


def _product(bits: int) -> keras.Model:
    """The Multiply of two inputs of quantized_bits(bits,4,1) (symmetric): 2 * bits bits."""
    inputs = [keras.Input((16,), name=name) for name in ("a", "b")]
    quantizer = f"quantized_bits({bits},4,1,alpha=1)"
    factors = [qkeras.QActivation(quantizer, name=f"{x.name}_q")(x) for x in inputs]
    return keras.Model(inputs, keras.layers.Multiply(name="product")(factors))


def test_products_wider_than_float32_holds_warn_naming_the_layer_and_strict_refuses(tmp_path):
    """QKeras rounds 32-bit products to float32's 24-bit significand, where fixed-point
    hardware computes them exactly: the export warns (RangeWarning) and goes on exactly as
    QKeras; strict refuses with a TypeInferenceError and writes nothing."""
    model = _product(16)
    sources = ["quantized_bits(16,4,1,alpha=1)"] * 2
    message = r"24-bit significand.*layer='product' gives ap_fixed<32,9> \(31 bits"
    with pytest.warns(RangeWarning, match=message):
        bnfold.export_onnx(model, source_quantizers=sources)
    output = tmp_path / "product.onnx"
    with pytest.raises(TypeInferenceError, match=message):
        bnfold.export_onnx(model, output, source_quantizers=sources, strict=True)
    assert not output.exists()
    with pytest.raises(TypeInferenceError, match=message):
        accumulator_types(model, sources, strict=True)
    # The warning is real: float32 rounds some of these products.
    grid = FixedPoint.from_quantizer(sources[0])
    rng = np.random.default_rng(0)
    a, b = (grid.quantize(rng.uniform(grid.min, grid.max, (64, 16))) for _ in range(2))
    computed = model.predict([a.astype(np.float32), b.astype(np.float32)], verbose=0)
    assert np.any(computed != a * b)


def test_products_float32_holds_give_no_warning():
    """12-bit factors: 24-bit signed products, 23 bits besides the sign, exact in float32."""
    sources = ["quantized_bits(12,4,1,alpha=1)"] * 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", RangeWarning)
        bnfold.export_onnx(_product(12), source_quantizers=sources, strict=True)
