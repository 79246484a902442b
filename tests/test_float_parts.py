"""Quantized models with float parts: output activations, batch normalization, float layers.

Each model is shaped like a published one; the export must succeed, keep the
fixed-point part bit-exact (outputs and the tensors the float tail reads) and
the float outputs within the stated tolerance, and warn about each MAC layer
that gets no accumulator type.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import bnfold
import builders
from bnfold.errors import TypeInferenceError, UnsupportedLayerError, UntypedAccumulatorWarning
from bnfold.export.verify import FLOAT_TOLERANCE
from bnfold.keras import keras, qkeras
from bnfold.mac import quantized_weights

SOURCE = builders.INPUT_QUANTIZER


def _export(model, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exported = bnfold.export_onnx(model, source_quantizers=[SOURCE], **options)
    untyped = [w for w in caught if issubclass(w.category, UntypedAccumulatorWarning)]
    return exported, [str(w.message) for w in untyped]


def _model_metadata(exported, key):
    values = {entry.key: entry.value for entry in exported.metadata_props}
    return json.loads(values[f"bnfold.{key}"]) if f"bnfold.{key}" in values else None


def _node_metadata(exported, layer):
    for node in exported.graph.node:
        entries = {entry.key.removeprefix("bnfold."): entry.value for entry in node.metadata_props}
        if entries.get("layer") == layer and node.op_type in ("Conv", "MatMul"):
            return entries
    raise AssertionError(f"no MAC node for {layer}")


@pytest.fixture(scope="session")
def float_tail_exports():
    """Each float-tail model with its export and UntypedAccumulatorWarning messages."""
    result = {}
    for name, build in builders.FLOAT_TAIL_BUILDERS.items():
        model = build()
        result[name] = (model, *_export(model))
    return result


# The layers each model has float, and which of them are MAC layers without a type.
EXPECTED = {
    "tutorial_cnn": (["softmax"], {"output": "its kernel is not fixed point"}),
    "ds_cnn": (["softmax"], {"classifier": "'pool' averages 125 values"}),
    "global_average_6x6": (["head"], {"head": "'average' averages 36 values"}),
    "jet_softmax_batchnorm": (["softmax"], {}),
    "qbatchnorm_mlp": (["output"], {}),
    "softmax_classifier": (["softmax"], {}),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_export_keeps_fixed_point_exact_and_float_within_tolerance(float_tail_exports, name):
    _, exported, _ = float_tail_exports[name]
    onnx.checker.check_model(exported, full_check=True)
    verification = _model_metadata(exported, "verification")
    _assert_exact_and_within_tolerance(verification)
    assert verification["tolerance"] >= FLOAT_TOLERANCE
    tail = _model_metadata(exported, "float_tail")
    assert tail["outputs"] == EXPECTED[name][0]
    assert tail["boundaries"], "the fixed-point tensors the float tail reads are compared"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_untyped_mac_layer_is_named_in_one_warning_and_marked(float_tail_exports, name):
    _, exported, messages = float_tail_exports[name]
    expected = EXPECTED[name][1]
    assert len(messages) == len(expected), messages
    for layer, reason in expected.items():
        assert any(f"layer={layer!r}" in m and reason in m for m in messages), messages
        metadata = _node_metadata(exported, layer)
        assert metadata["accumulator"].startswith("float: ")
        assert reason in metadata["accumulator"]
        assert "accumulator_hls" not in metadata


def test_quant_nodes_of_the_fixed_point_part_are_unchanged_by_a_float_tail():
    """The fixed-point part exports the same Quant nodes with and without the float tail."""
    model = builders.jet_softmax_batchnorm()
    head = keras.Model(model.input, model.get_layer("output").output)
    with_tail, _ = _export(model)
    without, _ = _export(head)

    def quants(exported):
        return [
            (node.name, [a.i for a in node.attribute if a.type == onnx.AttributeProto.INT])
            for node in exported.graph.node
            if node.op_type == "Quant"
        ]

    assert quants(with_tail) == quants(without)
    assert _node_metadata(with_tail, "output") == _node_metadata(without, "output")


def test_standalone_batchnorm_is_exported_as_batchnormalization_not_folded(float_tail_exports):
    _, exported, _ = float_tail_exports["tutorial_cnn"]
    ops = [node.op_type for node in exported.graph.node]
    assert ops.count("BatchNormalization") == 2  # the two conv blocks (4-D)
    initializers = {t.name: numpy_helper.to_array(t) for t in exported.graph.initializer}
    kernels = [
        initializers[node.input[0]]
        for node in exported.graph.node
        if node.op_type == "Quant" and dict(_node_items(node)).get("role") == "kernel"
    ]
    model = float_tail_exports["tutorial_cnn"][0]
    for name, kernel in zip(("conv0", "conv1"), kernels, strict=False):
        quantized = quantized_weights(model.get_layer(name)).kernel
        np.testing.assert_array_equal(np.sort(kernel, axis=None), np.sort(quantized, axis=None))


def _node_items(node):
    return [(entry.key.removeprefix("bnfold."), entry.value) for entry in node.metadata_props]


def test_qbatchnormalization_exports_its_quantized_statistics(float_tail_exports):
    model, exported, _ = float_tail_exports["qbatchnorm_mlp"]
    layer = model.get_layer("qbn")
    gamma = np.asarray(layer.gamma_quantizer_internal(layer.gamma))
    assert not np.array_equal(gamma, np.asarray(layer.gamma)), "the quantizer moves gamma"
    # Verification passed within the float tolerance: the quantized values are the ones used.
    verification = _model_metadata(exported, "verification")
    assert verification["max_difference"] <= verification["tolerance"]


@pytest.mark.parametrize("name", ["ds_cnn", "global_average_6x6", "tutorial_cnn"])
def test_strict_types_fails_as_before(name):
    with pytest.raises(TypeInferenceError, match=next(iter(EXPECTED[name][1]))):
        bnfold.export_onnx(
            builders.FLOAT_TAIL_BUILDERS[name](), source_quantizers=[SOURCE], strict=True
        )


def test_strict_types_on_the_command_line(tmp_path):
    path = tmp_path / "ds_cnn.h5"
    builders.ds_cnn().save(path)
    from bnfold.export.__main__ import main

    assert main([str(path), "-o", str(tmp_path / "x.onnx"), "--strict-types"]) == 1
    assert not (tmp_path / "x.onnx").exists()
    assert main([str(path), "-o", str(tmp_path / "x.onnx")]) == 0


FUNCTIONS = [
    "softmax",
    "sigmoid",
    "tanh",
    "hard_sigmoid",
    "softplus",
    "softsign",
    "elu",
    "selu",
    "swish",
    "silu",
    "exponential",
    "relu6",
]
LAYERS = {
    "Softmax": lambda: keras.layers.Softmax(name="f"),
    "LeakyReLU": lambda: keras.layers.LeakyReLU(0.2, name="f"),
    "ELU": lambda: keras.layers.ELU(0.5, name="f"),
    "PReLU": lambda: keras.layers.PReLU(
        alpha_initializer=keras.initializers.Constant(0.25), name="f"
    ),
    "ThresholdedReLU": lambda: keras.layers.ThresholdedReLU(0.5, name="f"),
    "ReLU_max": lambda: keras.layers.ReLU(max_value=1.5, name="f"),
    "ReLU_slope": lambda: keras.layers.ReLU(negative_slope=0.1, name="f"),
    "ReLU_threshold": lambda: keras.layers.ReLU(threshold=0.25, name="f"),
    "ReLU_all": lambda: keras.layers.ReLU(max_value=2.0, negative_slope=0.1, threshold=0.25),
}


def _dense(activation=None):
    return qkeras.QDense(
        6, kernel_quantizer=builders.KERNEL, bias_quantizer=builders.BIAS, activation=activation
    )


def _activation_models(function):
    inputs = keras.Input((8,))
    as_argument = keras.Model(inputs, _dense(function)(inputs))
    inputs = keras.Input((8,))
    as_layer = keras.Model(inputs, keras.layers.Activation(function, name="f")(_dense()(inputs)))
    return as_argument, as_layer


@pytest.mark.parametrize("function", FUNCTIONS)
def test_every_float_activation_function_exports(function):
    for model in _activation_models(function):
        exported, messages = _export(builders._randomized(model))
        assert messages == []
        onnx.checker.check_model(exported, full_check=True)
        tail = _model_metadata(exported, "float_tail")
        assert tail["outputs"] == [model.output_names[0]] and len(tail["boundaries"]) == 1
        _assert_exact_and_within_tolerance(_model_metadata(exported, "verification"))


def _assert_exact_and_within_tolerance(verification):
    assert verification["exact_difference"] == 0.0
    assert 0.0 <= verification["max_difference"] <= verification["tolerance"]


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_every_float_activation_layer_exports(layer):
    inputs = keras.Input((8,))
    model = builders._randomized(keras.Model(inputs, LAYERS[layer]()(_dense()(inputs))))
    exported, messages = _export(model)
    assert messages == []
    onnx.checker.check_model(exported, full_check=True)
    _assert_exact_and_within_tolerance(_model_metadata(exported, "verification"))
    assert _model_metadata(exported, "float_tail")["outputs"] == model.output_names


def test_gelu_is_refused_naming_the_layer():
    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Activation("gelu", name="g")(_dense()(inputs)))
    with pytest.raises(UnsupportedLayerError, match=r"'g' \(Activation\) with activation 'gelu'"):
        bnfold.export_onnx(model, source_quantizers=[SOURCE])


def test_unsupported_merge_is_named_as_such_not_as_a_type_error():
    inputs = keras.Input((8,))
    x = keras.layers.Dot(axes=1, name="dot")([_dense()(inputs), _dense()(inputs)])
    model = keras.Model(inputs, _dense()(x))
    with pytest.raises(UnsupportedLayerError, match=r"'dot' of class Dot"):
        bnfold.export_onnx(model, source_quantizers=[SOURCE])
