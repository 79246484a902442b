from __future__ import annotations

import numpy as np
import pytest

import bnfold
import builders
from bnfold.folding import FOLDED_LAYER_TYPES, folded_layer_type
from bnfold.keras import keras


def _outputs(model, inputs):
    result = model.predict(inputs, verbose=0)
    return result if isinstance(result, list) else [result]


def _leaf_layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _leaf_layers(layer)
        else:
            yield layer


@pytest.mark.parametrize("name", sorted(builders.BUILDERS))
def test_unfolded_outputs_equal_folded_bit_for_bit(folded_models, name):
    model = folded_models[name]
    inputs = builders.grid_inputs(model)
    unfolded = bnfold.unfold_model(model)
    for folded_out, unfolded_out in zip(
        _outputs(model, inputs), _outputs(unfolded, inputs), strict=True
    ):
        assert np.std(folded_out) > 0, "a constant output would prove nothing"
        np.testing.assert_array_equal(unfolded_out, folded_out)


@pytest.mark.parametrize("name", sorted(builders.BUILDERS))
def test_no_folded_layer_remains_and_other_layers_keep_names_and_weights(folded_models, name):
    model = folded_models[name]
    unfolded = bnfold.unfold_model(model)
    leaves = {layer.name: layer for layer in _leaf_layers(model)}
    for layer in _leaf_layers(unfolded):
        assert folded_layer_type(layer) is None
        original = leaves.pop(layer.name)
        if folded_layer_type(original) is not None:
            assert type(layer) is FOLDED_LAYER_TYPES[type(original).__name__].plain
        else:
            assert type(layer) is type(original)
            for new, old in zip(layer.get_weights(), original.get_weights(), strict=True):
                np.testing.assert_array_equal(new, old)
    assert not leaves, f"layers lost in unfolding: {sorted(leaves)}"


@pytest.mark.parametrize("name", sorted(builders.BUILDERS))
def test_model_passed_in_is_left_unchanged(name):
    model = builders.BUILDERS[name]()
    weights = [w.copy() for w in model.get_weights()]
    config = model.get_config()
    inputs = builders.grid_inputs(model)
    before = _outputs(model, inputs)
    unfolded = bnfold.unfold_model(model)
    unfolded.set_weights([np.zeros_like(w) for w in unfolded.get_weights()])
    assert model.get_config() == config
    for new, old in zip(model.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(new, old)
    for now, then in zip(_outputs(model, inputs), before, strict=True):
        np.testing.assert_array_equal(now, then)


def test_shared_layer_stays_one_layer(folded_models):
    unfolded = bnfold.unfold_model(folded_models["multi_io"])
    shared = unfolded.get_layer("shared_dense")
    assert len(shared.inbound_nodes) == 2
    assert [layer.name for layer in unfolded.layers].count("shared_dense") == 1


def test_nested_models_are_unfolded_recursively(folded_models):
    unfolded = bnfold.unfold_model(folded_models["nested"])
    assert isinstance(unfolded.get_layer("stem"), keras.Sequential)
    assert type(unfolded.get_layer("dw_block").get_layer("dw")).__name__ == "QDepthwiseConv2D"
    assert type(unfolded.get_layer("stem").get_layer("conv")).__name__ == "QConv2D"


def test_quantizer_objects_are_carried_over_with_fields_config_would_drop():
    quantizer = bnfold.keras.quantizers.quantized_bits(4, 0, 1, alpha="auto_po2")
    quantizer.scale_axis = 0  # not part of get_config in QKeras 0.9.0
    inputs = keras.Input((6,))
    outputs = bnfold.keras.qkeras.QDense(3, kernel_quantizer=quantizer, name="d")(inputs)
    unfolded = bnfold.unfold_model(keras.Model(inputs, outputs))
    assert unfolded.get_layer("d").kernel_quantizer_internal is quantizer
