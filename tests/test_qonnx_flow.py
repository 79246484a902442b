"""The QONNX / FINN side: qonnx's own passes read bnfold's Quant nodes as the QKeras types.

FINN starts from qonnx's cleanup with the graph input's datatype annotated, infers
datatypes with qonnx, and folds the weight Quant nodes into integer initializers. Every
golden model goes through those steps here, exported as FINN reads it (per-channel
power-of-two kernel scales where QKeras has them).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.extract_quant_scale_zeropt import ExtractQuantScaleZeroPt
from qonnx.transformation.fold_constants import FoldConstantsFiltered
from qonnx.transformation.infer_datatypes import InferDataTypes
from qonnx.util.cleanup import cleanup_model

import bnfold
from bnfold.export.verify import FLOAT_TOLERANCE, qonnx_outputs
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


@pytest.fixture(scope="module", params=MODEL_NAMES)
def cleaned(request):
    """A golden model exported as FINN reads it and cleaned by qonnx, with QKeras's outputs."""
    name = request.param
    sources = json.loads((GOLDEN / f"{name}.json").read_text())["source_quantizers"]
    model = bnfold.load_model(GOLDEN / f"{name}.h5")
    onnx_model = bnfold.export_onnx(model, source_quantizers=sources, verify=False)
    bnfold.populate_bias_quantizer_from_accumulator(model, sources)
    recorded = np.load(GOLDEN / f"{name}.npz")
    inputs = [recorded[f"input/{input_name}"][:SAMPLES] for input_name in model.input_names]
    expected = model.predict(inputs, verbose=0)
    expected = expected if isinstance(expected, list) else [expected]
    float_outputs = _float_outputs(onnx_model)
    return cleanup_model(ModelWrapper(onnx_model)), sources, inputs, expected, float_outputs


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
    for index, (result, reference) in enumerate(
        zip(qonnx_outputs(folded, inputs), expected, strict=True)
    ):
        if index in float_outputs:
            allowed = FLOAT_TOLERANCE * max(1.0, float(np.max(np.abs(reference))))
            assert np.max(np.abs(result - reference)) <= allowed, index
        else:
            np.testing.assert_array_equal(result, reference)


def _float_outputs(onnx_model) -> set[int]:
    """The outputs the export says are computed after a float op, by position (qonnx's
    cleanup renames them)."""
    metadata = {entry.key: entry.value for entry in onnx_model.metadata_props}
    names = json.loads(metadata.get("bnfold.float_tail", '{"outputs": []}'))["outputs"]
    return {i for i, tensor in enumerate(onnx_model.graph.output) if tensor.name in names}
