"""bnfold.finn: FINN's MultiThreshold graphs made to round halves to even, as QKeras does.

The graphs here have the form FINN's ConvertQONNXtoFINN gives a quantized activation
(MultiThreshold with thresholds halfway between levels, an Add for a signed quantizer's
offset, a Mul for the scale), built with qonnx, which executes MultiThreshold. FINN itself
runs in ``scripts/check_finn.py``, which shows the step on the golden models.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.transformation.infer_shapes import InferShapes

from bnfold.finn import RoundHalfToEven, step_round_half_to_even, tensor_grids

SAMPLES = 256
STEP = 0.25  # the activation's grid step


def _finn_activation(signed: bool, input_datatype: str) -> tuple[ModelWrapper, np.ndarray]:
    """x (on a 2**-4 grid) -> MatMul(integer weights) -> Mul(1/2) -> FINN's quantized activation.

    Returns the model and the integer levels its activation has (4 bits).
    """
    levels = np.arange(-8, 8) if signed else np.arange(0, 16)
    thresholds = ((levels[:-1] + 0.5) * STEP)[None, :].astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "weights"], ["products"]),
        helper.make_node("Mul", ["products", "half"], ["sums"]),
        helper.make_node(
            "MultiThreshold",
            ["sums", "thresholds"],
            ["counts"],
            domain="qonnx.custom_op.general",
            out_dtype="INT4" if signed else "UINT4",
            data_layout="NC",
        ),
    ]
    if signed:
        nodes.append(helper.make_node("Add", ["counts", "offset"], ["codes"]))
    nodes.append(helper.make_node("Mul", ["codes" if signed else "counts", "scale"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "finn_activation",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [SAMPLES, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [SAMPLES, 3])],
    )
    model = ModelWrapper(helper.make_model(graph))
    rng = np.random.default_rng(0)
    model.set_initializer("weights", rng.integers(-3, 4, size=(4, 3)).astype(np.float32))
    model.set_initializer("half", np.array(0.5, dtype=np.float32))
    model.set_initializer("thresholds", thresholds)
    model.set_initializer("offset", np.array(levels[0], dtype=np.float32))
    model.set_initializer("scale", np.array(STEP, dtype=np.float32))
    model.set_tensor_datatype("x", DataType[input_datatype])
    return model.transform(InferShapes()), levels


def _run(model: ModelWrapper, x: np.ndarray) -> np.ndarray:
    return execute_onnx(model, {"x": x})["y"]


def _inputs() -> np.ndarray:
    codes = np.random.default_rng(1).integers(-64, 64, size=(SAMPLES, 4))
    return (codes / 16).astype(np.float32)  # FIXED<8,4>: a 2**-4 grid


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_thresholds_round_ties_to_even(signed):
    model, levels = _finn_activation(signed, "FIXED<8,4>")
    x = _inputs()
    sums = (x @ model.get_initializer("weights")) * 0.5
    expected = np.clip(np.round(sums / STEP), levels[0], levels[-1]) * STEP  # half to even
    ties = np.mod(sums / STEP, 1) == 0.5
    assert ties.any() and (~ties).any()
    before = _run(model, x)
    assert not np.array_equal(before, expected)  # FINN's own thresholds: halves go up
    np.testing.assert_array_equal(before[~ties], expected[~ties])
    rounded = step_round_half_to_even(model)
    np.testing.assert_array_equal(_run(rounded, x), expected)


def test_grids_follow_the_graph():
    model, _ = _finn_activation(True, "FIXED<8,4>")
    grids = tensor_grids(model)
    assert grids["x"] == 2.0**-4
    assert grids["products"] == 2.0**-4  # integer weights
    assert grids["sums"] == 2.0**-5
    assert grids["counts"] == 1.0 and grids["y"] == STEP


def test_unknown_grid_leaves_thresholds_alone():
    """A float input has no grid: its ties cannot be told apart, so nothing moves."""
    model, _ = _finn_activation(True, "FLOAT32")
    thresholds = model.get_initializer("thresholds").copy()
    model = model.transform(RoundHalfToEven())
    np.testing.assert_array_equal(model.get_initializer("thresholds"), thresholds)
