"""The QONNX / FINN side: qonnx's own passes read bnfold's Quant nodes as the QKeras types.

FINN starts from qonnx's cleanup with the graph input's datatype annotated, infers
datatypes with qonnx, and folds the weight Quant nodes into integer initializers. Every
golden model goes through those steps here, exported as FINN reads it (per-channel
power-of-two kernel scales where QKeras has them), and through every qonnx pass that
FINN's ``ConvertQONNXtoFINN`` and its tidy-up step run, outputs compared with QKeras's
after each. FINN itself is too large for CI: ``scripts/check_finn.py`` runs its build
steps from a separate environment.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.extract_conv_bias import ExtractBiasFromConv
from qonnx.transformation.extract_quant_scale_zeropt import ExtractQuantScaleZeroPt
from qonnx.transformation.fold_constants import FoldConstantsFiltered
from qonnx.transformation.gemm_to_matmul import GemmToMatMul
from qonnx.transformation.general import (
    GiveReadableTensorNames,
    GiveUniqueNodeNames,
    RemoveStaticGraphInputs,
    RemoveUnusedTensors,
)
from qonnx.transformation.infer_data_layouts import InferDataLayouts
from qonnx.transformation.infer_datatypes import InferDataTypes
from qonnx.transformation.infer_shapes import InferShapes
from qonnx.transformation.quant_constant_folding import FoldTransposeIntoQuantInit
from qonnx.util.cleanup import cleanup_model

import bnfold
import builders
from bnfold.export.verify import FLOAT_TOLERANCE, qonnx_outputs, sample_inputs
from bnfold.fixedpoint import FixedPoint
from golden_records import GOLDEN, MODEL_NAMES

SAMPLES = 4


def _metadata(node) -> dict[str, str]:
    return {entry.key.removeprefix("bnfold."): entry.value for entry in node.metadata_props}


def _quantizer_type(node) -> FixedPoint:
    """The grid of the QKeras quantizer a Quant node stands for (per-channel scale apart)."""
    return FixedPoint.from_quantizer(_metadata(node)["quantizer"], allow_scale=True)


def _is_weight_quant(model: ModelWrapper, node) -> bool:
    return node.op_type == "Quant" and model.get_initializer(node.input[0]) is not None


# The qonnx passes of FINN's ConvertQONNXtoFINN (finn-plus 1.6.1), in its order, then
# those of its tidy-up step; FINN's own passes among them are run by check_finn.py.
FINN_QONNX_PASSES = (
    ExtractBiasFromConv,
    GemmToMatMul,
    FoldTransposeIntoQuantInit,
    InferDataTypes,
    InferDataLayouts,
    ExtractQuantScaleZeroPt,
    InferShapes,
    RemoveStaticGraphInputs,
    GiveUniqueNodeNames,
    GiveReadableTensorNames,
    RemoveUnusedTensors,
)


def _export(name: str, **options):
    """A golden model exported as FINN reads it, with samples and QKeras's outputs on them."""
    sources = json.loads((GOLDEN / f"{name}.json").read_text())["source_quantizers"]
    model = bnfold.load_model(GOLDEN / f"{name}.h5")
    onnx_model = bnfold.export_onnx(model, source_quantizers=sources, **options)
    bnfold.populate_bias_quantizer_from_accumulator(model, sources)
    recorded = np.load(GOLDEN / f"{name}.npz")
    inputs = [recorded[f"input/{input_name}"][:SAMPLES] for input_name in model.input_names]
    expected = model.predict(inputs, verbose=0)
    expected = expected if isinstance(expected, list) else [expected]
    return onnx_model, sources, inputs, expected


@pytest.fixture(scope="module", params=MODEL_NAMES)
def exported(request):
    """A golden model's name, and its export as FINN reads it with sources, samples, outputs."""
    return request.param, *_export(request.param, verify=False)


@pytest.fixture(scope="module")
def cleaned(exported):
    """The export cleaned by qonnx."""
    _, onnx_model, sources, inputs, expected = exported
    return (
        cleanup_model(ModelWrapper(onnx_model)),
        sources,
        inputs,
        expected,
        _float_outputs(onnx_model),
    )


def test_quant_parameters_have_the_shapes_qonnx_passes_take(exported):
    """One scale or zero point per tensor is shape (1,), as Brevitas writes it (qonnx's
    ExtractBiasFromConv cannot reshape a rank-0 one); per-channel scales keep the rank of
    the tensor they scale, varying along its output channels only (axis 0 of a Conv
    kernel, the last axis of a MatMul's), as FINN's conversion reads the channel axis;
    every initializer's value_info has the initializer's shape."""
    name, onnx_model = exported[:2]
    model = ModelWrapper(onnx_model)
    per_channel = 0
    for node in model.get_nodes_by_op_type("Quant"):
        for parameter in node.input[1:3]:
            values = model.get_initializer(parameter)
            if values.size == 1:
                assert values.shape == (1,), (node.name, parameter)
                continue
            per_channel += 1
            reader = model.find_consumers(node.output[0])[0].op_type
            channel_axis = {"Conv": 0, "MatMul": values.ndim - 1}[reader]
            varying = [axis for axis, size in enumerate(values.shape) if size != 1]
            assert varying == [channel_axis], node.name
            assert values.ndim == len(model.get_tensor_shape(node.input[0])), node.name
    if name == "po2_no_bias":  # its kernels have per-channel power-of-two scales
        assert per_channel
    listed = {value.name: value for value in model.graph.value_info}
    for tensor in model.graph.initializer:
        shape = [dim.dim_value for dim in listed[tensor.name].type.tensor_type.shape.dim]
        assert shape == list(tensor.dims), tensor.name


def test_finn_qonnx_passes_keep_the_qkeras_outputs(cleaned):
    model, _, inputs, expected, float_outputs = cleaned
    for transformation in FINN_QONNX_PASSES:
        model = model.transform(transformation())
        _assert_qkeras_outputs(
            qonnx_outputs(model, inputs), expected, float_outputs, transformation.__name__
        )
    assert not model.get_nodes_by_op_type("Gemm")
    # ExtractBiasFromConv left every convolution with two inputs.
    assert all(len(node.input) == 2 for node in model.get_nodes_by_op_type("Conv"))


_CHANNELS_FIRST_OPS = ("Conv", "MaxPool", "AveragePool", "GlobalAveragePool")


@pytest.mark.parametrize("channels_first", [False, True], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_inferred_layouts_match_the_graph(name, channels_first):
    """qonnx's InferDataLayouts, which FINN runs, reads each input's tensor_layout and then
    labels the input of every ONNX convolution and pooling NCHW (what ONNX computes);
    with channels_first the 4-D interface is NCHW and the outputs are still QKeras's."""
    onnx_model, _, inputs, expected = _export(name, channels_first=channels_first)
    model = cleanup_model(ModelWrapper(onnx_model)).transform(InferDataLayouts())
    for tensor in (*model.graph.input, *model.graph.output):
        rank = len(model.get_tensor_shape(tensor.name))
        expected_layout = {2: ["N", "C"], 3: ["N", "W", "C"]}.get(rank)
        if rank == 4:
            expected_layout = ["N", "C", "H", "W"] if channels_first else ["N", "H", "W", "C"]
        assert model.get_tensor_layout(tensor.name) == expected_layout, tensor.name
    for node in model.graph.node:
        if node.op_type in _CHANNELS_FIRST_OPS and len(model.get_tensor_shape(node.input[0])) == 4:
            assert model.get_tensor_layout(node.input[0]) == ["N", "C", "H", "W"], node.name
    _assert_qkeras_outputs(qonnx_outputs(model, inputs), expected, _float_outputs(onnx_model))


def test_cleanup_keeps_the_input_datatypes(cleaned):
    model, sources, *_ = cleaned
    for tensor, source in zip(model.graph.input, sources, strict=True):
        expected = FixedPoint.from_quantizer(source).value_datatype()
        assert model.get_tensor_datatype(tensor.name) == DataType[expected]


def test_datatype_inference_gives_each_quant_its_quantizer_type(cleaned):
    """Scaled Quant nodes are SCALEDINT<bits>; with the scales extracted, INTn or UINTn."""
    model = cleaned[0].transform(InferDataTypes(allow_scaledint_dtypes=True))
    quants = [node for node in model.graph.node if node.op_type == "Quant"]
    assert {_metadata(node)["role"] for node in quants} >= {"input", "kernel", "bias"}
    for node in quants:
        fixed = _quantizer_type(node)
        unit_scale = np.all(model.get_initializer(node.input[1]) == 1)
        expected = fixed.qonnx_datatype() if unit_scale else f"SCALEDINT<{fixed.bits}>"
        assert model.get_tensor_datatype(node.output[0]) == DataType[expected], node.name
    integers = model.transform(ExtractQuantScaleZeroPt()).transform(InferDataTypes())
    for node in integers.graph.node:
        if node.op_type == "Quant":
            expected = DataType[_quantizer_type(node).qonnx_datatype()]
            assert integers.get_tensor_datatype(node.output[0]) == expected, node.name
            assert expected.bitwidth() == _quantizer_type(node).bits
            assert expected.signed() == _quantizer_type(node).signed


def test_weight_quants_fold_into_integer_initializers(cleaned):
    """qonnx 1.0.0 has no pass of its own for this (FINN's FoldQuantWeights is FINN's):
    its scale extraction and filtered constant folding do it, leaving integer weights
    times their power-of-two scale, and the outputs stay QKeras's."""
    model, _, inputs, expected, float_outputs = cleaned
    kinds = {
        node.output[0]: _quantizer_type(node)
        for node in model.graph.node
        if _is_weight_quant(model, node)
    }
    model = model.transform(ExtractQuantScaleZeroPt())
    folded = model.transform(
        FoldConstantsFiltered(
            lambda m, node: (
                node.op_type in ("Div", "Quant")
                and all(m.get_initializer(name) is not None for name in node.input)
            )
        )
    )
    assert not any(_is_weight_quant(folded, node) for node in folded.graph.node)
    # Float layers (no kernel quantizer) keep their float weights.
    macs = [
        node
        for node in folded.graph.node
        if node.op_type in ("Conv", "MatMul") and node.input[1] in kinds
    ]
    assert macs
    for node in macs:
        # Integer codes, times the scale where it is not 1.
        scaling = folded.find_producer(node.input[1])
        assert scaling is None or scaling.op_type == "Mul", node.name
        codes = folded.get_initializer(node.input[1] if scaling is None else scaling.input[0])
        assert codes is not None and np.array_equal(codes, np.round(codes)), node.name
        datatype = DataType[kinds[node.input[1]].qonnx_datatype()]
        assert datatype.allowed(codes).all(), node.name
    _assert_qkeras_outputs(qonnx_outputs(folded, inputs), expected, float_outputs)


def _assert_qkeras_outputs(results, expected, float_outputs, message=""):
    """Outputs computed in fixed point equal QKeras's exactly; float ones within the tolerance."""
    for index, (result, reference) in enumerate(zip(results, expected, strict=True)):
        if index in float_outputs:
            allowed = FLOAT_TOLERANCE * max(1.0, float(np.max(np.abs(reference))))
            assert np.max(np.abs(result - reference)) <= allowed, (message, index)
        else:
            np.testing.assert_array_equal(result, reference, err_msg=message)


def _float_outputs(onnx_model) -> set[int]:
    """The outputs the export says are computed after a float op, by position (qonnx's
    cleanup renames them)."""
    metadata = {entry.key: entry.value for entry in onnx_model.metadata_props}
    names = json.loads(metadata.get("bnfold.float_tail", '{"outputs": []}'))["outputs"]
    return {i for i, tensor in enumerate(onnx_model.graph.output) if tensor.name in names}


def test_channels_first_feature_map_output():
    """A model whose output is a feature map: with channels_first the output is NCHW too,
    labelled so, and verified against QKeras's NHWC output transposed."""
    model = builders.feature_map()
    sources = [builders.INPUT_QUANTIZER]
    onnx_model = bnfold.export_onnx(model, source_quantizers=sources, channels_first=True)
    wrapped = ModelWrapper(onnx_model)
    output = onnx_model.graph.output[0].name
    assert wrapped.get_tensor_shape(output) == [1, 6, 10, 10]
    assert wrapped.get_tensor_layout(output) == ["N", "C", "H", "W"]
    assert not wrapped.get_nodes_by_op_type("Transpose")
    # The export verified itself on these samples; the layout round trip must too.
    inputs = sample_inputs(model, [FixedPoint.from_quantizer(sources[0])], 8)
    (result,) = qonnx_outputs(onnx_model, inputs)
    np.testing.assert_array_equal(result, model.predict(inputs[0], verbose=0))
