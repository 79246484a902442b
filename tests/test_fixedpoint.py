"""FixedPoint against real QKeras quantizers: every output held, tight where it should be."""

from __future__ import annotations

import dataclasses
import itertools
import re

import numpy as np
import pytest
from qonnx.core.datatype import DataType
from qonnx.custom_op.general.intquant import int_quant

from bnfold.fixedpoint import FixedPoint, QuantizerError
from bnfold.keras import keras, qkeras, quantizers, tf
from bnfold.quantizer_table import as_quantizer, parse_quantizer


def _apply(quantizer, values: np.ndarray) -> np.ndarray:
    """Runs a QKeras quantizer eagerly on float32 values."""
    return np.asarray(quantizer(tf.constant(values, dtype=tf.float32)), dtype=np.float64)


def _inputs(limit: float, spacing: float) -> np.ndarray:
    """A dense float32 grid over [-limit, limit]: grid points, ties and values between."""
    return np.arange(-limit, limit + spacing, spacing, dtype=np.float64).astype(np.float32)


def _grid_inputs(fp: FixedPoint) -> np.ndarray:
    """Inputs spanning four times the type's range, eight samples per step."""
    return _inputs(4 * max(1.0, -fp.min, fp.max + fp.step), fp.step / 8)


def _values(fp: FixedPoint) -> np.ndarray:
    """Every value of a (small) type, from its integer codes."""
    lowest = round(fp.min / fp.step)
    return np.arange(lowest, round(fp.max / fp.step) + 1, dtype=np.float64) * fp.step


def _sums(values: np.ndarray, step: float, count: int) -> np.ndarray:
    """Every sum of ``count`` values (repetition allowed), all multiples of ``step``."""
    codes = np.unique(np.round(values / step).astype(np.int64))
    reachable = np.zeros(1, dtype=np.int64)
    for _ in range(count):
        reachable = np.unique(np.add.outer(reachable, codes).ravel())
    return reachable * step


# ------------------------------------------------------------------ quantized_bits


QUANTIZED_BITS = [
    pytest.param(8, 3, 0, 1, id="bits(8,3)"),
    pytest.param(4, 0, 1, 1, id="bits(4,0,sym)"),
    pytest.param(4, 0, 0, 1, id="bits(4,0)"),
    pytest.param(6, 2, 0, 0, id="bits(6,2,unsigned)"),
    pytest.param(6, 2, 1, 0, id="bits(6,2,sym,unsigned)"),
    pytest.param(3, 0, 0, 1, id="bits(3,0)"),
    pytest.param(5, 5, 1, 1, id="bits(5,5,sym)"),
    pytest.param(2, 0, 0, 1, id="bits(2,0)"),
    pytest.param(1, 0, 0, 0, id="bits(1,0,unsigned)"),
    pytest.param(8, 0, 0, 0, id="bits(8,0,unsigned)"),
]


@pytest.mark.parametrize(("bits", "integer", "symmetric", "keep_negative"), QUANTIZED_BITS)
def test_quantized_bits_outputs_fill_the_type(bits, integer, symmetric, keep_negative):
    quantizer = quantizers.quantized_bits(bits, integer, symmetric, keep_negative)
    fp = FixedPoint.from_quantizer(quantizer)
    narrow = bool(symmetric and keep_negative)
    assert fp == FixedPoint(bits, integer, bool(keep_negative), narrow=narrow)
    assert fp.narrow == narrow  # an unsigned symmetric quantizer is not narrow
    assert fp.step == 2.0 ** (integer - (bits - keep_negative))

    values = _grid_inputs(fp)
    outputs = _apply(quantizer, values)
    assert fp.contains(outputs)
    assert np.array_equal(outputs, fp.quantize(values))
    assert np.array_equal(np.unique(outputs), _values(fp))  # exactly the type's values
    assert outputs.max() == fp.max
    assert outputs.min() == fp.min
    if narrow:
        assert fp.min == -fp.max


@pytest.mark.parametrize("symmetric", [0, 1])
def test_one_bit_signed_quantized_bits_is_binary(symmetric):
    quantizer = quantizers.quantized_bits(1, 0, symmetric, 1)
    fp = FixedPoint.from_quantizer(quantizer)
    outputs = _apply(quantizer, _inputs(4.0, 1 / 16))
    assert set(np.unique(outputs)) == {-1.0, 1.0}
    assert fp == FixedPoint(2, 1, True, narrow=True)
    assert fp.contains(outputs)
    assert (fp.min, fp.max) == (-1.0, 1.0)


@pytest.mark.parametrize("symmetric", [True, False, np.int64(1), 1.0])
def test_symmetric_flag_may_be_any_zero_or_one(symmetric):
    quantizer = quantizers.quantized_bits(4, 0, symmetric, 1)
    assert FixedPoint.from_quantizer(quantizer).narrow == bool(symmetric)


def test_scaled_quantized_bits_changed_to_non_symmetric_is_refused():
    """QKeras sets symmetric for a string alpha and asserts it when applied."""
    quantizer = quantizers.quantized_bits(4, 0, 0, alpha="auto_po2")
    assert quantizer.symmetric is True
    quantizer.symmetric = False
    with pytest.raises(AssertionError):
        quantizer(tf.constant([[0.5, -0.25]]))
    with pytest.raises(QuantizerError, match="must be symmetric"):
        FixedPoint.from_quantizer(quantizer, allow_scale=True)


# ------------------------------------------------------------------ quantized_relu


QUANTIZED_RELU = [
    pytest.param(4, 1, id="relu(4,1)"),
    pytest.param(4, 0, id="relu(4,0)"),
    pytest.param(6, 2, id="relu(6,2)"),
    pytest.param(3, 3, id="relu(3,3)"),
    pytest.param(8, 4, id="relu(8,4)"),
    pytest.param(1, 1, id="relu(1,1)"),
    pytest.param(5, 0, id="relu(5,0)"),
]


@pytest.mark.parametrize(("bits", "integer"), QUANTIZED_RELU)
def test_quantized_relu_outputs_fill_the_type(bits, integer):
    quantizer = quantizers.quantized_relu(bits, integer)
    fp = FixedPoint.from_quantizer(quantizer)
    assert fp == FixedPoint(bits, integer, False)
    assert fp.step == 2.0 ** (integer - bits)

    values = _grid_inputs(fp)
    outputs = _apply(quantizer, values)
    assert fp.contains(outputs)
    assert np.array_equal(outputs, fp.quantize(values))
    assert outputs.min() == fp.min == 0.0
    assert outputs.max() == fp.max


def test_quantized_relu_upper_bound_on_the_grid_is_accepted():
    quantizer = quantizers.quantized_relu(4, 1, relu_upper_bound=1.0, is_quantized_clip=False)
    fp = FixedPoint.from_quantizer(quantizer)
    outputs = _apply(quantizer, _inputs(8.0, 1 / 64))
    assert fp == FixedPoint(4, 1, False)
    assert fp.contains(outputs)


# ------------------------------------------------------------------ powers of two


PO2 = [
    pytest.param("quantized_po2(4)", id="po2(4)"),
    pytest.param("quantized_po2(4,1)", id="po2(4,max1)"),
    pytest.param("quantized_po2(3,2)", id="po2(3,max2)"),
    pytest.param("quantized_po2(5,3)", id="po2(5,max3)"),
    pytest.param("quantized_po2(4,quadratic_approximation=True)", id="po2(4,quadratic)"),
    pytest.param("quantized_po2(4,log2_rounding='floor')", id="po2(4,floor)"),
    pytest.param("quantized_relu_po2(4)", id="relu_po2(4)"),
    pytest.param("quantized_relu_po2(3,1)", id="relu_po2(3,max1)"),
    pytest.param("quantized_relu_po2(4,6)", id="relu_po2(4,max6)"),
    pytest.param("quantized_relu_po2(3,0.5)", id="relu_po2(3,max0.5)"),
    pytest.param("quantized_relu_po2(4,quadratic_approximation=True)", id="relu_po2(quadratic)"),
]


@pytest.mark.parametrize("text", PO2)
def test_power_of_two_outputs_are_held(text):
    quantizer = parse_quantizer(text)
    fp = FixedPoint.from_quantizer(quantizer)
    # Dense over the whole exponent range: multiples of a fine step, and powers of two
    # with their neighbours, both signs, far beyond the largest exponent.
    exponents = np.arange(quantizer._min_exp - 4, quantizer._max_exp + 6, dtype=np.float64)
    powers = np.ldexp(1.0, exponents.astype(int))
    around = np.concatenate([powers, powers * 0.75, powers * 1.4142135, powers * 1.5])
    values = np.concatenate([around, -around, _inputs(16.0, 1 / 256)]).astype(np.float32)
    outputs = _apply(quantizer, values)

    assert fp.contains(outputs)
    assert np.all(outputs != 0)  # po2 never outputs 0, the type need not either
    largest = np.abs(outputs).max()
    assert largest > fp.max / 2, "one integer bit fewer would still hold every output"
    if not quantizer.quadratic_approximation:
        assert np.abs(outputs).min() == fp.step, "the smallest power (input 0) is the step"
    assert fp.signed == (type(quantizer).__name__ == "quantized_po2")
    # Signed powers of two never reach -2**integer, so the type is narrow.
    assert fp.narrow == fp.signed
    if fp.signed:
        assert outputs.min() > -(2.0**fp.integer)
        assert fp.min == -fp.max


def test_power_of_two_max_value_may_round_above_it():
    """log2(3) rounds to 2, so quantized_po2(4, 3) outputs 4 although max_value is 3."""
    quantizer = parse_quantizer("quantized_po2(4,3)")
    fp = FixedPoint.from_quantizer(quantizer)
    outputs = _apply(quantizer, _inputs(8.0, 1 / 32))
    assert outputs.max() == 4.0
    assert fp.contains(outputs)


# ------------------------------------------------------------------ binary and ternary


# Binary +-1 and ternary never output -2, so sfixed(2,1) is narrow: exactly {-1, 0, 1}.
PLUS_MINUS_ONE = FixedPoint(2, 1, True, narrow=True)

BINARY_TERNARY = [
    pytest.param("binary()", PLUS_MINUS_ONE, {-1.0, 1.0}, id="binary"),
    pytest.param("binary(alpha=1)", PLUS_MINUS_ONE, {-1.0, 1.0}, id="binary(alpha1)"),
    pytest.param("binary(use_01=True)", FixedPoint(1, 1, False), {0.0, 1.0}, id="binary01"),
    pytest.param(
        "binary(use_01=True,alpha=1)", FixedPoint(1, 1, False), {0.0, 1.0}, id="binary01(alpha1)"
    ),
    pytest.param("ternary()", PLUS_MINUS_ONE, {-1.0, 0.0, 1.0}, id="ternary"),
    pytest.param("ternary(alpha=1)", PLUS_MINUS_ONE, {-1.0, 0.0, 1.0}, id="ternary(a1)"),
    pytest.param("ternary(threshold=0.5)", PLUS_MINUS_ONE, {-1.0, 0.0, 1.0}, id="ternary(t0.5)"),
]


@pytest.mark.parametrize(("text", "expected", "levels"), BINARY_TERNARY)
def test_binary_and_ternary_outputs_are_held(text, expected, levels):
    quantizer = parse_quantizer(text)
    fp = FixedPoint.from_quantizer(quantizer)
    outputs = _apply(quantizer, _inputs(3.0, 1 / 128))
    assert fp == expected
    assert set(np.unique(outputs)) == levels
    assert fp.contains(outputs)
    assert fp.min == min(levels) and fp.max == max(levels)  # tight on both sides


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("quantized_bits(100000000,3,1)", r"1 to 64 bits \(got 100000000\)"),
        ("quantized_bits(0,0,1)", r"1 to 64 bits \(got 0\)"),
        ("quantized_relu(65,4)", r"1 to 64 bits \(got 65\)"),
        ("quantized_po2(100000)", r"1 to 64 bits \(got 100000\)"),
        ("quantized_bits(8,999999999999,1)", r"within float32.*integer=999999999999"),
        ("quantized_relu(8,128)", r"within float32.*integer=128"),
        ("quantized_bits(64,-90,1)", r"within float32.*integer=-90"),
        ("ap_fixed<100000,3>", r"1 to 64 bits \(got 100000\)"),
        ("fixed<16,999>", r"within float32.*integer=998"),
    ],
)
def test_absurd_widths_are_quantizer_errors_naming_the_string(text, pattern):
    with pytest.raises(QuantizerError, match=rf"{pattern}.*layer='q'.*{re.escape(text)}"):
        FixedPoint.from_quantizer(text, layer="q")


def test_absurd_widths_of_quantizer_objects_and_configs_are_refused():
    config = {"class_name": "quantized_bits", "config": {"bits": 4, "integer": 200}}
    with pytest.raises(QuantizerError, match=r"within float32.*integer=200"):
        as_quantizer(config, layer="q")
    with pytest.raises(QuantizerError, match=r"1 to 64 bits \(got 80\)"):
        FixedPoint.from_quantizer(quantizers.quantized_bits(80, 3, 1))
    assert FixedPoint.from_quantizer("quantized_bits(64,127,1)") == FixedPoint(64, 127, True, True)


# ------------------------------------------------------------------ per-channel scales


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "quantized_bits(4,0,1,alpha='auto_po2')", FixedPoint(4, 0, True, True), id="bits"
        ),
        # QKeras makes every string alpha symmetric, so symmetric=0 here still is narrow.
        pytest.param(
            "quantized_bits(6,2,alpha='auto')", FixedPoint(6, 2, True, True), id="bits-auto"
        ),
        pytest.param("binary(alpha='auto_po2')", PLUS_MINUS_ONE, id="binary"),
        pytest.param("ternary(alpha='auto_po2')", PLUS_MINUS_ONE, id="ternary"),
    ],
)
def test_scaled_quantizers_need_allow_scale_and_give_the_unscaled_grid(text, expected):
    with pytest.raises(QuantizerError, match="allow_scale=True"):
        FixedPoint.from_quantizer(text, layer="conv1")
    quantizer = parse_quantizer(text)
    fp = FixedPoint.from_quantizer(quantizer, allow_scale=True)
    assert fp == expected

    kernel = np.random.default_rng(0).normal(0, 0.3, size=(3, 3, 2, 5)).astype(np.float32)
    outputs = _apply(quantizer, kernel)
    scale = np.asarray(quantizer.scale, dtype=np.float64)
    assert scale.shape == (1, 1, 1, 5)
    unscaled = outputs / scale
    if "po2" in text or not text.startswith("quantized_bits"):
        assert fp.contains(unscaled)
    else:
        # A float scale: QKeras multiplies in float32, so the division is only close.
        assert np.allclose(unscaled, fp.quantize(unscaled), rtol=1e-6, atol=0)
        # Shrunk towards 0 by the float32 error; the narrow min is reached, not -2**integer.
        assert fp.holds(unscaled.min() * (1 - 1e-6), unscaled.max() * (1 - 1e-6))
        assert fp.quantize(unscaled.min()) == fp.min == -fp.max


@pytest.mark.filterwarnings("ignore:The `keras.constraints.serialize:UserWarning")
def test_a_qkeras_layer_turns_a_kernel_alpha_none_into_auto_po2():
    layer = qkeras.QDense(
        3,
        kernel_quantizer="quantized_bits(4,0,1)",
        bias_quantizer="quantized_bits(8,3)",
        activation="quantized_relu(4,1)",
    )
    config = layer.get_config()
    with pytest.raises(QuantizerError, match="auto_po2"):
        FixedPoint.from_quantizer(config["kernel_quantizer"], layer="dense")
    assert FixedPoint.from_quantizer(config["kernel_quantizer"], allow_scale=True) == FixedPoint(
        4, 0, True, narrow=True
    )
    assert FixedPoint.from_quantizer(config["bias_quantizer"]) == FixedPoint(8, 3, True)
    assert FixedPoint.from_quantizer(config["activation"]) == FixedPoint(4, 1, False)
    assert FixedPoint.from_quantizer(layer.bias_quantizer_internal) == FixedPoint(8, 3, True)


# ------------------------------------------------------------------ conversions out


ROUND_TRIP = [
    "quantized_bits(4,0,1)",
    "quantized_bits(8,3)",
    "quantized_bits(10,3,1,1)",
    "quantized_bits(6,2,0,0)",
    "quantized_bits(6,2,keep_negative=False)",
    "quantized_bits(3,0,0,1,alpha=1)",
    "quantized_bits(12,12)",
    "quantized_relu(4,1)",
    "quantized_relu(8,0)",
    "quantized_po2(4,1)",
    "quantized_relu_po2(4)",
    "binary()",
    "ternary()",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_string_round_trip(text):
    fp = FixedPoint.from_quantizer(text)
    string = fp.quantizer_string()
    assert FixedPoint.from_quantizer(string) == fp
    assert FixedPoint.from_quantizer(fp.to_quantizer()) == fp
    assert str(parse_quantizer(string)) == str(fp.to_quantizer())
    # QKeras's own parser reads it too.
    assert str(quantizers.get_quantizer(string)) == str(parse_quantizer(string))


@pytest.mark.parametrize("text", ROUND_TRIP)
@pytest.mark.parametrize("narrow", [False, True], ids=["full", "narrow"])
def test_round_trip_keeps_narrow(text, narrow):
    fp = dataclasses.replace(FixedPoint.from_quantizer(text), narrow=narrow)
    assert fp.narrow == (narrow and fp.signed)
    string = fp.quantizer_string()
    assert string == (
        f"quantized_bits({fp.bits},{fp.integer},{int(fp.narrow)},{int(fp.signed)},alpha=1)"
    )
    assert FixedPoint.from_quantizer(string) == fp
    assert FixedPoint.from_quantizer(fp.to_quantizer()) == fp
    assert FixedPoint.from_quantizer(quantizers.get_quantizer(string)) == fp
    assert fp.to_quantizer().symmetric == int(fp.narrow)


@pytest.mark.parametrize(
    "fp",
    [
        FixedPoint(8, 3, True),
        FixedPoint(4, 0, True),
        FixedPoint(10, 3, True),
        FixedPoint(6, 2, False),
        FixedPoint(5, 0, True),
        FixedPoint(3, 4, False),
        FixedPoint(2, 1, True),
    ],
    ids=str,
)
@pytest.mark.parametrize("narrow", [False, True], ids=["full", "narrow"])
def test_to_quantizer_matches_qkeras_quantized_bits(fp, narrow):
    fp = dataclasses.replace(fp, narrow=narrow)
    values = _grid_inputs(fp)
    reference = quantizers.quantized_bits(fp.bits, fp.integer, int(narrow), fp.signed)
    ours = fp.to_quantizer()
    outputs = _apply(ours, values)
    assert np.array_equal(outputs, _apply(reference, values))
    assert np.array_equal(outputs, fp.quantize(values))
    assert np.array_equal(np.unique(outputs), _values(fp))
    assert FixedPoint.from_quantizer(ours) == fp
    assert outputs.max() == fp.max
    assert outputs.min() == fp.min
    if fp.narrow:
        assert fp.min == -fp.max == -(2.0**fp.integer - fp.step)


@pytest.mark.parametrize(
    "fp",
    [
        FixedPoint(8, 3, True),
        FixedPoint(8, 3, True, narrow=True),
        FixedPoint(4, 0, True, narrow=True),
        FixedPoint(2, 1, True, narrow=True),
        FixedPoint(6, 2, False),
        FixedPoint(5, -2, True, narrow=True),
        FixedPoint(3, 4, False),
    ],
    ids=str,
)
def test_quantize_matches_a_qonnx_quant_node(fp):
    """A Quant node with bitwidth=bits, scale=step, signed and narrow is this type."""
    values = _grid_inputs(fp)
    node = int_quant(
        values.astype(np.float64),
        np.float64(fp.step),
        np.float64(0.0),
        np.int64(fp.bits),
        fp.signed,
        fp.narrow,
        "ROUND",
    )
    assert np.array_equal(fp.quantize(values), node)
    assert node.min() == fp.min and node.max() == fp.max


def test_to_quantizer_keeps_its_grid_inside_a_layer():
    """alpha=1 stops a layer from replacing the grid by a per-channel auto_po2 scale."""
    layer = qkeras.QDense(2, kernel_quantizer=FixedPoint(4, 0, True).to_quantizer())
    assert layer.kernel_quantizer_internal.alpha == 1


def test_negative_integer_types_have_no_qkeras_quantizer():
    """QKeras 0.9.0 computes 2**integer on int32 tensors and cannot apply integer < 0."""
    with pytest.raises(tf.errors.InvalidArgumentError):
        quantizers.quantized_bits(4, -1)(tf.constant([0.1]))
    fp = FixedPoint.from_quantizer("quantized_bits(4,-1)")
    assert fp == FixedPoint(4, -1, True)
    with pytest.raises(ValueError, match=r"widen\(1, 1\)"):
        fp.to_quantizer()
    widened = fp.widen(1, 1)
    assert widened.step == fp.step and widened.includes(fp)
    values = _grid_inputs(fp)
    assert np.array_equal(_apply(widened.to_quantizer(), values), widened.quantize(values))


def test_one_bit_signed_type_has_no_qkeras_quantizer():
    with pytest.raises(ValueError, match="1-bit signed"):
        FixedPoint(1, 0, True).to_quantizer()
    with pytest.raises(ValueError, match="1-bit signed"):
        FixedPoint(1, 0, True).quantizer_string()


@pytest.mark.parametrize(
    ("text", "hls"),
    [
        ("quantized_bits(8,3,1)", "ap_fixed<8,4>"),
        ("quantized_bits(4,0,1)", "ap_fixed<4,1>"),
        ("quantized_bits(6,2,keep_negative=False)", "ap_ufixed<6,2>"),
        ("quantized_bits(4,-2)", "ap_fixed<4,-1>"),
        ("quantized_relu(4,1)", "ap_ufixed<4,1>"),
        ("quantized_relu(8,0)", "ap_ufixed<8,0>"),
    ],
)
def test_hls_strings(text, hls):
    assert FixedPoint.from_quantizer(text).hls() == hls


@pytest.mark.parametrize(
    ("fp", "name"),
    [
        (FixedPoint(8, 3, True), "INT8"),
        (FixedPoint(4, 1, False), "UINT4"),
        (FixedPoint(1, 1, False), "BINARY"),
        (FixedPoint(2, 1, True), "INT2"),
        (FixedPoint(10, 3, True), "INT10"),
        (FixedPoint(8, 3, True, narrow=True), "INT8"),
        (FixedPoint(2, 1, True, narrow=True), "INT2"),
    ],
    ids=str,
)
def test_qonnx_datatype_names_the_integer_codes(fp, name):
    assert fp.qonnx_datatype() == name
    datatype = DataType[name]
    codes = np.arange(2**fp.bits - fp.narrow) + (datatype.min() + fp.narrow)
    values = codes * fp.step
    assert fp.contains(values)
    assert not fp.contains((codes.min() - 1) * fp.step)
    assert datatype.allowed(np.array([fp.min, fp.max]) / fp.step).all()
    assert (datatype.min() + fp.narrow) * fp.step == fp.min
    assert datatype.max() * fp.step == fp.max


def test_str_is_short_and_stable():
    assert str(FixedPoint(8, 3, True)) == "sfixed(8,3)"
    assert str(FixedPoint(8, 3, True, narrow=True)) == "sfixed(8,3,narrow)"
    assert str(FixedPoint(4, 1, False)) == "ufixed(4,1)"
    assert str(FixedPoint(4, 1, False, narrow=True)) == "ufixed(4,1)"


def test_hls_has_no_narrow_form():
    assert FixedPoint(8, 3, True, narrow=True).hls() == FixedPoint(8, 3, True).hls()


@pytest.mark.parametrize(
    ("fp", "plain", "quantizing"),
    [
        (FixedPoint(8, 3, True), "fixed<8,4>", "fixed<8,4,RND_CONV,SAT>"),
        (FixedPoint(8, 3, True, narrow=True), "fixed<8,4>", "fixed<8,4,RND_CONV,SAT_SYM>"),
        (FixedPoint(6, 2, False), "ufixed<6,2>", "ufixed<6,2,RND_CONV,SAT>"),
        (FixedPoint(1, -3, False), "ufixed<1,-3>", "ufixed<1,-3,RND_CONV,SAT>"),
        (FixedPoint(4, 6, True, narrow=True), "fixed<4,7>", "fixed<4,7,RND_CONV,SAT_SYM>"),
    ],
    ids=str,
)
def test_hls4ml_precision_spells_hls_for_hls4ml(fp, plain, quantizing):
    assert fp.hls4ml_precision() == plain
    assert fp.hls4ml_precision(quantizing=True) == quantizing
    assert "ap_" + plain == fp.hls()


@pytest.mark.parametrize(
    "fp",
    [
        FixedPoint(8, 3, True),
        FixedPoint(19, 8, True, narrow=True),
        FixedPoint(4, -2, True),
        FixedPoint(6, 2, False),
        FixedPoint(3, 5, False),
        FixedPoint(1, 0, False),
    ],
    ids=str,
)
def test_from_hls_inverts_hls(fp):
    assert FixedPoint.from_hls(fp.hls()) == dataclasses.replace(fp, narrow=False)


@pytest.mark.parametrize("text", ["ap_fixed<8>", "ap_fixed<8,4,AP_RND>", "fixed8,4>", "8,4", ""])
def test_from_hls_refuses_other_strings(text):
    with pytest.raises(ValueError, match="ap_fixed<W,I>, ap_ufixed<W,I>, fixed<W,I> or"):
        FixedPoint.from_hls(text)


@pytest.mark.parametrize(
    "fp",
    [
        FixedPoint(8, 3, True),
        FixedPoint(8, 3, True, narrow=True),
        FixedPoint(6, 2, False),
        FixedPoint(5, -2, True, narrow=True),
        FixedPoint(3, 4, False),
        FixedPoint(1, 1, False),
    ],
    ids=str,
)
def test_from_qonnx_quant_inverts_the_quant_node_of_a_type(fp):
    """bitwidth=bits, scale=step, signed, narrow: the node bnfold writes for ``fp``."""
    bitwidth, scale = np.float32(fp.bits), np.float32(fp.step)
    assert FixedPoint.from_qonnx_quant(bitwidth, scale, signed=fp.signed, narrow=fp.narrow) == fp
    equal_channels = np.full((4, 1, 1, 1), fp.step, dtype=np.float32)
    same = FixedPoint.from_qonnx_quant(fp.bits, equal_channels, signed=fp.signed, narrow=fp.narrow)
    assert same == fp


@pytest.mark.parametrize(
    ("scale", "signed", "narrow", "message"),
    [
        (0.75, True, False, "power-of-two scale"),
        (np.array([0.5, 0.25]), True, False, "power-of-two scale"),
        (-0.5, True, False, "power-of-two scale"),
        (0.5, False, True, "unsigned narrow"),
    ],
)
def test_from_qonnx_quant_refuses_nodes_without_a_type(scale, signed, narrow, message):
    with pytest.raises(ValueError, match=message):
        FixedPoint.from_qonnx_quant(4, scale, signed=signed, narrow=narrow)


# ------------------------------------------------------------------ accumulator algebra


def test_qkeras_sum_of_products_example():
    """QKeras's test: relu(4,1) input, bits(4,0,1) weights, 4 products -> bits(10,3,1)."""
    inputs = FixedPoint.from_quantizer("quantized_relu(4,1)")
    weights = FixedPoint.from_quantizer("quantized_bits(4,0,1)")
    assert weights == FixedPoint(4, 0, True, narrow=True)
    product = inputs.product(weights)
    assert product == FixedPoint(8, 1, True, narrow=True)
    total = product.sum_of(4)
    assert total == FixedPoint(10, 3, True, narrow=True)
    assert total.quantizer_string() == "quantized_bits(10,3,1,1,alpha=1)"
    assert total == FixedPoint.from_quantizer("quantized_bits(10,3,1)")
    assert total.widen(1, 1) == FixedPoint(11, 4, True, narrow=True)

    # Exhaustively over the real quantized values.
    input_values = np.unique(_apply(quantizers.quantized_relu(4, 1), _inputs(3.0, 1 / 32)))
    weight_values = np.unique(_apply(quantizers.quantized_bits(4, 0, 1), _inputs(2.0, 1 / 32)))
    assert np.array_equal(input_values, _values(inputs))
    assert np.array_equal(weight_values, _values(weights))
    products = np.unique(np.outer(input_values, weight_values))
    assert product.contains(products)
    assert products.min() == -products.max() == -inputs.max * weights.max == -1.875 * 0.875
    assert not FixedPoint(7, 0, True).holds(products.min(), products.max())  # integer bit needed
    sums = _sums(products, product.step, 4)
    assert total.contains(sums)
    # Plus a bias of the full-range sum-of-products type: widen(1, 1) stays narrow.
    biased = np.add.outer(sums, _values(FixedPoint(10, 3, True))).ravel()
    assert total.widen(1, 1).contains(biased)


def test_symmetric_inputs_times_auto_po2_kernel_need_no_extra_bit():
    """QKeras's default source quantizer quantized_bits(8,0,1) is symmetric, as every
    auto_po2 kernel is: their product fits qtools's 8 + 4 bits with 0 + 0 integer bits."""
    source = quantizers.quantized_bits(8, 0, 1)
    kernel_quantizer = parse_quantizer("quantized_bits(4,0,1,alpha='auto_po2')")
    inputs = FixedPoint.from_quantizer(source)
    weights = FixedPoint.from_quantizer(kernel_quantizer, allow_scale=True)
    assert inputs == FixedPoint(8, 0, True, narrow=True)
    assert weights == FixedPoint(4, 0, True, narrow=True)

    input_values = np.unique(_apply(source, _inputs(2.0, 1 / 1024)))
    assert np.array_equal(input_values, _values(inputs))
    # One kernel column spanning every level; its po2 scale is 1.
    kernel = (np.arange(-7, 8) / 8).reshape(15, 1).astype(np.float32)
    outputs = _apply(kernel_quantizer, kernel)
    weight_values = np.unique(outputs / np.asarray(kernel_quantizer.scale, dtype=np.float64))
    assert np.array_equal(weight_values, _values(weights))

    product = inputs.product(weights)
    assert product == FixedPoint(12, 0, True, narrow=True)  # qtools's widths
    # Two signed sides: 12 bits are one more than the products need, kept on the right.
    assert product.step == inputs.step * weights.step / 2
    products = np.unique(np.outer(input_values, weight_values))
    assert product.contains(products)
    assert products.max() == -products.min() == (127 / 128) * (7 / 8)
    assert np.abs(products).max() < 2.0 ** (inputs.integer + weights.integer)
    assert not FixedPoint(11, -1, True, narrow=True).holds(products.min(), products.max())


def test_full_range_signed_operands_need_the_extra_bit():
    """quantized_bits(8,0,0,1) * quantized_bits(4,0,0,1) reaches (-1)*(-1) = 1, which
    qtools's 8 + 4 bits with 0 integer bits cannot hold."""
    source = quantizers.quantized_bits(8, 0, 0, 1)
    kernel_quantizer = quantizers.quantized_bits(4, 0, 0, 1)
    inputs = FixedPoint.from_quantizer(source)
    weights = FixedPoint.from_quantizer(kernel_quantizer)
    assert inputs == FixedPoint(8, 0, True) and weights == FixedPoint(4, 0, True)

    input_values = np.unique(_apply(source, _inputs(2.0, 1 / 1024)))
    weight_values = np.unique(_apply(kernel_quantizer, _inputs(2.0, 1 / 64)))
    assert np.array_equal(input_values, _values(inputs))
    assert np.array_equal(weight_values, _values(weights))

    product = inputs.product(weights)
    assert product == FixedPoint(12, 1, True)
    assert product.step == inputs.step * weights.step
    products = np.unique(np.outer(input_values, weight_values))
    assert product.contains(products)
    assert products.max() == inputs.min * weights.min == 1.0
    assert products.min() == inputs.max * weights.min == -127 / 128
    qtools = FixedPoint(12, 0, True)
    assert not qtools.contains(products.max())
    assert qtools.contains(products[products < 1.0])  # only (-1)*(-1) overflows


def _small_types() -> list[FixedPoint]:
    kinds = [(False, False), (True, False), (True, True)]
    return [
        FixedPoint(bits, integer, signed, narrow)
        for bits in (1, 2, 3, 4)
        for integer in (-1, 0, 2)
        for signed, narrow in kinds
    ]


def _product_step(a: FixedPoint, b: FixedPoint) -> float:
    """The product of the steps, halved for two signed sides of which one is narrow: they
    keep qtools's a.bits + b.bits, one bit more than one sign bit needs."""
    halved = a.signed and b.signed and (a.narrow or b.narrow)
    return a.step * b.step / (2 if halved else 1)


def test_product_rule_holds_for_every_small_pair():
    """Exhaustive: every product of every pair of small types is in the product type."""
    types = _small_types()
    for a, b in itertools.product(types, types):
        product = a.product(b)
        products = np.unique(np.outer(_values(a), _values(b)))
        assert product.contains(products), (a, b)
        assert product.step == _product_step(a, b)
        assert product.bits == a.bits + b.bits
        assert product.signed == (a.signed or b.signed)
        extra = a.signed and b.signed and not (a.narrow or b.narrow)
        assert product.integer == a.integer + b.integer + extra
        assert product.narrow == (product.signed and not extra)
        if extra:
            # (-2**i) * (-2**j) = 2**(i + j) needs the extra bit.
            assert products.max() == 2.0 ** (a.integer + b.integer)
            same_step = FixedPoint(product.bits - 1, product.integer - 1, True)
            assert not same_step.holds(0.0, products.max())


PRODUCT_PAIRS = [
    pytest.param(FixedPoint(4, 1, False), FixedPoint(4, 0, True), id="unsigned*signed"),
    pytest.param(FixedPoint(4, 0, True), FixedPoint(4, 1, False), id="signed*unsigned"),
    pytest.param(FixedPoint(4, 0, True), FixedPoint(4, 0, True), id="signed*signed"),
    pytest.param(FixedPoint(8, 3, True), FixedPoint(3, -1, True), id="signed*signed-neg-int"),
    pytest.param(FixedPoint(5, 2, False), FixedPoint(3, 0, False), id="unsigned*unsigned"),
    pytest.param(PLUS_MINUS_ONE, FixedPoint(6, 2, False), id="binary*unsigned"),
    pytest.param(FixedPoint(1, 3, True), FixedPoint(1, 2, True), id="one-bit*one-bit"),
    pytest.param(FixedPoint(4, 0, True, True), FixedPoint(4, 0, True), id="narrow*signed"),
    pytest.param(FixedPoint(4, 0, True), FixedPoint(6, 2, True, True), id="signed*narrow"),
    pytest.param(PLUS_MINUS_ONE, PLUS_MINUS_ONE, id="ternary*ternary"),
]


@pytest.mark.parametrize(("a", "b"), PRODUCT_PAIRS)
def test_product_holds_every_product(a, b):
    product = a.product(b)
    corners = [x * y for x in (a.min, a.max) for y in (b.min, b.max)]
    assert product.contains(corners)
    assert product.contains(np.outer(_values(a), _values(b)))
    assert product.step == _product_step(a, b)
    assert product.bits == a.bits + b.bits
    assert product.signed == (a.signed or b.signed)
    assert a.product(b) == b.product(a)


def test_unsigned_times_full_range_signed_is_narrow():
    """min = (2**i - step_a) * -2**j > -2**(i + j): the product never reaches -2**(i + j)."""
    a, b = FixedPoint(4, 1, False), FixedPoint(4, 0, True)
    product = a.product(b)
    assert product == FixedPoint(8, 1, True, narrow=True)
    assert a.max * b.min == -(2.0 - a.step) > -2.0
    assert a.max * b.min >= product.min == -(2.0 - product.step)


@pytest.mark.parametrize(("count", "growth"), [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (9, 4)])
@pytest.mark.parametrize("narrow", [False, True], ids=["full", "narrow"])
def test_sum_of_grows_by_ceil_log2(count, growth, narrow):
    fp = FixedPoint(8, 1, True, narrow)
    total = fp.sum_of(count)
    assert total == FixedPoint(8 + growth, 1 + growth, True, narrow)
    assert total.contains([count * fp.min, count * fp.max])
    if not narrow and count == 2**growth:
        assert count * fp.min == total.min  # reached: the sum type cannot be narrow


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize(
    "fp", [FixedPoint(3, 1, True, True), FixedPoint(2, 0, True, True)], ids=str
)
def test_sum_of_narrow_values_stays_narrow(fp, count):
    total = fp.sum_of(count)
    assert total.narrow
    sums = _sums(_values(fp), fp.step, count)
    assert total.contains(sums)


def test_widen_keeps_narrow():
    fp = FixedPoint(6, 1, True, narrow=True)
    assert fp.widen(2, 1) == FixedPoint(8, 2, True, narrow=True)
    assert fp.widen(2, 1).includes(fp)
    assert FixedPoint(6, 1, True).widen(1, 1) == FixedPoint(7, 2, True)
    # A narrow value plus a full-range value of the same widths fits widen(1, 1) narrow.
    sums = np.add.outer(_values(fp), _values(FixedPoint(6, 1, True))).ravel()
    assert fp.widen(1, 1).contains(sums)
    assert sums.min() == fp.widen(1, 1).min


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        pytest.param(
            FixedPoint(4, 1, False), FixedPoint(6, 0, True), FixedPoint(7, 1, True), id="mixed"
        ),
        pytest.param(
            FixedPoint(4, 1, True, True),
            FixedPoint(6, 1, True, True),
            FixedPoint(6, 1, True, True),
            id="narrow-same-integer",
        ),
        pytest.param(
            FixedPoint(4, 1, True, True),
            FixedPoint(6, 0, True, True),
            FixedPoint(7, 1, True),
            id="narrow-other-integer",
        ),
        pytest.param(
            FixedPoint(4, 1, True, True), FixedPoint(6, 1, True), FixedPoint(6, 1, True), id="half"
        ),
        pytest.param(
            FixedPoint(4, 1, True, True),
            FixedPoint(4, 1, False),
            FixedPoint(5, 1, True),
            id="narrow-unsigned",
        ),
    ],
)
def test_union_holds_both_types(a, b, expected):
    union = a.union(b)
    assert union == expected == b.union(a)
    assert union.includes(a) and union.includes(b)


def test_union_of_different_types_does_not_include_each():
    a, b = FixedPoint(4, 1, False), FixedPoint(6, 0, True)
    assert not a.includes(b) and not b.includes(a)


@pytest.mark.parametrize(
    ("low", "high", "step", "expected"),
    [
        (-1.0, 1.0, 1.0, FixedPoint(2, 1, True, narrow=True)),
        (0.0, 1.0, 1.0, FixedPoint(1, 1, False)),
        (0.0, 0.0, 0.25, FixedPoint(1, -1, False)),
        (-8.0, 7.5, 0.5, FixedPoint(5, 3, True)),
        (-7.5, 7.5, 0.5, FixedPoint(5, 3, True, narrow=True)),
        (-7.5, 0.0, 0.5, FixedPoint(5, 3, True, narrow=True)),
        (-8.0, 8.0, 0.5, FixedPoint(6, 4, True, narrow=True)),
        (0.3, 5.1, 0.125, FixedPoint(6, 3, False)),
        (-0.2, 0.2, 1 / 64, FixedPoint(5, -2, True, narrow=True)),
        # Off the grid between -2**integer and the narrow min: only the full range holds it.
        (-7.75, 1.0, 0.5, FixedPoint(5, 3, True)),
        (-1.0, 0.0, 1.0, FixedPoint(1, 0, True)),
    ],
)
def test_narrowest_holding(low, high, step, expected):
    fp = FixedPoint.narrowest_holding(low, high, step)
    assert fp == expected
    assert fp.step == step and fp.holds(low, high)
    if fp.bits > 1:
        assert not FixedPoint(fp.bits - 1, fp.integer - 1, fp.signed).holds(low, high)
    if fp.signed:
        # Narrow exactly when the narrow type still holds low: tight on the negative side.
        assert fp.narrow == dataclasses.replace(fp, narrow=True).holds(low, high)
        if fp.contains(low):
            assert fp.narrow == (low > -(2.0**fp.integer))


def test_narrowest_holding_refuses_bad_steps():
    with pytest.raises(ValueError, match="power-of-two"):
        FixedPoint.narrowest_holding(0.0, 1.0, 0.3)
    with pytest.raises(ValueError, match="low <= high"):
        FixedPoint.narrowest_holding(1.0, 0.0, 1.0)


def test_checks_accept_numpy_scalars_and_refuse_non_finite_values():
    fp = FixedPoint(4, 0, True)
    assert fp.holds(np.float32(-1.0), np.float32(0.875))
    assert not fp.holds(-1.0, np.inf)
    assert not fp.contains([0.5, np.nan])
    assert not fp.contains(0.0625)  # off the grid
    assert fp.contains(np.float32(-0.125))


def test_wide_type_bounds_stay_exact_tests():
    fp = FixedPoint(70, 0, False)
    assert fp.max < 1.0 and fp.holds(0.0, fp.max)
    assert not fp.holds(0.0, 1.0)
    assert fp.includes(FixedPoint(60, 0, False))

    narrow = FixedPoint(70, 0, True, narrow=True)
    assert narrow.min == -narrow.max > -1.0
    assert narrow.holds(narrow.min, narrow.max)
    assert not narrow.holds(-1.0, 0.0) and not narrow.contains(-1.0)
    assert FixedPoint(70, 0, True).contains(-1.0)
    assert narrow.includes(FixedPoint(60, 0, True, narrow=True))
    assert not narrow.includes(FixedPoint(60, 0, True))


@pytest.mark.parametrize("signed", [True, False])
def test_narrow_contains_holds_and_includes(signed):
    full = FixedPoint(4, 1, signed)
    narrow = FixedPoint(4, 1, signed, narrow=True)
    if not signed:
        assert narrow == full and not narrow.narrow
        return
    assert (full.min, full.max) == (-2.0, 1.75)
    assert (narrow.min, narrow.max) == (-1.75, 1.75)
    assert full.contains(-2.0) and not narrow.contains(-2.0)
    assert narrow.contains([-1.75, 0.0, 1.75])
    assert full.holds(-2.0, 1.0) and not narrow.holds(-2.0, 1.0)
    assert not narrow.holds(-1.9, 1.0)  # the interval, not the grid
    assert narrow.holds(-1.75, 1.75)
    assert full.includes(narrow) and not narrow.includes(full)
    assert narrow.includes(narrow) and full.includes(full)
    # A narrow type with an extra integer bit holds the full-range one.
    assert FixedPoint(5, 2, True, narrow=True).includes(full)
    assert np.array_equal(narrow.quantize([-5.0, -1.9, 5.0]), [-1.75, -1.75, 1.75])
    assert np.array_equal(full.quantize([-5.0, -1.9, 5.0]), [-2.0, -2.0, 1.75])


def test_constructor_validates():
    assert FixedPoint(np.int64(4), np.int32(1), True) == FixedPoint(4, 1, True)
    assert FixedPoint(4, 1, True).narrow is False
    assert FixedPoint(4, 1, True, True) == FixedPoint(4, 1, True, narrow=True)
    assert FixedPoint(4, 1, True, narrow=True) != FixedPoint(4, 1, True)
    assert FixedPoint(4, 1, False, narrow=True) == FixedPoint(4, 1, False)  # normalized
    assert FixedPoint(4, 1, False, narrow=True).narrow is False
    with pytest.raises(ValueError, match="narrow must be a bool"):
        FixedPoint(4, 0, True, narrow=1.5)
    with pytest.raises(ValueError, match="at least 1 bit"):
        FixedPoint(0, 0, True)
    with pytest.raises(ValueError, match="signed must be a bool"):
        FixedPoint(4, 0, "yes")
    with pytest.raises(ValueError, match="integer"):
        FixedPoint(4, 0.5, True)


# ------------------------------------------------------------------ parsing


def test_parse_reads_literals_exactly():
    """QKeras's own parser turns alpha=None into 'on'; this one reads None."""
    assert quantizers.get_quantizer("quantized_bits(4,0,1,alpha=None)").alpha == "on"
    quantizer = parse_quantizer("quantized_bits(4, 0, 1, alpha=None, keep_negative=True)")
    assert quantizer.alpha is None and quantizer.keep_negative is True
    assert isinstance(parse_quantizer("binary"), quantizers.binary)
    assert as_quantizer(quantizer) is quantizer


HLS_INPUT_TYPES = [
    FixedPoint(8, 3, True),
    FixedPoint(16, 5, True),
    FixedPoint(2, 0, True),
    FixedPoint(4, 6, True),
    FixedPoint(8, 4, False),
    FixedPoint(6, 0, False),
    FixedPoint(1, 0, False),
]


@pytest.mark.parametrize("fp", HLS_INPUT_TYPES, ids=str)
@pytest.mark.parametrize(
    "spelling", [FixedPoint.hls, FixedPoint.hls4ml_precision], ids=["ap_fixed", "hls4ml"]
)
def test_parse_reads_hls_types_as_quantized_bits_on_the_same_grid(fp, spelling):
    quantizer = parse_quantizer(spelling(fp))
    assert type(quantizer) is quantizers.quantized_bits
    assert FixedPoint.from_quantizer(quantizer) == fp
    assert FixedPoint.from_quantizer(spelling(fp)) == fp
    values = _grid_inputs(fp)
    np.testing.assert_array_equal(_apply(quantizer, values), fp.quantize(values))


def test_hls_type_integer_bits_count_the_sign():
    signed = FixedPoint.from_quantizer("ap_fixed<8,4>")
    assert (signed.min, signed.max, signed.step, signed.narrow) == (-8.0, 8 - 1 / 16, 1 / 16, False)
    unsigned = FixedPoint.from_quantizer(" ufixed< 8 , 4 > ")
    assert (unsigned.min, unsigned.max, unsigned.step) == (0.0, 16 - 1 / 16, 1 / 16)
    assert parse_quantizer("fixed<8,4>").get_config() == (
        quantizers.quantized_bits(8, 3, 0, 1, alpha=1).get_config()
    )


# ------------------------------------------------------------------ refusals


REFUSED = [
    pytest.param(None, "None", id="none"),
    pytest.param("relu", "relu", id="keras-activation"),
    pytest.param("linear", "linear", id="linear"),
    pytest.param(keras.activations.relu, "function", id="callable"),
    pytest.param("bernoulli()", "bernoulli", id="bernoulli"),
    pytest.param("quantized_ulaw(8,0)", "quantized_ulaw", id="ulaw"),
    pytest.param("frobnicate(3)", "frobnicate", id="unknown"),
    pytest.param("quantized_bits(4,0,1", "quantized_bits(4,0,1", id="syntax"),
    pytest.param("quantized_bits(4,0,1,alpha=auto_po2)", "auto_po2", id="unquoted-string"),
    pytest.param("__import__('os').getcwd()", "__import__", id="code"),
    pytest.param("quantized_bits(4,0,1,alpha=0.5)", "alpha", id="bits-alpha"),
    pytest.param("quantized_bits(4,0,qnoise_factor=0.5)", "qnoise_factor", id="qnoise"),
    pytest.param("quantized_bits(4,0.5)", "integer", id="fractional-integer"),
    pytest.param("quantized_bits(4,0,1,bogus=1)", "bogus", id="bad-keyword"),
    pytest.param("quantized_bits(4,0,2)", "symmetric", id="symmetric-2"),
    pytest.param("quantized_bits(4,0,-1)", "symmetric", id="symmetric-negative"),
    pytest.param("quantized_bits(4,0,'yes')", "symmetric", id="symmetric-string"),
    pytest.param("quantized_relu(4,0,1)", "use_sigmoid", id="relu-sigmoid"),
    pytest.param("quantized_relu(4,0,negative_slope=0.3)", "negative_slope", id="leaky-relu"),
    pytest.param(
        quantizers.quantized_relu(4, 0, negative_slope=0.5, use_sigmoid=1),
        "use_sigmoid",
        id="leaky-relu-sigmoid",
    ),
    pytest.param("quantized_relu(1,0,negative_slope=0.5)", "2 bits", id="leaky-relu-1-bit"),
    pytest.param("quantized_hswish(4,2,relu_shift=0)", "relu_shift", id="hswish-no-shift"),
    pytest.param(
        "quantized_relu(4,1,relu_upper_bound=0.3,is_quantized_clip=False)",
        "relu_upper_bound",
        id="relu-off-grid-bound",
    ),
    pytest.param("quantized_relu_po2(4,negative_slope=0.5)", "negative_slope", id="leaky-po2"),
    pytest.param("binary(alpha=0.5)", "alpha", id="binary-alpha"),
    pytest.param("ternary(alpha=2)", "alpha", id="ternary-alpha"),
    pytest.param("quantized_bits(4,0,1,alpha='auto_po2')", "allow_scale", id="auto_po2"),
    pytest.param({"class_name": "Dense", "config": {}}, "Dense", id="dict-unknown"),
    pytest.param("ap_fixed<8,0>", "I >= 1", id="ap_fixed-sign-only"),
    pytest.param("fixed<1,1>", "W >= 2", id="fixed-one-bit"),
    pytest.param("ap_ufixed<4,-1>", "I >= 0", id="ap_ufixed-negative-integer"),
    pytest.param("ap_fixed<0,0>", "W >= 2", id="ap_fixed-no-bits"),
    pytest.param("ap_fixed<8,4,AP_RND,AP_SAT>", "'ap_fixed<8,4>'", id="ap_fixed-modes"),
]


@pytest.mark.parametrize(("spec", "mentions"), REFUSED)
def test_refused_quantizers_name_the_layer_and_quantizer(spec, mentions):
    with pytest.raises(QuantizerError) as info:
        FixedPoint.from_quantizer(spec, layer="conv1")
    message = str(info.value)
    assert "layer='conv1'" in message
    assert mentions in message
    assert "Received:" in message and "Supported:" in message
    # The constraint comes first, then what was received.
    assert message.index("Received:") > 0


def test_refused_quantizer_objects_are_named_too():
    for quantizer in (quantizers.bernoulli(), quantizers.quantized_ulaw(8, 0)):
        with pytest.raises(QuantizerError, match=type(quantizer).__name__):
            FixedPoint.from_quantizer(quantizer, layer="act")


def test_quantizer_error_is_a_value_error():
    assert issubclass(QuantizerError, ValueError)


@pytest.mark.parametrize(
    ("fp", "name"),
    [
        (FixedPoint(8, 7, True), "INT8"),
        (FixedPoint(8, 8, False), "UINT8"),
        (FixedPoint(8, 3, True), "FIXED<8,4>"),
        (FixedPoint(4, 1, False), "FIXED<5,2>"),
        (FixedPoint(4, 5, True), "INT6"),
    ],
    ids=str,
)
def test_value_datatype_holds_the_values(fp, name):
    from qonnx.core.datatype import DataType

    assert fp.value_datatype() == name
    datatype = DataType[name]
    for value in (fp.min, fp.max, fp.step, 0.0):
        assert datatype.allowed(value), value
