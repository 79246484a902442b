"""Walking a Keras model's layer graph in execution order, nested models included.

Several stages need to push something other than tensors through a model:
fixed-point types (accumulator inference), layer-to-tensor records (stripping
quantizers). ``propagate`` runs a model's graph as Keras would, calling a
function on each layer with the values that reach it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from bnfold.keras import keras

Value = TypeVar("Value")
# visit(layer, values reaching it, its path) -> one value per output of the layer.
Visit = Callable[[Any, list[Any], str], list[Any]]


def layer_path(prefix: str, layer: Any) -> str:
    """The name of a layer inside nested models, e.g. ``"block/conv"``."""
    return f"{prefix}{layer.name}"


def propagate(
    model: keras.Model, inputs: Sequence[Value], visit: Visit, prefix: str = ""
) -> list[Value]:
    """Run ``visit`` over every layer of ``model`` in execution order.

    Nested models are entered, not visited: their layers are visited with paths
    prefixed by the nested model's name. A shared layer is visited once per call.

    Args:
        model: a built Keras model.
        inputs: one value per model input.
        visit: called with each layer, the values of its inputs (in call order)
            and its path; returns one value per layer output.
        prefix: path prefix of ``model``'s layers.

    Returns:
        One value per model output.
    """
    if not getattr(model, "_is_graph_network", False):
        values = list(inputs)
        for layer in model.layers:
            values = _call(layer, values, visit, prefix)
        return values
    computed: dict[str, Any] = {}
    for tensor, value in zip(model.inputs, inputs, strict=True):
        computed[str(id(tensor))] = value
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if node.is_input or any(i not in computed for i in node.flat_input_ids):
                continue
            values = [computed[i] for i in node.flat_input_ids]
            outputs = _call(node.layer, values, visit, prefix)
            computed.update(zip(node.flat_output_ids, outputs, strict=True))
    return [computed[str(id(tensor))] for tensor in model.outputs]


def _call(layer: Any, values: list[Any], visit: Visit, prefix: str) -> list[Any]:
    if isinstance(layer, keras.Model):
        return propagate(layer, values, visit, prefix=f"{layer_path(prefix, layer)}/")
    return visit(layer, values, layer_path(prefix, layer))


def iter_layers(model: keras.Model, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every layer of ``model`` with its path, nested models' layers included (after them)."""
    for layer in model.layers:
        yield layer_path(prefix, layer), layer
        if isinstance(layer, keras.Model):
            yield from iter_layers(layer, f"{layer_path(prefix, layer)}/")
