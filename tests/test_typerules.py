"""Layers that move, repeat or merge values: their type rules against the numbers Keras
computes, and models a QKeras user builds with them exported bit for bit."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest

import bnfold
import builders
from bnfold import typerules
from bnfold.accumulator import infer_types
from bnfold.export.verify import FLOAT_TOLERANCE, qonnx_outputs, sample_inputs
from bnfold.fixedpoint import FixedPoint
from bnfold.keras import keras

layers = keras.layers
SOURCE = builders.INPUT_QUANTIZER
MODELS = {
    "unet_decoder": builders.unet_decoder,
    "sequence_decoder": builders.sequence_decoder,
    "merge_block": builders.merge_block,
    "averages": builders.averages,
}


@pytest.fixture(scope="module")
def exported():
    """Each model with its export, built and exported once."""
    result = {}
    for name, build in MODELS.items():
        model = build()
        sources = [SOURCE] * len(model.inputs)
        result[name] = (model, bnfold.export_onnx(model, source_quantizers=sources))
    return result


def _predictions(model: keras.Model, inputs: list[np.ndarray]) -> list[np.ndarray]:
    outputs = model.predict(inputs, verbose=0)
    return outputs if isinstance(outputs, list) else [outputs]


# Outputs computed after a float op (the mean of three): within the float tolerance.
FLOAT_OUTPUTS = {"averages": {"head3"}}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_export_passes_full_check_and_equals_qkeras_bit_for_bit(exported, name):
    model, onnx_model = exported[name]
    onnx.checker.check_model(onnx_model, full_check=True)
    inputs = sample_inputs(model, [FixedPoint.from_quantizer(SOURCE)] * len(model.inputs), 64)
    for output, result, expected in zip(
        model.output_names,
        qonnx_outputs(onnx_model, inputs),
        _predictions(model, inputs),
        strict=True,
    ):
        if output in FLOAT_OUTPUTS.get(name, ()):
            scale = max(1.0, float(np.max(np.abs(expected))))
            np.testing.assert_allclose(result, expected, rtol=0, atol=FLOAT_TOLERANCE * scale)
        else:
            np.testing.assert_array_equal(result, expected)


@pytest.mark.parametrize(
    ("name", "ops"),
    [
        ("unet_decoder", {"Resize", "Concat", "Slice", "Pad", "Transpose"}),
        ("sequence_decoder", {"Split", "Slice", "Pad", "Tile"}),
        ("merge_block", {"Sub", "Mul", "Max", "Min", "Add", "Concat", "Transpose"}),
    ],
)
def test_layers_become_the_ops_the_layer_table_names(exported, name, ops):
    _, onnx_model = exported[name]
    assert ops <= {node.op_type for node in onnx_model.graph.node}


def test_only_the_average_of_three_leaves_its_next_layer_without_accumulator(exported):
    model, _ = exported["averages"]
    macs = infer_types(model, [SOURCE]).macs
    assert macs["head2"].types is not None and macs["head4"].types is not None
    assert macs["head3"].types is None
    assert "averages 3 values, not a power of two" in macs["head3"].untyped


# --------------------------------------------- the rules against the numbers Keras computes


def _grid_points(fixed: FixedPoint, rng: np.random.Generator, count: int = 6) -> np.ndarray:
    """The type's extremes, zero and random values of it."""
    codes = rng.integers(round(fixed.min / fixed.step), round(fixed.max / fixed.step) + 1, count)
    return np.concatenate([[fixed.min, fixed.max, 0.0], codes * fixed.step])


def _merge_outputs(layer, types: list[FixedPoint]) -> np.ndarray:
    """The layer applied to every combination of values of its input types."""
    rng = np.random.default_rng(11)
    combinations = np.array(
        list(itertools.product(*(_grid_points(fixed, rng) for fixed in types))), np.float32
    )
    return layer([keras.backend.constant(column[:, None]) for column in combinations.T]).numpy()


def _inferred(model: keras.Model, name: str) -> tuple[list[FixedPoint], FixedPoint]:
    values, outputs = infer_types(model, [SOURCE] * len(model.inputs)).layers[name]
    return values, outputs[0]


@pytest.mark.parametrize(
    ("model_name", "layer", "tight"),
    [
        ("merge_block", "residual", True),
        ("merge_block", "gated", True),
        ("merge_block", "upper", True),
        ("merge_block", "lower", True),
        # Add grows by ceil(log2(3)) = 2 integer bits, as hls4ml and qtools do; its three
        # inputs' largest magnitudes differ, so their sum needs one bit less.
        ("merge_block", "total", False),
        ("averages", "mean2", True),
        ("averages", "mean4", True),
        ("averages", "joined", True),
    ],
)
def test_merge_types_hold_every_value_keras_computes_and_reach_their_ends(
    exported, model_name, layer, tight
):
    """Contained: every output is a value of the type. Tight: the extremes of the outputs
    need the type's integer bits and the grid its fractional bits."""
    model, _ = exported[model_name]
    inputs, result = _inferred(model, layer)
    outputs = _merge_outputs(model.get_layer(layer), inputs)
    assert result.contains(outputs), (result, outputs.min(), outputs.max())
    narrower = FixedPoint(result.bits - 1, result.integer - 1, result.signed, result.narrow)
    coarser = FixedPoint(result.bits - 1, result.integer, result.signed, result.narrow)
    assert not coarser.contains(outputs)
    assert narrower.contains(outputs) != tight


def test_subtract_of_unsigned_values_is_signed_within_their_magnitude():
    relu = FixedPoint(4, 1, False)  # quantized_relu(4,1): 0 .. 1.875
    fine = FixedPoint(5, 0, False)  # quantized_relu(5,0): 0 .. 0.96875
    difference = typerules.subtract(None, [relu, fine])
    assert difference == FixedPoint(7, 1, True, narrow=True)
    assert difference.holds(0 - fine.max, relu.max)
    assert typerules.subtract(None, [relu, relu]) == FixedPoint(5, 1, True, narrow=True)


def test_multiply_widths_add_and_the_sign_spreads():
    signed, unsigned = FixedPoint(6, 2, True), FixedPoint(4, 0, False)
    assert typerules.multiply(None, [signed, unsigned]) == FixedPoint(10, 2, True, narrow=True)
    assert typerules.multiply(None, [signed, signed, unsigned]) == (
        signed.product(signed).product(unsigned)
    )


def test_bilinear_upsampling_is_fixed_point_only_over_power_of_two_factors():
    value = FixedPoint(5, 2, False)
    bilinear = layers.UpSampling2D((2, 4), interpolation="bilinear", name="up")
    assert typerules.upsampling(bilinear, [value]) == FixedPoint(10, 2, False)
    nearest = layers.UpSampling2D(3, name="nearest")
    assert typerules.upsampling(nearest, [value]) == value
    thirds = layers.UpSampling2D((3, 2), interpolation="bilinear", name="thirds")
    assert "not powers of two" in typerules.upsampling(thirds, [value]).reason
    bicubic = layers.UpSampling2D(2, interpolation="bicubic", name="bicubic")
    assert "'bicubic', in float" in typerules.upsampling(bicubic, [value]).reason


def test_bilinear_output_type_holds_what_keras_computes(exported):
    model, _ = exported["unet_decoder"]
    (value,), result = _inferred(model, "up_bilinear")
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 2**value.bits, (64, 4, 4, 1))
    codes[0] = 0
    codes[1] = 2**value.bits - 1
    outputs = model.get_layer("up_bilinear")(
        keras.backend.constant((codes * value.step).astype(np.float32))
    ).numpy()
    assert result.contains(outputs)
    assert not FixedPoint(result.bits - 1, result.integer, result.signed).contains(outputs)
