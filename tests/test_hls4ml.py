"""hls4ml reads bnfold's export and computes the QKeras model's outputs bit for bit.

End to end, per golden model: export with one scale per kernel, ``prepare_for_hls4ml``
(average pooling rewritten, the QONNX preprocessing hls4ml documents, the configuration),
convert (Vitis backend, io_parallel), compile the C++ emulation with g++, predict. Each
model is compiled once per module; resnet_tiny takes about a minute, the others 10 to
25 s each.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import yaml
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean
from qonnx.transformation.gemm_to_matmul import GemmToMatMul
from qonnx.util.cleanup import cleanup_model

import bnfold
import builders
from bnfold.accumulator import mac_types
from bnfold.errors import ExportError, UnsupportedLayerError
from bnfold.export.__main__ import main
from bnfold.export.verify import qonnx_outputs, sample_inputs
from bnfold.fixedpoint import FixedPoint
from bnfold.hls4ml import convert_from_keras_model, hls4ml_config, prepare_for_hls4ml
from bnfold.keras import keras, qkeras
from bnfold.mac import quantized_weights
from hls4ml_runs import (
    compile_for_c_simulation,
    compiled_hls4ml,
    hls4ml_model,
    hls4ml_predictions,
)

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
# An MLP, a conv net with skip connections, a depthwise-separable net, two inputs and outputs,
# binary, ternary and power-of-two kernels.
HLS4ML_MODELS = (
    "jet_tagging_mlp",
    "resnet_tiny",
    "kws_dscnn",
    "two_in_two_out",
    "binary_ternary_po2",
)
# hls4ml layer classes made from the ONNX Conv and MatMul nodes, named "<class>_<node>".
MAC_LAYERS = ("Conv2D", "PointwiseConv2D", "DepthwiseConv2D", "Dense")
# hls4ml 1.3.0's softmax (its default "stable" implementation, 18-bit tables) against the
# float softmax, measured on softmax_classifier's 32 samples: up to 0.11 (it rounds a
# 0.97 to 1.0).
HLS4ML_SOFTMAX_ERROR = 0.125


def golden(name: str) -> tuple[keras.Model, list[str], list[np.ndarray]]:
    """A golden model, populated as the exporter populates it, with inputs to compare on.

    The inputs are the recorded ones plus the two extremes of each input type.
    """
    sources = json.loads((GOLDEN / f"{name}.json").read_text())["source_quantizers"]
    model = bnfold.load_model(GOLDEN / f"{name}.h5")
    bnfold.populate_bias_quantizer_from_accumulator(model, sources)
    recorded = np.load(GOLDEN / f"{name}.npz")
    extremes = sample_inputs(model, [FixedPoint.from_quantizer(q) for q in sources], 2)
    inputs = [
        np.concatenate([recorded[f"input/{input_name}"], extreme]).astype(np.float32)
        for input_name, extreme in zip(model.input_names, extremes, strict=True)
    ]
    return model, sources, inputs


def _outputs(values) -> list[np.ndarray]:
    return values if isinstance(values, list) else [values]


@pytest.fixture(scope="module", params=HLS4ML_MODELS)
def compiled(request, tmp_path_factory):
    """One golden model through hls4ml, compiled once."""

    name = request.param
    model, sources, inputs = golden(name)
    onnx_model = bnfold.export_onnx(
        model, source_quantizers=sources, per_channel_scales=False, verify=False
    )
    cleaned, config = prepare_for_hls4ml(onnx_model)
    hls_model = hls4ml_model(cleaned, config, tmp_path_factory.mktemp(name))
    compile_for_c_simulation(hls_model)
    return SimpleNamespace(
        name=name,
        onnx_model=onnx_model,
        cleaned=cleaned,
        config=config,
        hls_model=hls_model,
        inputs=inputs,
        expected=_outputs(model.predict(inputs, verbose=0)),
    )


@pytest.mark.slow
def test_hls4ml_predicts_the_qkeras_outputs_bit_for_bit(compiled):
    inputs = [np.ascontiguousarray(x) for x in compiled.inputs]
    predicted = _outputs(compiled.hls_model.predict(inputs[0] if len(inputs) == 1 else inputs))
    for values, expected in zip(predicted, compiled.expected, strict=True):
        np.testing.assert_array_equal(np.reshape(values, expected.shape), expected)


@pytest.mark.slow
def test_the_graph_hls4ml_reads_computes_the_qkeras_outputs(compiled):
    """The pooling rewrite and the preprocessing change no value (qonnx's executor)."""
    results = qonnx_outputs(compiled.cleaned, compiled.inputs)
    for result, expected in zip(results, compiled.expected, strict=True):
        np.testing.assert_array_equal(result, expected)


@pytest.mark.slow
def test_config_types_are_the_types_hls4ml_uses(compiled):
    """Keyed by the right names, every configured type reaches hls4ml's layers unchanged."""
    hls_model = compiled.hls_model
    layers = compiled.config["LayerName"]
    convert = hls_model.config.backend.convert_precision_string
    for variable in hls_model.get_input_variables():
        expected = layers[variable.name]["Precision"]["result"]
        assert expected.startswith(("fixed<", "ufixed<"))
        assert variable.type.precision == convert(expected)
    checked = 0
    for layer in hls_model.get_layers():
        if layer.class_name not in MAC_LAYERS:
            continue
        precision = layers[layer.name.split("_", 1)[1]]["Precision"]
        assert layer.get_attr("accum_t").precision == convert(precision["accum"]), layer.name
        assert layer.weights["weight"].type.precision == convert(precision["weight"]), layer.name
        if "bias" in precision:
            assert layer.weights["bias"].type.precision == convert(precision["bias"]), layer.name
        if precision["result"] != "auto":
            assert layer.get_output_variable().type.precision == convert(precision["result"])
        checked += 1
    assert checked == sum(
        node.op_type in ("Conv", "MatMul") for node in compiled.cleaned.graph.node
    )


@pytest.mark.slow
def test_config_accumulators_are_the_exported_accumulators(compiled):
    """Every MAC node's accum is bnfold.accumulator_hls; weights and biases are Quant types."""
    layers = compiled.config["LayerName"]
    for node in compiled.cleaned.graph.node:
        if node.op_type not in ("Conv", "MatMul"):
            continue
        metadata = {entry.key: entry.value for entry in node.metadata_props}
        precision = layers[node.name]["Precision"]
        accumulator = FixedPoint.from_hls(metadata["bnfold.accumulator_hls"])
        assert precision["accum"] == accumulator.hls4ml_precision()
        assert precision["weight"].endswith((",RND_CONV,SAT>", ",RND_CONV,SAT_SYM>"))
        assert (precision["result"] == "auto") == (node.op_type == "MatMul")


@pytest.mark.slow
def test_config_keys_are_the_layer_names_hls4ml_gives(compiled):
    import hls4ml

    ours = set(compiled.config["LayerName"])
    theirs = hls4ml.utils.config.config_from_onnx_model(
        compiled.cleaned, granularity="name", backend="Vitis"
    )["LayerName"]
    # hls4ml also lists the constant inputs of Quant and Reshape nodes, which take no config.
    assert ours == {name for name in theirs if not re.search(r"_param\d+$", name)}
    names = {tensor.name for tensor in compiled.cleaned.graph.input}
    assert ours == names | {node.name for node in compiled.cleaned.graph.node}


# ------------------------------------------------------------- without compiling


@pytest.fixture(scope="module")
def jet_export():
    model, sources, _ = golden("jet_tagging_mlp")
    return bnfold.export_onnx(model, source_quantizers=sources, per_channel_scales=False)


def test_names_equal_those_of_the_documented_preprocessing(jet_export):
    """Without average pooling, prepare_for_hls4ml is exactly the documented preprocessing."""
    documented = cleanup_model(ModelWrapper(jet_export))
    documented = documented.transform(ConvertToChannelsLastAndClean()).transform(GemmToMatMul())
    documented = cleanup_model(documented)
    cleaned, _ = prepare_for_hls4ml(jet_export)
    assert [(n.op_type, n.name) for n in cleaned.graph.node] == [
        (n.op_type, n.name) for n in documented.graph.node
    ]


def test_config_from_a_file_a_proto_and_a_wrapper_alike_and_nothing_changed(jet_export, tmp_path):
    path = tmp_path / "jet.onnx"
    onnx.save(jet_export, path)
    before = jet_export.SerializeToString()
    config = bnfold.hls4ml_config(jet_export)
    assert bnfold.hls4ml_config is hls4ml_config
    assert jet_export.SerializeToString() == before
    assert hls4ml_config(path) == config
    assert hls4ml_config(ModelWrapper(jet_export)) == config
    assert prepare_for_hls4ml(jet_export)[1] == config
    assert json.loads(json.dumps(config)) == config
    assert config["Model"]["Precision"]["default"].startswith("fixed<")
    assert hls4ml_config(jet_export, default_precision="fixed<32,16>")["Model"]["Precision"] == {
        "default": "fixed<32,16>"
    }


def test_per_channel_scales_are_refused_with_the_export_option_to_use(folded_models):
    model = folded_models["sequential_conv"]
    onnx_model = bnfold.export_onnx(
        model, source_quantizers=[builders.INPUT_QUANTIZER], verify=False
    )
    wrapper = ModelWrapper(onnx_model)
    scales = [
        wrapper.get_initializer(node.input[1])
        for node in onnx_model.graph.node
        if node.op_type == "Quant" and wrapper.get_initializer(node.input[0]) is not None
    ]
    assert any(np.unique(scale).size > 1 for scale in scales)
    with pytest.raises(ExportError, match=r"per_channel_scales=False \(--no-per-channel-scales\)"):
        prepare_for_hls4ml(onnx_model)


@pytest.mark.filterwarnings("ignore:Could not absorb transpose->flatten")
def test_average_pooling_and_squeeze_become_ops_hls4ml_reads():
    """Global and windowed averages become depthwise Conv with 1/n weights, exactly."""
    model = builders.zoo()
    sources = [builders.INPUT_QUANTIZER]
    onnx_model = bnfold.export_onnx(
        model, source_quantizers=sources, per_channel_scales=False, verify=False
    )
    assert {"AveragePool", "GlobalAveragePool", "Squeeze"} <= {
        node.op_type for node in onnx_model.graph.node
    }
    cleaned, config = prepare_for_hls4ml(onnx_model)
    assert not {"AveragePool", "GlobalAveragePool", "Squeeze"} & {
        node.op_type for node in cleaned.graph.node
    }
    averages = [
        node
        for node in cleaned.graph.node
        if node.op_type == "Conv"
        and any(e.value in ("avg", "gap") for e in node.metadata_props if e.key == "bnfold.layer")
    ]
    assert len(averages) == 2
    for node in averages:
        assert config["LayerName"][node.name]["Precision"]["weight"].startswith("ufixed<1,")
    bnfold.populate_bias_quantizer_from_accumulator(model, sources)
    inputs = sample_inputs(model, [FixedPoint.from_quantizer(builders.INPUT_QUANTIZER)], 4)[0]
    expected = model.predict(inputs, verbose=0)
    np.testing.assert_array_equal(qonnx_outputs(cleaned, [inputs])[0], expected)


# ----------------------------------------------------- float values: types from their ranges


def _result_types(cleaned, config) -> dict[str, FixedPoint]:
    """Each node output whose ``result`` the configuration sets, without rounding modes."""
    types = {}
    for node in cleaned.graph.node:
        result = config["LayerName"][node.name]["Precision"]["result"]
        if result != "auto":
            types[node.output[0]] = FixedPoint.from_hls(re.sub(r",[A-Z_]+", "", result))
    return types


@pytest.fixture(scope="module")
def float_part_exports():
    """Models with float parts of every kind, exported once (one scale per kernel)."""
    builds = {name: builders.FLOAT_TAIL_BUILDERS[name] for name in ("tutorial_cnn", "ds_cnn")}
    builds["global_average_6x6"] = builders.global_average_6x6
    builds["activation_heads"] = builders.activation_heads
    exports = {}
    for name, build in builds.items():
        model = build()
        exports[name] = (
            model,
            bnfold.export_onnx(
                model,
                source_quantizers=[builders.INPUT_QUANTIZER],
                per_channel_scales=False,
                verify=False,
            ),
        )
    return exports


@pytest.mark.parametrize(
    "name", ["activation_heads", "ds_cnn", "global_average_6x6", "tutorial_cnn"]
)
def test_every_result_type_holds_the_values_its_layer_computes(float_part_exports, name):
    """On the input type's extremes and random samples, the graph hls4ml reads (run by
    QONNX) never leaves a configured result type; float values included."""
    model, exported = float_part_exports[name]
    cleaned, config = prepare_for_hls4ml(exported)
    types = _result_types(cleaned, config)
    source = FixedPoint.from_quantizer(builders.INPUT_QUANTIZER)
    inputs = sample_inputs(model, [source], 64)
    values = qonnx_outputs(cleaned, inputs, list(types))[len(cleaned.graph.output) :]
    for (tensor, fixed), computed in zip(types.items(), values, strict=True):
        assert fixed.holds(computed.min(), computed.max()), (tensor, fixed)


def test_float_values_get_their_range_and_the_chosen_fractional_bits(float_part_exports):
    """A mean keeps its input's integer bits, a softmax or sigmoid is within [0, 1], a tanh
    within [-1, 1]; fractional_bits sets the grid of exactly those float values."""
    step = 2.0**-16
    relu = FixedPoint.from_quantizer(builders.RELU)
    for name, (_, exported) in float_part_exports.items():
        cleaned, config = prepare_for_hls4ml(exported)
        fine = _result_types(cleaned, config)
        coarse = _result_types(*prepare_for_hls4ml(exported, fractional_bits=8))
        changed = [tensor for tensor in fine if fine[tensor] != coarse[tensor]]
        assert changed, name
        for tensor in changed:
            assert (fine[tensor].fractional, coarse[tensor].fractional) == (16, 8)
            assert fine[tensor].integer == coarse[tensor].integer
        for node in cleaned.graph.node:
            fixed = fine.get(node.output[0])
            if any(entry.key == "bnfold.rounded" for entry in node.metadata_props):
                assert fixed == FixedPoint.narrowest_holding(0.0, relu.max, step)
            elif node.op_type in ("Softmax", "Sigmoid"):
                assert fixed.holds(0.0, 1.0) and not fixed.signed and fixed.integer <= 1
            elif node.op_type == "Tanh":
                assert fixed.holds(-1.0, 1.0) and fixed.integer <= 1


def test_fractional_bits_out_of_range_are_refused(jet_export):
    for refused in (-1, 33, 8.0, True):
        with pytest.raises(ValueError, match="fractional_bits must be an int from 0 to 32"):
            prepare_for_hls4ml(jet_export, fractional_bits=refused)


# ------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize("suffix", [".yml", ".json"])
def test_cli_writes_the_config_of_the_onnx_it_writes(folded_models, tmp_path, capsys, suffix):
    """--hls4ml-config implies one scale per kernel, so per-channel kernels still work."""
    model_file = tmp_path / "conv.h5"
    folded_models["sequential_conv"].save(model_file)
    output, config_file = tmp_path / "conv.onnx", tmp_path / f"conv_hls4ml{suffix}"
    code = main(
        [
            str(model_file),
            "-o",
            str(output),
            "--input-quantizer",
            builders.INPUT_QUANTIZER,
            "--no-verify",
            "--hls4ml-config",
            str(config_file),
        ]
    )
    assert code == 0
    assert f"wrote {config_file}" in capsys.readouterr().out
    text = config_file.read_text()
    written = yaml.safe_load(text) if suffix == ".yml" else json.loads(text)
    assert written == hls4ml_config(output)
    assert text.lstrip().startswith("{") == (suffix == ".json")
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        ["conv.h5", "conv.onnx", config_file.name]
    )


def test_cli_fractional_bits_reach_the_config(tmp_path):
    model_file = tmp_path / "average.h5"
    builders.global_average_6x6().save(model_file)
    output, config_file = tmp_path / "average.onnx", tmp_path / "average.json"
    arguments = [str(model_file), "-o", str(output), "--input-quantizer", builders.INPUT_QUANTIZER]
    arguments += ["--no-verify", "--hls4ml-config", str(config_file)]
    assert main([*arguments, "--hls4ml-fractional-bits", "8"]) == 0
    written = json.loads(config_file.read_text())
    assert written == hls4ml_config(output, fractional_bits=8) != hls4ml_config(output)


# ------------------------------------------------------------------------ float tails


@pytest.fixture(scope="module")
def softmax_classifier(tmp_path_factory):
    """A classifier computed in fixed point up to its softmax, through hls4ml twice:
    with hls4ml's softmax, and with it skipped (the hardware outputs the logits)."""
    model = builders.softmax_classifier()
    return {
        skip: hls4ml_predictions(model, skip, tmp_path_factory.mktemp(f"softmax_{skip}"))
        for skip in (False, True)
    }


@pytest.mark.slow
def test_hls4ml_with_the_softmax_skipped_gives_the_logits_bit_for_bit(softmax_classifier):
    predicted, _, logits = softmax_classifier[True]
    np.testing.assert_array_equal(predicted, logits)


@pytest.mark.slow
def test_hls4ml_softmax_approximates_the_float_softmax(softmax_classifier):
    """hls4ml's table-based softmax: within HLS4ML_SOFTMAX_ERROR, same class on every sample."""
    predicted, expected, _ = softmax_classifier[False]
    assert np.max(np.abs(predicted - expected)) <= HLS4ML_SOFTMAX_ERROR
    top = np.sort(expected, -1)
    # Classes closer than the tables' resolution may swap.
    assert np.all((predicted.argmax(-1) == expected.argmax(-1)) | (top[:, -1] - top[:, -2] < 0.02))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["jet_softmax_batchnorm", "qbatchnorm_mlp"])
def test_hls4ml_reads_standalone_batchnorm_and_gives_the_logits_bit_for_bit(name, tmp_path):
    """QDense + BatchNormalization (or QBatchNormalization) + QActivation: the batch
    normalization computes in the types prepare_for_hls4ml gives float parts."""
    model = builders.FLOAT_TAIL_BUILDERS[name]()
    predicted, _, logits = hls4ml_predictions(model, True, tmp_path)
    np.testing.assert_array_equal(predicted, logits)


@pytest.mark.slow
def test_hls4ml_reads_the_tutorial_cnn_with_its_float_dense_output(tmp_path):
    """QConv2D + BatchNormalization blocks and a float Dense output layer: hls4ml computes
    the float layers in the widened default precision (measured: logits within 2.8e-4)."""
    predicted, _, logits = hls4ml_predictions(builders.tutorial_cnn(), True, tmp_path)
    assert np.max(np.abs(predicted - logits)) <= 2**-9
    np.testing.assert_array_equal(predicted.argmax(-1), logits.argmax(-1))


@pytest.mark.slow
def test_hls4ml_computes_the_merges_bit_for_bit(tmp_path):
    """Subtract, Multiply, Maximum, Minimum, Add of three, Concatenate, Permute in hls4ml's C++."""
    model = builders.merge_block()
    sources = [builders.INPUT_QUANTIZER] * 2
    onnx_model = bnfold.export_onnx(model, source_quantizers=sources, per_channel_scales=False)
    hls_model = compiled_hls4ml(onnx_model, tmp_path)
    inputs = sample_inputs(model, [FixedPoint.from_quantizer(sources[0])] * 2, 64)
    predicted = hls_model.predict([np.ascontiguousarray(values) for values in inputs])
    expected = model.predict(inputs, verbose=0)
    np.testing.assert_array_equal(np.reshape(predicted, expected.shape), expected)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "dense", "fractional_bits"),
    [
        ("ds_cnn", "classifier", 16),
        ("global_average_6x6", "head", 16),
        ("global_average_6x6", "head", 8),
    ],
)
def test_hls4ml_computes_means_over_windows_that_are_not_a_power_of_two(
    name, dense, fractional_bits, tmp_path
):
    """The MLPerf Tiny DS-CNN's 25x5 average pooling, and a 6x6 global average, each read by
    a QDense: hls4ml's mean is within 1.25 * 2**-fractional_bits of the exact one, so each
    logit is within that times the sum of its weights' magnitudes."""
    model = builders.FLOAT_TAIL_BUILDERS[name]()
    predicted, _, logits = hls4ml_predictions(
        model, True, tmp_path, fractional_bits=fractional_bits
    )
    kernel = quantized_weights(model.get_layer(dense)).kernel
    promised = np.abs(kernel).sum(0) * 1.25 * 2.0**-fractional_bits
    assert np.all(np.abs(predicted - logits) <= promised)
    np.testing.assert_array_equal(predicted.argmax(-1), logits.argmax(-1))


def _activation_after_dense(function: str) -> keras.Model:
    inputs = keras.Input((8,), name="features")
    x = qkeras.QDense(6, kernel_quantizer=builders.KERNEL, bias_quantizer=builders.BIAS, name="fc")(
        inputs
    )
    outputs = keras.layers.Activation(function, name=function)(x)
    return builders._randomized(keras.Model(inputs, outputs, name=function))


@pytest.mark.slow
@pytest.mark.parametrize("function", ["swish", "silu"])
def test_hls4ml_computes_swish_with_its_sigmoid_table(function, tmp_path):
    """x * sigmoid(x): hls4ml reads the Sigmoid and the Mul; its sigmoid comes from a
    1024-entry table over [-8, 8) (steps of 1/64 in x, so within 1/256 of the sigmoid)
    and saturates beyond, so each output is within |x| / 256 (measured: 0.021 at x = 21)."""
    model = _activation_after_dense(function)
    predicted, expected, _ = hls4ml_predictions(model, False, tmp_path, samples=64)
    sources = [builders.INPUT_QUANTIZER]
    inputs = sample_inputs(model, [FixedPoint.from_quantizer(sources[0])], 64)
    before = keras.Model(model.input, model.get_layer("fc").output).predict(inputs, verbose=0)
    assert np.all(np.abs(predicted - expected) <= np.abs(before) / 256 + 2**-10)


# Measured on activation_heads with inputs from -20.5 to 21.1: sigmoid 0.0044, tanh 0.0067,
# elu 0.0039, selu 0.0076, and within |x| < 8 softplus 0.015 and softsign 0.012 (hls4ml's
# tables span [-8, 8)); LeakyReLU 5e-5 (its result type), ThresholdedReLU 0.
TABLE_ERROR = 2**-6
PIECEWISE_LINEAR_ERROR = 2**-10
# Tables that saturate at |x| = 8: beyond, the function keeps growing and hls4ml does not.
SATURATING = ("softplus", "softsign")


@pytest.mark.slow
def test_hls4ml_computes_every_float_activation_it_reads(tmp_path):
    """Each float activation after a QDense, one model with an output per function, through
    hls4ml's C simulation: table-based functions within TABLE_ERROR (softplus and softsign
    only for inputs within [-8, 8)), LeakyReLU and ThresholdedReLU within
    PIECEWISE_LINEAR_ERROR. The Elu's alpha reaches hls4ml (it reads a missing one as 0.01)."""

    model = builders.activation_heads(builders.FLOAT_ACTIVATIONS[:-1])  # not hard_sigmoid
    sources = [builders.INPUT_QUANTIZER]
    exported = bnfold.export_onnx(model, source_quantizers=sources, per_channel_scales=False)
    cleaned, config = prepare_for_hls4ml(exported)
    hls_model = hls4ml_model(cleaned, config, tmp_path)
    compile_for_c_simulation(hls_model)
    bnfold.populate_bias_quantizer_from_accumulator(model, sources)
    inputs = sample_inputs(model, [FixedPoint.from_quantizer(sources[0])], 64)
    predicted = hls_model.predict(np.ascontiguousarray(inputs[0]))
    before = keras.Model(model.input, model.get_layer("fc").output).predict(inputs, verbose=0)
    assert before.min() < -8 and before.max() > 8
    expected = model.predict(inputs, verbose=0)
    for name, values, output in zip(
        model.output_names, expected, cleaned.graph.output, strict=True
    ):
        computed = np.reshape(predicted[hls_model.outputs.index(output.name)], values.shape)
        error = np.abs(computed - values)
        if name in SATURATING:
            inside = np.abs(before) < 8
            assert np.all(error[inside] <= TABLE_ERROR), name
            assert np.ptp(computed[before > 8]) <= TABLE_ERROR, name  # one value beyond 8
        elif name in ("leaky_relu_layer", "thresholded_relu_layer"):
            assert np.all(error <= PIECEWISE_LINEAR_ERROR), name
        else:
            assert np.all(error <= TABLE_ERROR), name


def test_hls4ml_cannot_read_hard_sigmoid(tmp_path):
    """hard_sigmoid is exported as Mul, Add, Min, Max with constants; hls4ml 1.3.0 turns a
    Min or Max with a constant into a Merge layer and fails on it in its precision
    inference (only Add, Sub, Mul and Div with a constant become ApplyAlpha)."""

    model = _activation_after_dense("hard_sigmoid")
    exported = bnfold.export_onnx(
        model, source_quantizers=[builders.INPUT_QUANTIZER], per_channel_scales=False
    )
    cleaned, config = prepare_for_hls4ml(exported)
    assert {"Min", "Max"} <= {node.op_type for node in cleaned.graph.node}
    with pytest.raises(IndexError):
        hls4ml_model(cleaned, config, tmp_path)


# ------------------------------------------------- the Keras route: convert_from_keras_model


def _conv_depthwise_dense() -> tuple[keras.Model, list[str], list[np.ndarray]]:
    """All three folded layer types, bias quantizers left for populate to fill."""
    from bnfold.keras import qkeras

    inputs = keras.Input((8, 8, 2), name="image")
    x = qkeras.QConv2DBatchnorm(
        4, 3, kernel_quantizer="quantized_bits(4,0,1,alpha=1)", bias_quantizer=None, name="conv"
    )(inputs)
    x = qkeras.QActivation("quantized_relu(4,2)", name="conv_relu")(x)
    x = qkeras.QDepthwiseConv2DBatchnorm(
        3, depthwise_quantizer="quantized_bits(4,0,1,alpha=1)", bias_quantizer=None, name="dw"
    )(x)
    x = qkeras.QActivation("quantized_relu(5,2)", name="dw_relu")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = bnfold.layers.QDenseBatchnorm(
        5, kernel_quantizer="quantized_bits(6,0,1,alpha=1)", bias_quantizer=None, name="dense"
    )(x)
    model = builders.randomize_batchnorm(keras.Model(inputs, outputs), seed=3)
    sources = [builders.INPUT_QUANTIZER]
    extremes = sample_inputs(model, [FixedPoint.from_quantizer(sources[0])], 2)
    return model, sources, [np.concatenate([builders.grid_inputs(model)[0], extremes[0]])]


def _conv_separable_dense() -> tuple[keras.Model, list[str], list[np.ndarray]]:
    """A folded conv, a QSeparableConv2D with a bias quantizer of its own, a folded dense."""
    inputs = keras.Input((8, 8, 2), name="image")
    x = qkeras.QConv2DBatchnorm(
        4, 3, kernel_quantizer=builders.SMALL_KERNEL, bias_quantizer=None, name="conv"
    )(inputs)
    x = qkeras.QActivation("quantized_relu(4,2)", name="conv_relu")(x)
    x = qkeras.QSeparableConv2D(
        3,
        3,
        depthwise_quantizer=builders.SMALL_KERNEL,
        pointwise_quantizer="quantized_bits(5,1,1,alpha=1)",
        bias_quantizer=builders.WIDE_BIAS,
        name="separable",
    )(x)
    x = qkeras.QActivation("quantized_relu(6,3)", name="separable_relu")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = bnfold.layers.QDenseBatchnorm(
        4, kernel_quantizer=builders.SMALL_KERNEL, bias_quantizer=None, name="dense"
    )(x)
    model = builders.randomize_batchnorm(keras.Model(inputs, outputs), seed=4)
    rng = np.random.default_rng(4)
    for variable in model.get_layer("separable").trainable_weights:
        variable.assign(rng.normal(0, 0.6, variable.shape).astype(np.float32))
    sources = [builders.INPUT_QUANTIZER]
    extremes = sample_inputs(model, [FixedPoint.from_quantizer(sources[0])], 2)
    return model, sources, [np.concatenate([builders.grid_inputs(model)[0], extremes[0]])]


KERAS_ROUTE_MODELS = {
    "conv_depthwise_dense": _conv_depthwise_dense,
    "conv_separable_dense": _conv_separable_dense,
    "dense_autoencoder": lambda: golden("dense_autoencoder"),
}


@pytest.fixture(scope="module", params=sorted(KERAS_ROUTE_MODELS))
def keras_route(request, tmp_path_factory):
    """A model through bnfold.hls4ml.convert_from_keras_model, compiled once."""
    model, sources, inputs = KERAS_ROUTE_MODELS[request.param]()
    bias_quantizers = [str(layer.get_config().get("bias_quantizer")) for layer in model.layers]
    keras_before = sys.modules.get("keras")
    hls_model = convert_from_keras_model(
        model,
        sources,
        output_dir=str(tmp_path_factory.mktemp(request.param) / "hls4ml_prj"),
        backend="Vitis",
        io_type="io_parallel",
    )
    # Read now: hls4ml's compile() or TensorFlow may import Keras for good afterwards.
    keras_after = sys.modules.get("keras")
    compile_for_c_simulation(hls_model)
    after = [str(layer.get_config().get("bias_quantizer")) for layer in model.layers]
    # What hls4ml computes is the QKeras model with its empty bias quantizers populated.
    populated = bnfold.populate_bias_quantizer_from_accumulator(model, sources)
    return SimpleNamespace(
        hls_model=hls_model,
        inputs=inputs,
        expected=populated.predict(inputs, verbose=0),
        bias_quantizers=(bias_quantizers, after),
        keras=(keras_before, keras_after),
        macs=mac_types(populated, sources),
    )


@pytest.mark.slow
def test_keras_route_predicts_the_qkeras_outputs_bit_for_bit(keras_route):
    predicted = keras_route.hls_model.predict(np.ascontiguousarray(keras_route.inputs[0]))
    expected = keras_route.expected
    np.testing.assert_array_equal(np.reshape(predicted, expected.shape), expected)


@pytest.mark.slow
def test_keras_route_accumulators_are_bnfolds_and_nothing_else_changed(keras_route):
    """Each MAC layer's accum_t is bnfold's accumulator; hls4ml splits a separable
    convolution in two layers, and its depthwise one computes and outputs its own."""
    convert = keras_route.hls_model.config.backend.convert_precision_string
    layers = {layer.name: layer for layer in keras_route.hls_model.get_layers()}
    for name, mac in keras_route.macs.items():
        expected = convert(mac.types.accumulator.hls4ml_precision())
        if mac.types.before is None:
            assert layers[name].get_attr("accum_t").precision == expected, name
            continue
        assert layers[f"{name}_pointwise"].get_attr("accum_t").precision == expected, name
        depthwise = layers[f"{name}_depthwise"]
        expected = convert(mac.types.before.accumulator.hls4ml_precision())
        assert depthwise.get_attr("accum_t").precision == expected, name
        assert depthwise.get_output_variable().type.precision == expected, name
    before, after = keras_route.keras
    assert after is before


@pytest.mark.slow
def test_keras_route_leaves_the_model_unchanged(keras_route):
    before, after = keras_route.bias_quantizers
    assert before == after


def test_keras_route_restores_keras_on_error_and_refuses_hls_config(folded_models, tmp_path):
    keras_before = sys.modules.get("keras")
    with pytest.raises(Exception, match=r"(?i)nosuchbackend"):
        convert_from_keras_model(
            folded_models["sequential_conv"], output_dir=str(tmp_path), backend="NoSuchBackend"
        )
    assert sys.modules.get("keras") is keras_before
    with pytest.raises(TypeError, match="builds hls_config itself"):
        convert_from_keras_model(folded_models["sequential_conv"], hls_config={})


def test_keras_route_refuses_nested_models_naming_the_layer(folded_models, tmp_path):
    keras_before = sys.modules.get("keras")
    with pytest.raises(UnsupportedLayerError, match=r"top level.*layer='\w+/"):
        convert_from_keras_model(folded_models["nested"], output_dir=str(tmp_path))
    assert sys.modules.get("keras") is keras_before
