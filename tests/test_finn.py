"""bnfold.finn: FINN's MultiThreshold graphs made to round ties as their Quant nodes said.

The graphs here have the form FINN's ConvertQONNXtoFINN gives a quantized activation
(MultiThreshold with thresholds halfway between levels, an Add for a signed quantizer's
offset, a Mul for the scale, the Quant's rounding_mode in the annotation of the tensor it
wrote), built with qonnx, which executes MultiThreshold. FINN itself runs in
``scripts/check_finn.py``, which shows the step on the golden and test models.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.custom_op.general.intquant import resolve_rounding_mode
from qonnx.transformation.infer_shapes import InferShapes
from qonnx.util.basic import get_by_name
from qonnx.util.cleanup import cleanup_model

import bnfold
import builders
from bnfold.finn import RoundHalfToEven, rounding_mode, step_round_half_to_even, tensor_grids

SAMPLES = 256
STEP = 0.25  # the activation's grid step


def _finn_activation(
    signed: bool,
    input_datatype: str,
    rounding: str = "ROUND",
    between: str | None = None,
    factor: int = 2,
) -> tuple[ModelWrapper, np.ndarray]:
    """x (on a 2**-4 grid) -> MatMul(integer weights) -> Mul(1/2) [-> ``between``] -> FINN's
    quantized activation, whose Quant rounded as ``rounding`` (annotated unless ROUND).

    ``between`` is a Resize mode (``"nearest"``, ``"linear"``): a Resize of the last
    axis by ``factor``, with tf2onnx's coordinates for UpSampling2D; or ``"hswish"``:
    ``quantized_hswish``'s hard swish as bnfold exports it (tf2onnx's Select lowered to
    Cast, Mul and Add; TensorFlow's division by 6 folded into a float32(1/6) factor).
    Returns the model and the integer levels its activation has (4 bits).
    """
    levels = np.arange(-8, 8) if signed else np.arange(0, 16)
    thresholds = ((levels[:-1] + 0.5) * STEP)[None, :].astype(np.float32)
    width = 3 if between in (None, "hswish") else 3 * factor
    nodes = [
        helper.make_node("MatMul", ["x", "weights"], ["products"]),
        helper.make_node("Mul", ["products", "half"], ["sums"]),
    ]
    if between == "hswish":
        nodes += [
            helper.make_node("Add", ["sums", "three"], ["shifted"]),
            helper.make_node("Relu", ["shifted"], ["relu"]),
            helper.make_node("LessOrEqual", ["shifted", "six"], ["below"]),
            helper.make_node("Not", ["below"], ["above"]),
            helper.make_node("Cast", ["above"], ["above_float"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["six", "above_float"], ["capped"]),
            helper.make_node("Cast", ["below"], ["below_float"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["below_float", "relu"], ["kept"]),
            helper.make_node("Add", ["kept", "capped"], ["clipped"]),
            helper.make_node("Mul", ["sixth", "clipped"], ["factor"]),
            helper.make_node("Mul", ["sums", "factor"], ["resized"]),
        ]
    elif between is not None:
        coordinates = "half_pixel" if between == "linear" else "tf_half_pixel_for_nn"
        nodes.append(
            helper.make_node(
                "Resize",
                ["sums", "", "scales"],
                ["resized"],
                mode=between,
                coordinate_transformation_mode=coordinates,
                nearest_mode="floor",
            )
        )
    nodes.append(
        helper.make_node(
            "MultiThreshold",
            ["sums" if between is None else "resized", "thresholds"],
            ["counts"],
            domain="qonnx.custom_op.general",
            out_dtype="INT4" if signed else "UINT4",
            data_layout="NC",
        )
    )
    if signed:
        nodes.append(helper.make_node("Add", ["counts", "offset"], ["codes"]))
    nodes.append(helper.make_node("Mul", ["codes" if signed else "counts", "scale"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "finn_activation",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [SAMPLES, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [SAMPLES, width])],
    )
    if rounding != "ROUND":
        annotation = graph.quantization_annotation.add(tensor_name="y")
        annotation.quant_parameter_tensor_names.add(key="rounding_mode", value=rounding)
    model = ModelWrapper(helper.make_model(graph))
    rng = np.random.default_rng(0)
    model.set_initializer("weights", rng.integers(-3, 4, size=(4, 3)).astype(np.float32))
    model.set_initializer("half", np.array(0.5, dtype=np.float32))
    model.set_initializer("scales", np.array([1.0, factor], dtype=np.float32))
    model.set_initializer("three", np.array(3.0, dtype=np.float32))
    model.set_initializer("six", np.array(6.0, dtype=np.float32))
    model.set_initializer("sixth", np.array(1 / 6, dtype=np.float32))
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


def _expected(model: ModelWrapper, x: np.ndarray, levels, rounding: str):
    """What the Quant computes (qonnx's rounding) from what reaches the MultiThreshold,
    and where that is a tie."""
    (threshold,) = model.get_nodes_by_op_type("MultiThreshold")
    context = execute_onnx(model, {"x": x}, return_full_exec_context=True)
    reaching = context[threshold.input[0]].astype(np.float64)
    rounded = resolve_rounding_mode(rounding)(reaching / STEP)
    return np.clip(rounded, levels[0], levels[-1]) * STEP, np.mod(reaching / STEP, 1) == 0.5


@pytest.mark.parametrize("rounding", ["ROUND", "HALF_UP", "HALF_DOWN"])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_thresholds_round_ties_as_the_quant(signed, rounding):
    """FINN's thresholds send every tie up; after the step each goes where the Quant said
    (ROUND: to even, as QKeras; HALF_UP, a ternary activation's: away from zero)."""
    model, levels = _finn_activation(signed, "FIXED<8,4>", rounding)
    x = _inputs()
    expected, ties = _expected(model, x, levels, rounding)
    assert ties.any() and (~ties).any()
    before = _run(model, x)
    np.testing.assert_array_equal(before[~ties], expected[~ties])
    # FINN's halves up are HALF_UP's only where no tie is below zero
    assert np.array_equal(before, expected) == (rounding == "HALF_UP" and not signed)
    rounded = step_round_half_to_even(model)
    np.testing.assert_array_equal(_run(rounded, x), expected)


def test_rounding_not_to_nearest_is_left_alone():
    model, _ = _finn_activation(True, "FIXED<8,4>", "FLOOR")
    thresholds = model.get_initializer("thresholds").copy()
    assert rounding_mode(model, model.get_nodes_by_op_type("MultiThreshold")[0]) == "FLOOR"
    model = model.transform(RoundHalfToEven())
    np.testing.assert_array_equal(model.get_initializer("thresholds"), thresholds)


@pytest.mark.parametrize("between", ["nearest", "linear"])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_thresholds_after_resize_round_to_even(signed, between):
    """A nearest Resize copies values, a linear one by 2 weighs them by quarters: the grid,
    and the ties, go through both."""
    model, levels = _finn_activation(signed, "FIXED<8,4>", between=between)
    x = _inputs()
    expected, ties = _expected(model, x, levels, "ROUND")
    assert ties.any()
    assert tensor_grids(model)["resized"] == 2.0**-5 * (0.25 if between == "linear" else 1)
    np.testing.assert_array_equal(_run(step_round_half_to_even(model), x), expected)


def test_linear_resize_by_three_has_no_known_grid():
    """Weights in thirds are no binary fractions: the thresholds after it move up to the
    next float32, which still sends exactly the ties down."""
    model, levels = _finn_activation(True, "FIXED<8,4>", between="linear", factor=3)
    assert tensor_grids(model)["sums"] == 2.0**-5
    assert tensor_grids(model)["resized"] is None
    x = _inputs()
    expected, _ = _expected(model, x, levels, "ROUND")
    np.testing.assert_array_equal(_run(step_round_half_to_even(model), x), expected)


def test_hard_swish_ties_round_to_even():
    """quantized_hswish: where it saturates, 6 * float32(1/6) is 1.0 and the sums reach the
    thresholds as they are, ties included; their grid is lost in the float32(1/6) factor,
    so the thresholds move to the next float32."""
    model, levels = _finn_activation(False, "FIXED<8,4>", between="hswish")
    grids = tensor_grids(model)
    assert [grids[name] for name in ("below", "above_float", "clipped")] == [1.0, 1.0, 2.0**-5]
    assert grids["factor"] < 2.0**-24  # float32(1/6)'s grid: no tie can be told apart
    x = _inputs()
    expected, ties = _expected(model, x, levels, "ROUND")
    before = _run(model, x)
    assert ties.any() and not np.array_equal(before, expected)
    np.testing.assert_array_equal(_run(step_round_half_to_even(model), x), expected)


def test_grids_follow_the_graph():
    model, _ = _finn_activation(True, "FIXED<8,4>")
    grids = tensor_grids(model)
    assert grids["x"] == 2.0**-4
    assert grids["products"] == 2.0**-4  # integer weights
    assert grids["sums"] == 2.0**-5
    assert grids["counts"] == 1.0 and grids["y"] == STEP


def test_unknown_grid_moves_thresholds_one_float32_up():
    """A float input has no grid: the thresholds whose ties go down move to the next float32,
    the others stay, and exactly the ties (which the input holds) go where the Quant said."""
    model, levels = _finn_activation(True, "FLOAT32")
    thresholds = model.get_initializer("thresholds").copy()
    x = _inputs()
    expected, ties = _expected(model, x, levels, "ROUND")
    assert ties.any()
    model = step_round_half_to_even(model)
    moved = model.get_initializer("thresholds")
    up = np.nextafter(thresholds, np.float32(np.inf))
    np.testing.assert_array_equal(moved, np.where(levels[:-1] % 2 == 0, up, thresholds))
    np.testing.assert_array_equal(_run(model, x), expected)


def test_grids_of_value_copying_ops():
    """Pad adds its constant, Im2Col its pad_value, LeakyRelu scales by its alpha."""
    nodes = [
        helper.make_node("Pad", ["x", "pads", "zero"], ["padded"]),
        helper.make_node("Pad", ["x", "pads", "eighth"], ["padded_eighth"]),
        helper.make_node("Pad", ["x", "pads", "zero"], ["padded_edge"], mode="edge"),
        helper.make_node("Tile", ["x", "repeats"], ["tiled"]),
        helper.make_node("LeakyRelu", ["x"], ["leaky"], alpha=0.25),
        helper.make_node("LeakyRelu", ["x"], ["leaky_third"], alpha=0.3),
        helper.make_node("Clip", ["x", "", "eighth"], ["clipped"]),
    ]
    outputs = ["padded", "padded_eighth", "padded_edge", "tiled", "leaky", "leaky_third", "clipped"]
    graph = helper.make_graph(
        nodes,
        "copies",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
    )
    model = ModelWrapper(helper.make_model(graph))
    model.set_initializer("pads", np.array([0, 1, 0, 1], dtype=np.int64))
    model.set_initializer("repeats", np.array([1, 2], dtype=np.int64))
    model.set_initializer("zero", np.array(0.0, dtype=np.float32))
    model.set_initializer("eighth", np.array(0.125, dtype=np.float32))
    model.set_tensor_datatype("x", DataType["INT4"])
    grids = tensor_grids(model)
    assert [grids[name] for name in outputs] == [1.0, 0.125, 1.0, 1.0, 0.25, None, 0.125]


@pytest.fixture(scope="module")
def ternary_threshold_export():
    model, sources = builders.by_name("quantizer-ternary-threshold")
    return bnfold.export_onnx(model, source_quantizers=sources)


def test_export_carries_rounding_mode_through_qonnx_cleanup(ternary_threshold_export):
    """The ternary activation's HALF_UP is on its Quant's output after FINN's first passes
    rename every tensor (qonnx's cleanup_model, which step_qonnx_to_finn runs)."""
    model = cleanup_model(ModelWrapper(ternary_threshold_export))
    (quant,) = [
        node
        for node in model.get_nodes_by_op_type("Quant")
        if model.get_initializer(node.input[0]) is None
        and get_by_name(node.attribute, "rounding_mode").s == b"HALF_UP"
    ]
    annotation = get_by_name(model.graph.quantization_annotation, quant.output[0], "tensor_name")
    entries = {e.key: e.value for e in annotation.quant_parameter_tensor_names}
    assert entries == {"rounding_mode": "HALF_UP"}
    rounded = [
        a.tensor_name
        for a in model.graph.quantization_annotation
        if any(e.key == "rounding_mode" for e in a.quant_parameter_tensor_names)
    ]
    assert rounded == [quant.output[0]]  # ROUND, the default, is not written
