from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx

import bnfold
import builders
from bnfold.errors import (
    InputQuantizerWarning,
    QuantizerError,
    UnsupportedLayerError,
    VerificationError,
)
from bnfold.export import pipeline
from bnfold.export.verify import qonnx_outputs, sample_inputs, verify
from bnfold.fixedpoint import FixedPoint
from bnfold.keras import keras, qkeras, quantizers

MAC_KEYS = ("layer", "kernel_quantizer", "bias_quantizer", "accumulator", "accumulator_hls")


def _metadata(node):
    return {entry.key.removeprefix("bnfold."): entry.value for entry in node.metadata_props}


def _sources(model):
    return [builders.INPUT_QUANTIZER] * len(model.inputs)


@pytest.fixture(scope="session")
def exported():
    """Each test model, populated, with its export (built and exported once)."""
    result = {}
    for name, build in builders.EXPORT_BUILDERS.items():
        model = build()
        onnx_model = bnfold.export_onnx(model, source_quantizers=_sources(model))
        bnfold.populate_bias_quantizer_from_accumulator(model, _sources(model))
        result[name] = (model, onnx_model)
    return result


NAMES = sorted(builders.EXPORT_BUILDERS)


@pytest.mark.parametrize("name", NAMES)
def test_qonnx_execution_equals_qkeras_bit_for_bit(exported, name):
    model, onnx_model = exported[name]
    types = [FixedPoint.from_quantizer(builders.INPUT_QUANTIZER)] * len(model.inputs)
    inputs = sample_inputs(model, types, count=6, seed=123)
    expected = model.predict(inputs, verbose=0)
    expected = expected if isinstance(expected, list) else [expected]
    for result, reference in zip(qonnx_outputs(onnx_model, inputs), expected, strict=True):
        np.testing.assert_array_equal(result, reference)


@pytest.mark.parametrize("name", NAMES)
def test_all_samples_at_once_equal_qonnx_sample_by_sample(exported, name):
    """qonnx_outputs runs a copy batched to the sample count; plain execute_onnx runs the file."""
    model, onnx_model = exported[name]
    types = [FixedPoint.from_quantizer(builders.INPUT_QUANTIZER)] * len(model.inputs)
    inputs = sample_inputs(model, types, count=3, seed=7)
    wrapper = ModelWrapper(onnx_model)
    names = [tensor.name for tensor in onnx_model.graph.input]
    runs = [
        execute_onnx(
            wrapper, {n: values[s : s + 1] for n, values in zip(names, inputs, strict=True)}
        )
        for s in range(3)
    ]
    for output, result in zip(
        onnx_model.graph.output, qonnx_outputs(onnx_model, inputs), strict=True
    ):
        np.testing.assert_array_equal(result, np.concatenate([run[output.name] for run in runs]))


@pytest.mark.parametrize("name", NAMES)
def test_model_passes_full_check_and_uses_standard_forms(exported, name):
    _, onnx_model = exported[name]
    onnx.checker.check_model(onnx_model, full_check=True)
    domains = {opset.domain: opset.version for opset in onnx_model.opset_import}
    assert domains["qonnx.custom_op.general"] == 1
    ops = {node.op_type for node in onnx_model.graph.node}
    assert "Gemm" not in ops and "Mul" not in ops
    for node in onnx_model.graph.node:
        attributes = {a.name for a in node.attribute}
        if node.op_type == "Conv":
            assert {"pads", "dilations", "strides"} <= attributes and "auto_pad" not in attributes
        if node.op_type == "Quant":
            assert node.domain == "qonnx.custom_op.general"
            assert {"signed", "narrow", "rounding_mode"} <= attributes
    for tensor in onnx_model.graph.input:
        assert tensor.type.tensor_type.shape.dim[0].dim_value == 1
    unfixed = ModelWrapper(onnx_model, fix_missing_initializer_valueinfo=False)
    assert unfixed.check_all_tensor_shapes_specified()


@pytest.mark.parametrize("name", NAMES)
def test_every_node_names_its_layer_and_mac_nodes_their_types(exported, name):
    model, onnx_model = exported[name]
    macs = bnfold.accumulator.mac_types(bnfold.unfold_model(model), _sources(model))
    mac_nodes = set()
    for node in onnx_model.graph.node:
        metadata = _metadata(node)
        assert "layer" in metadata, node.name
        if node.op_type in ("Conv", "MatMul"):
            assert set(MAC_KEYS) <= set(metadata), node.name
            accumulator = macs[metadata["layer"]].types.accumulator
            assert metadata["accumulator"] == accumulator.quantizer_string()
            assert metadata["accumulator_hls"] == accumulator.hls()
            mac_nodes.add(metadata["layer"])
        if node.op_type == "Quant":
            assert metadata["role"] in ("input", "kernel", "bias", "activation")
    assert mac_nodes == set(macs)


@pytest.mark.parametrize("name", NAMES)
def test_weight_quant_nodes_reproduce_qkeras_weights(exported, name):
    model, onnx_model = exported[name]
    macs = bnfold.accumulator.mac_types(bnfold.unfold_model(model), _sources(model))
    initializers = {t.name: numpy_helper.to_array(t) for t in onnx_model.graph.initializer}
    seen = set()
    for node in onnx_model.graph.node:
        metadata = _metadata(node)
        if node.op_type != "Quant" or metadata["role"] not in ("kernel", "bias"):
            continue
        weights = macs[metadata["layer"]].weights
        values, scale, zero, bits = (initializers[name] for name in node.input)
        expected = weights.kernel if metadata["role"] == "kernel" else weights.bias
        fixed = weights.kernel_grid if metadata["role"] == "kernel" else weights.bias_type
        assert sorted(values.ravel()) == sorted(expected.ravel())
        assert bits == fixed.bits and zero == 0
        attributes = {a.name: a.i for a in node.attribute if a.name in ("signed", "narrow")}
        assert attributes == {"signed": fixed.signed, "narrow": fixed.narrow}
        channel_scales = (
            1
            if weights.kernel_scale is None or metadata["role"] == "bias"
            else np.unique(weights.kernel_scale)
        )
        assert set(np.unique(scale / fixed.step)) == set(np.atleast_1d(channel_scales))
        seen.add((metadata["layer"], metadata["role"]))
    assert {layer for layer, role in seen if role == "kernel"} == set(macs)


def test_per_channel_po2_scales_become_a_channel_scale_tensor(exported):
    _, onnx_model = exported["sequential_conv"]
    initializers = {t.name: numpy_helper.to_array(t) for t in onnx_model.graph.initializer}
    quant = next(
        node
        for node in onnx_model.graph.node
        if _metadata(node).get("layer") == "dw" and _metadata(node)["role"] == "kernel"
    )
    scale = initializers[quant.input[1]]
    assert scale.shape == (12, 1, 1, 1) and len(np.unique(scale)) > 1  # 6 channels x 2


def test_model_metadata_and_input_datatype(exported, tmp_path):
    model, _ = exported["multi_io"]
    path = tmp_path / "multi_io.h5"
    model.save(path)
    onnx_model = bnfold.export_onnx(path, source_quantizers=_sources(model), verify=False)
    metadata = {entry.key: entry.value for entry in onnx_model.metadata_props}
    assert metadata["bnfold.version"] == bnfold.__version__
    assert metadata["bnfold.source"].startswith("multi_io.h5 sha256:")
    layers = {row["layer"]: row for row in json.loads(metadata["bnfold.layers"])}
    assert layers["shared_dense"]["class"] == "QDenseBatchnorm"
    assert layers["conv_a"]["activation"] == "quantized_relu(6,3)"
    annotations = {
        a.tensor_name: {e.key: e.value for e in a.quant_parameter_tensor_names}
        for a in onnx_model.graph.quantization_annotation
    }
    assert annotations == {
        "image": {"finn_datatype": "FIXED<8,4>", "tensor_layout": "['N', 'H', 'W', 'C']"},
        "side": {"finn_datatype": "FIXED<8,4>", "tensor_layout": "['N', 'C']"},
        "out_a": {"tensor_layout": "['N', 'C']"},
        "head": {"tensor_layout": "['N', 'C']"},
    }
    assert [output.name for output in onnx_model.graph.output] == ["out_a", "head"]


def test_dynamic_batch(exported):
    model, _ = exported["sequential_conv"]
    onnx_model = bnfold.export_onnx(model, source_quantizers=_sources(model), batch_size=None)
    dimension = onnx_model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dimension.dim_value == 0 and dimension.dim_param


def test_static_batch_other_than_one_is_verified(exported):
    """The zoo's Reshape layer spells the batch out in its ONNX target shape."""
    model, _ = exported["zoo"]
    onnx_model = bnfold.export_onnx(model, source_quantizers=_sources(model), batch_size=4)
    assert onnx_model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4
    metadata = {entry.key: entry.value for entry in onnx_model.metadata_props}
    assert json.loads(metadata["bnfold.verification"])["max_difference"] == 0.0


def test_model_passed_in_is_not_changed(exported):
    model = builders.unpopulated()
    bnfold.export_onnx(model, verify=False)
    assert model.get_layer("conv").bias_quantizer_internal is None


def test_unsupported_layer_names_layer_class_and_what_is_supported():
    inputs = keras.Input((4, 4, 2))
    x = keras.layers.LayerNormalization(name="norm")(inputs)
    with pytest.raises(
        UnsupportedLayerError, match=r"'norm'.*LayerNormalization.*Supported: .*QConv2D"
    ):
        bnfold.export_onnx(keras.Model(inputs, x), verify=False)


@pytest.mark.parametrize(
    "quantizer",
    [
        quantizers.quantized_bits(4, 0, 1, alpha=1, qnoise_factor=0.5),
        "quantized_ulaw(8,0)",
        "binary(use_01=True)",
        "quantized_bits(4,0,1,alpha=0.5)",
    ],
    ids=["qnoise", "ulaw", "binary01", "alpha"],
)
def test_unsupported_activation_quantizer_is_refused(quantizer):
    inputs = keras.Input((6,))
    x = qkeras.QDense(3, kernel_quantizer="quantized_bits(4,0,1)", name="d")(inputs)
    x = qkeras.QActivation(quantizer, name="act")(x)
    with pytest.raises(QuantizerError, match=r"'act'"):
        bnfold.export_onnx(keras.Model(inputs, x), verify=False)


def test_without_per_channel_scales_each_kernel_has_one_scale(exported):
    model, _ = exported["sequential_conv"]
    onnx_model = bnfold.export_onnx(
        model, source_quantizers=_sources(model), per_channel_scales=False
    )
    initializers = {t.name: numpy_helper.to_array(t) for t in onnx_model.graph.initializer}
    quants = [node for node in onnx_model.graph.node if node.op_type == "Quant"]
    assert all(initializers[node.input[1]].size == 1 for node in quants)
    dw = next(
        n for n in quants if _metadata(n)["layer"] == "dw" and _metadata(n)["role"] == "kernel"
    )
    assert initializers[dw.input[3]] > 4  # the 4-bit grid widened by the spread of the scales


def _input_model(first_quantizer):
    inputs = keras.Input((6,), name="features")
    x = qkeras.QActivation(first_quantizer, name="in_q")(inputs) if first_quantizer else inputs
    x = qkeras.QDense(3, kernel_quantizer="quantized_bits(4,0,1,alpha=1)", name="fc")(x)
    return keras.Model(inputs, x)


def _input_quant(exported):
    (node,) = [
        n
        for n in exported.graph.node
        if _metadata(n).get("role") == "input" and n.op_type == "Quant"
    ]
    return _metadata(node)["quantizer"]


def test_a_qactivation_right_after_the_input_gives_its_type_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputQuantizerWarning)
        exported = bnfold.export_onnx(_input_model("quantized_bits(6,2,1,alpha=1)"))
    assert _input_quant(exported) == "quantized_bits(6,2,1,alpha=1)"


def test_an_input_without_a_quantizer_is_named_in_a_warning_with_the_default():
    with pytest.warns(InputQuantizerWarning, match=r"'features'.*quantized_bits\(8,0,1\)"):
        exported = bnfold.export_onnx(_input_model(None))
    assert _input_quant(exported) == "quantized_bits(8,0,1)"


def test_the_input_warning_on_the_command_line(tmp_path, capsys):
    from bnfold.export.__main__ import main

    path = tmp_path / "m.h5"
    _input_model(None).save(path)
    assert main([str(path), "-o", str(tmp_path / "m.onnx")]) == 0
    err = capsys.readouterr().err
    assert "warning: A model input needs a quantizer" in err and "'features'" in err


# ------------------------------------------ input Quant nodes against the source quantizers


@pytest.fixture(scope="module")
def feature_map_export():
    """``builders.feature_map`` and its export: the model of the reported 1/32 difference."""
    model = builders.feature_map()
    return model, bnfold.export_onnx(model, source_quantizers=builders.INPUT_QUANTIZER)


def test_qonnx_equals_qkeras_on_inputs_after_the_source_quantizer(feature_map_export):
    """The reported difference: -8 is outside the symmetric quantized_bits(8,3,1) (min -127/16).

    The QKeras model has no input quantizer and computes with -8; the exported
    graph's input Quant clips it to -7.9375, as QKeras's own quantizer does.
    """
    model, onnx_model = feature_map_export
    inputs = builders.grid_inputs(model, batch=4)
    assert np.count_nonzero(inputs[0] == -8) > 0
    quantizer = quantizers.get_quantizer(builders.INPUT_QUANTIZER)
    quantized = np.asarray(quantizer(inputs[0]))
    assert quantized.min() == -127 / 16

    result = qonnx_outputs(onnx_model, inputs)[0]
    np.testing.assert_array_equal(result, np.asarray(model(quantized, training=False)))
    raw = np.asarray(model(inputs[0], training=False))
    assert result[2, 2, 5, 4] == 0.625 and raw[2, 2, 5, 4] == 0.5


def _with_input_quant(onnx_model, attribute, value):
    changed = onnx.ModelProto()
    changed.CopyFrom(onnx_model)
    graph_input = changed.graph.input[0].name
    node = next(n for n in changed.graph.node if n.op_type == "Quant" and n.input[0] == graph_input)
    next(a for a in node.attribute if a.name == attribute).CopyFrom(
        onnx.helper.make_attribute(attribute, value)
    )
    return changed


@pytest.mark.parametrize(
    ("attribute", "value"),
    [("narrow", 0), ("rounding_mode", "FLOOR")],
    ids=["keeps_the_most_negative_code", "rounds_down"],
)
def test_verification_catches_an_input_quant_unlike_the_source_quantizer(
    feature_map_export, attribute, value
):
    """Grid samples cannot: an input Quant that clips or rounds otherwise passes them unchanged."""
    model, onnx_model = feature_map_export
    wrong = _with_input_quant(onnx_model, attribute, value)
    types = [FixedPoint.from_quantizer(builders.INPUT_QUANTIZER)]
    source = [quantizers.get_quantizer(builders.INPUT_QUANTIZER)]
    on_grid = sample_inputs(model, types, 8)
    assert verify(model, wrong, on_grid, source_quantizers=source).max_difference == 0.0

    samples = sample_inputs(
        model,
        types,
        pipeline.VERIFY_SAMPLES - pipeline.VERIFY_OFF_GRID,
        off_grid=pipeline.VERIFY_OFF_GRID,
    )
    with pytest.raises(VerificationError, match="off the source quantizers' grids"):
        verify(model, wrong, samples, source_quantizers=source)
    assert verify(model, onnx_model, samples, source_quantizers=source).max_difference == 0.0
