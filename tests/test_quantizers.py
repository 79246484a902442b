"""Every QKeras quantizer on kernels, biases and activations: exported, and bit-exact."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import qkeras
from onnx import helper

import bnfold
from bnfold.errors import QuantizerError
from bnfold.export.verify import qonnx_outputs, sample_inputs
from bnfold.fixedpoint import FixedPoint
from bnfold.hls4ml import prepare_for_hls4ml
from bnfold.keras import keras, quantizers
from bnfold.quantizer_table import QUANTIZERS
from hls4ml_runs import compiled_hls4ml, hls4ml_model

SOURCE = "quantized_bits(8,3,0,1,alpha=1)"
BIAS = "quantized_bits(8,3,1,alpha=1)"
PO2_ALPHA = np.array([0.5, 1.0, 2.0, 0.25], dtype=np.float32)

# id: (kernel quantizer of the first layer, its activation quantizer or None, layer kind)
CASES = {
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
    "bits-alpha-array-kernel": (quantizers.quantized_bits(4, 0, 1, alpha=PO2_ALPHA), None, "conv"),
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


def build(kernel, activation, kind: str, seed: int = 0) -> keras.Model:
    """A MAC layer with ``kernel`` (or 4-bit weights), ``activation``, then a QDense."""
    kernel = kernel or "quantized_bits(4,0,1,alpha=1)"
    if kind == "conv":
        inputs = keras.Input((5, 5, 3))
        x = qkeras.QConv2D(4, 3, kernel_quantizer=kernel, bias_quantizer=BIAS, name="first")(inputs)
        x = keras.layers.Flatten(name="flat")(x)
    else:
        inputs = keras.Input((8,))
        x = qkeras.QDense(6, kernel_quantizer=kernel, bias_quantizer=BIAS, name="first")(inputs)
    if activation is not None:
        x = qkeras.QActivation(activation, name="act")(x)
    x = qkeras.QDense(
        3, kernel_quantizer="quantized_bits(6,0,1,alpha=1)", bias_quantizer=BIAS, name="last"
    )(x)
    model = keras.Model(inputs, x)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if weights:
            layer.set_weights([rng.normal(0.0, 1.0, w.shape).astype(np.float32) for w in weights])
    return model


@pytest.fixture(scope="session")
def exported():
    """Each case's model and its export, built once."""
    result = {}
    for name, (kernel, activation, kind) in CASES.items():
        model = build(kernel, activation, kind)
        result[name] = (model, bnfold.export_onnx(model, source_quantizers=[SOURCE]))
    return result


@pytest.mark.parametrize("name", sorted(CASES))
def test_qonnx_execution_equals_qkeras_bit_for_bit(exported, name):
    model, onnx_model = exported[name]
    onnx.checker.check_model(onnx_model, full_check=True)
    inputs = sample_inputs(model, [FixedPoint.from_quantizer(SOURCE)], count=256, seed=11)
    expected = model.predict(inputs, verbose=0)
    np.testing.assert_array_equal(qonnx_outputs(onnx_model, inputs)[0], expected)


def _quant_nodes(onnx_model, role):
    return [
        node
        for node in onnx_model.graph.node
        if node.domain == "qonnx.custom_op.general"
        and any(e.key == "bnfold.role" and e.value == role for e in node.metadata_props)
        and any(
            e.key == "bnfold.layer" and e.value in ("first", "act") for e in node.metadata_props
        )
    ]


@pytest.mark.parametrize(
    ("name", "op", "rounding"),
    [
        ("binary", "BipolarQuant", None),
        ("stochastic_binary", "BipolarQuant", None),
        ("ternary", "Quant", "HALF_UP"),
        ("tanh", "Quant", "ROUND"),
        ("po2", "Quant", "ROUND"),
    ],
)
def test_activation_quantizer_forms(exported, name, op, rounding):
    _, onnx_model = exported[name]
    (node,) = _quant_nodes(onnx_model, "activation")
    assert node.op_type == op
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attributes.get("rounding_mode", b"").decode() == (rounding or "")


@pytest.mark.parametrize("name", ["po2-kernel", "po2-max1-kernel", "relu_po2-kernel"])
def test_po2_kernels_keep_exact_values_and_name_quantizer_and_accumulator(exported, name):
    model, onnx_model = exported[name]
    layer = model.get_layer("first")
    (quant,) = _quant_nodes(onnx_model, "kernel")
    metadata = {e.key: e.value for e in quant.metadata_props}
    assert metadata["bnfold.quantizer"] == str(layer.kernel_quantizer_internal)
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in onnx_model.graph.initializer}
    kernel = initializers[quant.input[0]]
    expected = layer.kernel_quantizer_internal(layer.kernel).numpy()
    assert sorted(kernel.reshape(-1).tolist()) == sorted(expected.reshape(-1).tolist())
    magnitudes = np.abs(kernel[kernel != 0])
    assert np.all(np.log2(magnitudes) == np.round(np.log2(magnitudes)))
    accumulators = bnfold.accumulator_types(model, [SOURCE])
    mac = next(
        n
        for n in onnx_model.graph.node
        if n.op_type in ("MatMul", "Conv") and quant.output[0] in n.input
    )
    mac_metadata = {e.key: e.value for e in mac.metadata_props}
    assert mac_metadata["bnfold.accumulator"] == accumulators["first"].quantizer_string()


def test_every_qkeras_quantizer_class_has_one_entry():
    classes = {
        name
        for name, value in vars(quantizers).items()
        if isinstance(value, type)
        and issubclass(value, quantizers.BaseQuantizer)
        and value is not quantizers.BaseQuantizer
    }
    assert classes == set(QUANTIZERS)
    for kind in QUANTIZERS.values():
        assert (kind.type_rule is None) == (kind.activation is None) == (kind.refused is not None)


@pytest.mark.parametrize(
    ("kernel", "activation", "mentions"),
    [
        ("bernoulli()", None, r"bernoulli has no fixed-point type \(it samples.*'first'"),
        (None, "bernoulli()", r"bernoulli has no fixed-point type.*'act'"),
        (None, "quantized_ulaw(8,0)", r"quantized_ulaw has no fixed-point type.*'act'"),
        (None, "quantized_relu(4,1,use_sigmoid=1)", r"use_sigmoid=0.*'act'"),
        (None, "quantized_relu(4,1,negative_slope=2)", r"power of two up to 1.*'act'"),
        (None, "binary(use_01=True)", r"BipolarQuant.*use_01.*'act'"),
        (None, "ternary(alpha=2)", r"ternary with alpha=2 multiplies.*only on kernels.*'act'"),
        ("quantized_bits(4,0,1,alpha=0.3)", None, r"power of two.*'first'.*alpha=0.3"),
    ],
)
def test_quantizers_qonnx_cannot_express_are_refused_by_name(kernel, activation, mentions):
    model = build(kernel, activation, "dense")
    with pytest.raises(QuantizerError, match=mentions):
        bnfold.export_onnx(model, source_quantizers=[SOURCE], verify=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["binary", "bits-unsigned", "ternary-kernel", "po2-kernel"])
def test_hls4ml_c_simulation_equals_qkeras_bit_for_bit(exported, name, tmp_path):
    model = exported[name][0]
    # hls4ml 1.3.0 reads one scale per weight Quant (ternary() kernels get auto_po2 scales).
    onnx_model = bnfold.export_onnx(model, source_quantizers=[SOURCE], per_channel_scales=False)
    hls_model = compiled_hls4ml(onnx_model, tmp_path)
    inputs = sample_inputs(model, [FixedPoint.from_quantizer(SOURCE)], count=64, seed=3)[0]
    expected = model.predict(inputs, verbose=0)
    predicted = hls_model.predict(np.ascontiguousarray(inputs))
    np.testing.assert_array_equal(np.reshape(predicted, expected.shape), expected)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("ternary", "HALF_UP not supported"),
        ("tanh", "list index out of range"),
    ],
)
def test_hls4ml_cannot_read_these_activation_forms(exported, name, message, tmp_path):
    """What the README's table says hls4ml 1.3.0 does not read, as it fails today."""
    cleaned, config = prepare_for_hls4ml(exported[name][1])
    with pytest.raises(Exception, match=message):
        hls4ml_model(cleaned, config, tmp_path)
