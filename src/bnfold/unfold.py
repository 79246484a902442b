"""unfold_model: the same network with every folded layer replaced by its plain layer."""

from __future__ import annotations

from typing import Any

from bnfold.folding import convert_folded_layer_to_unfolded, folded_layer_type
from bnfold.keras import keras, qkeras


def _live_settings(layer: Any) -> dict[str, Any]:
    """The layer's config with its quantizer and activation objects in place of their configs.

    A quantizer serialized by ``get_config`` loses fields such as ``scale_axis``;
    handing the objects themselves to the copy keeps it computing the same.
    """
    config = layer.get_config()
    for key in config:
        if hasattr(layer, f"{key}_internal"):
            config[key] = getattr(layer, f"{key}_internal")
    if isinstance(layer, qkeras.QActivation):
        config["activation"] = layer.quantizer
    elif "activation" in config and callable(getattr(layer, "activation", None)):
        config["activation"] = layer.activation
    return config


def _unfolded_layer(layer: Any) -> Any:
    """The layer that stands for ``layer`` in the unfolded model, without its weights yet."""
    if folded_layer_type(layer) is not None:
        return convert_folded_layer_to_unfolded(layer)
    if isinstance(layer, keras.Model):
        return unfold_model(layer)
    return type(layer).from_config(_live_settings(layer))


def _same_layer(layer: Any) -> Any:
    """A new layer of the same class and settings, without its weights yet."""
    if isinstance(layer, keras.Model):
        return copy_model(layer)
    return type(layer).from_config(_live_settings(layer))


def _copy_weights(model: keras.Model, copy: keras.Model) -> None:
    """Give copied layers their weights; unfolded layers and nested models already have theirs."""
    for layer in model.layers:
        new = copy.get_layer(layer.name)
        if type(new) is type(layer) and not isinstance(layer, keras.Model):
            new.set_weights(layer.get_weights())


def unfold_model(model: keras.Model) -> keras.Model:
    """Replace every folded batchnorm layer of a model by a plain QKeras layer.

    Each QConv2DBatchnorm, QDepthwiseConv2DBatchnorm and QDenseBatchnorm becomes
    a QConv2D, QDepthwiseConv2D or QDense holding the folded weights; every
    other layer is copied with its weights and name. Works for Sequential and
    functional models with several inputs and outputs, skip connections, shared
    layers and nested models (unfolded recursively). The new model computes
    what ``model`` computes at inference, bit for bit.

    Args:
        model: a built Keras model, left unchanged.

    Returns:
        A new model with no folded layer in it.
    """
    unfolded = keras.models.clone_model(model, clone_function=_unfolded_layer)
    _copy_weights(model, unfolded)
    return unfolded


def copy_model(model: keras.Model) -> keras.Model:
    """An independent copy of ``model`` with the same layers, weights and quantizer objects.

    Used where a stage changes a model (populating bias quantizers) that the
    caller handed in and expects unchanged.
    """
    copy = keras.models.clone_model(model, clone_function=_same_layer)
    _copy_weights(model, copy)
    return copy
