"""Quant nodes written as standard ops compute what qonnx's executor computes, value for value."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.export import standard_ops
from bnfold.export.annotate import QONNX_DOMAIN
from bnfold.export.verify import qonnx_outputs

CHANNELS = 4


def _quant_model(
    bits: int,
    signed: bool,
    narrow: bool,
    rounding: str,
    scale: np.ndarray,
    zeropt: float = 0.0,
    opset: int = 13,
) -> onnx.ModelProto:
    """One Quant node between a graph input and output of shape (1, CHANNELS)."""
    node = helper.make_node(
        "Quant",
        ["x", "scale", "zeropt", "bitwidth"],
        ["y"],
        domain=QONNX_DOMAIN,
        signed=int(signed),
        narrow=int(narrow),
        rounding_mode=rounding,
    )
    constants = [
        numpy_helper.from_array(np.asarray(scale, np.float32), "scale"),
        numpy_helper.from_array(np.array(zeropt, np.float32), "zeropt"),
        numpy_helper.from_array(np.array(bits, np.float32), "bitwidth"),
    ]
    graph = helper.make_graph(
        [node],
        "quant",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, CHANNELS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, CHANNELS])],
        constants,
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(QONNX_DOMAIN, 1)],
    )


def _inputs(scale: np.ndarray, bits: int) -> np.ndarray:
    """Grid points, ties, near-ties and values beyond both ends, in units of ``scale``."""
    rng = np.random.default_rng(bits)
    top = 2.0**bits
    codes = np.concatenate(
        [
            np.arange(-8, 8, 0.5),  # every tie between -8 and 8
            rng.integers(-int(top) - 3, int(top) + 3, 64) + rng.choice([0, 0.5, 0.49, -0.51], 64),
            [-top - 1, -top / 2 - 0.5, -top / 2, top / 2 - 0.5, top / 2, top - 1.5, top, top + 1],
            [0.0, -0.0, 1e-3, -1e-3],
        ]
    )
    codes = np.resize(codes, (len(codes) // CHANNELS + 1) * CHANNELS).reshape(-1, CHANNELS)
    return (codes * scale).astype(np.float32)


SCALES = {
    "po2": np.array(0.25),
    "not-po2": np.array(0.3),
    "per-channel": np.array([0.5, 0.125, 2.0, 0.0625]),
}


@pytest.mark.parametrize(
    ("bits", "signed", "narrow", "rounding"),
    [
        *itertools.product(
            (2, 4, 8), (True, False), (True, False), ("ROUND", "FLOOR", "CEIL", "HALF_UP")
        ),
        (1, True, False, "ROUND"),  # bipolar
        (1, False, False, "ROUND"),
        (24, True, True, "ROUND"),
        (26, False, False, "HALF_EVEN"),  # bounds not exact in float32
        (24, True, True, "HALF_UP"),  # abs(y) + 0.5 rounds in float32
        (26, False, False, "HALF_UP"),
    ],
)
@pytest.mark.parametrize("scale", list(SCALES), ids=list(SCALES))
def test_quant_as_standard_ops_equals_qonnx(bits, signed, narrow, rounding, scale):
    for zeropt in (0.0, 1.0):
        model = _quant_model(bits, signed, narrow, rounding, SCALES[scale], zeropt)
        assert standard_ops.as_standard_ops(model) is not None
        inputs = [_inputs(SCALES[scale], bits)]
        (expected,) = qonnx_outputs(model, inputs)
        (actual,) = qonnx_outputs(model, inputs, one_session=True)
        np.testing.assert_array_equal(actual, expected)
        assert actual.dtype == expected.dtype == np.float32


def _bipolar_quant_model(scale: np.ndarray) -> onnx.ModelProto:
    """One BipolarQuant node between a graph input and output of shape (1, CHANNELS)."""
    node = helper.make_node("BipolarQuant", ["x", "scale"], ["y"], domain=QONNX_DOMAIN)
    graph = helper.make_graph(
        [node],
        "bipolar_quant",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, CHANNELS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, CHANNELS])],
        [numpy_helper.from_array(np.asarray(scale, np.float32), "scale")],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(QONNX_DOMAIN, 1)]
    )


@pytest.mark.parametrize("scale", list(SCALES), ids=list(SCALES))
def test_bipolar_quant_as_standard_ops_equals_qonnx(scale):
    model = _bipolar_quant_model(SCALES[scale])
    assert standard_ops.as_standard_ops(model) is not None
    special = np.array([[np.nan, -np.inf, np.inf, -0.0]], np.float32)
    inputs = [np.concatenate([_inputs(SCALES[scale], 2), special])]
    (expected,) = qonnx_outputs(model, inputs)
    (actual,) = qonnx_outputs(model, inputs, one_session=True)
    np.testing.assert_array_equal(actual, expected)
    assert actual.dtype == expected.dtype == np.float32
    assert np.all(np.abs(actual) == SCALES[scale].astype(np.float32))


@pytest.mark.parametrize(
    "model",
    [
        _quant_model(4, True, False, "HALF_DOWN", np.array(0.25)),  # not written in ops here
        _quant_model(4, True, False, "ROUND", np.array(0.25), opset=10),  # before Round
    ],
    ids=["half-down", "opset-10"],
)
def test_what_standard_ops_cannot_express_runs_in_qonnx(model):
    assert standard_ops.as_standard_ops(model) is None
    inputs = [_inputs(np.array(0.25), 4)]
    (expected,) = qonnx_outputs(model, inputs)
    np.testing.assert_array_equal(qonnx_outputs(model, inputs, one_session=True)[0], expected)
