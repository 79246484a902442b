"""Every QKeras quantizer on kernels, biases and activations: exported, and bit-exact."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

import bnfold
import builders
from bnfold.errors import QuantizerError
from bnfold.export.verify import ONE_SESSION, sample_inputs
from bnfold.fixedpoint import FixedPoint
from bnfold.hls4ml import prepare_for_hls4ml
from bnfold.keras import quantizers
from bnfold.quantizer_table import QUANTIZERS
from hls4ml_runs import compiled_hls4ml, hls4ml_model

SOURCE = builders.QUANTIZER_SOURCE
CASES = builders.QUANTIZER_CASES


@pytest.fixture(scope="session")
def exported():
    """Each case's model and its export, built once."""
    result = {}
    for name, (kernel, activation, kind) in CASES.items():
        model = builders.quantizer_model(kernel, activation, kind)
        result[name] = (model, bnfold.export_onnx(model, source_quantizers=[SOURCE]))
    return result


@pytest.mark.parametrize("name", sorted(CASES))
def test_qonnx_execution_equals_qkeras_bit_for_bit(exported, name):
    builders.assert_qonnx_equals_qkeras(*exported[name], SOURCE, count=256, seed=11)


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
    """Each form, and verification of it in one onnxruntime session (its Quant as standard ops)."""
    _, onnx_model = exported[name]
    (node,) = _quant_nodes(onnx_model, "activation")
    assert node.op_type == op
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attributes.get("rounding_mode", b"").decode() == (rounding or "")
    metadata = {entry.key: entry.value for entry in onnx_model.metadata_props}
    assert json.loads(metadata["bnfold.verification"])["executor"] == ONE_SESSION


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
    model = builders.quantizer_model(kernel, activation, "dense")
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
