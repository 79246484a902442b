"""What bnfold checks in a model file's configuration before Keras reads any of it.

A Keras model file is code as much as data: a ``Lambda`` layer carries Python
bytecode that Keras runs while loading, a ``module`` entry makes Keras import a
module by name, and a quantizer string that QKeras cannot parse silently
becomes QKeras's default quantizer. ``check_model_config`` reads the
configuration as plain JSON, without Keras, and refuses all of those, as well
as models deeper or larger than bnfold handles, before anything is built.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bnfold.errors import (
    ModelFileError,
    ModelTooLargeError,
    QuantizerError,
    UnsafeModelError,
    UnsupportedLayerError,
)
from bnfold.quantizer_table import as_quantizer, is_quantizer_name

# Modules a configuration may name: Keras would import any other one.
SAFE_MODULES = ("keras", "tf_keras", "qkeras", "bnfold")
# The largest QKeras models people put on FPGAs (ResNet-style MLPerf Tiny and
# hls4ml models) have a few hundred layers in at most two or three levels of
# nesting; a 2000-layer chain exhausts Python's recursion limit inside Keras.
MAX_LAYERS = 1000
MAX_NESTING = 8
# Classes Keras's functional API adds for TensorFlow calls (``x * 2``): they call
# a TensorFlow function by name, so only arithmetic namespaces are accepted.
_OP_LAMBDAS = ("TFOpLambda", "SlicingOpLambda")
_SAFE_OP_PREFIXES = ("math.", "__operators__.", "nn.")
# Keras's own markers for values in a configuration, and SavedModel tensor specs.
_VALUE_MARKERS = frozenset(
    {"__tuple__", "__tensor__", "__numpy__", "__bytes__", "__typespec__", "function"}
    | {"TypeSpec", "TensorShape"}
)
_MODEL_CLASSES = frozenset({"Sequential", "Functional", "Model"})
# QKeras classes a file saved with an older stack may hold, which QKeras 0.9.0 cannot
# call on any TensorFlow bnfold supports (measured on 2.15 and 2.21): Keras would fail
# rebuilding the model without naming the layer.
_UNCALLABLE = {
    "QConv2DTranspose": (
        "QKeras 0.9.0's layer fails when called on TensorFlow 2.15 and later "
        "(array_ops.stack is gone), so Keras cannot rebuild the model and there is no "
        "QKeras result to reproduce; Keras's Conv2DTranspose exports"
    ),
}
# How many float32 copies of the weights and of the largest activation an export
# holds at its peak (the folded, copied, unfolded and stripped models, TensorFlow's
# graphs, tf2onnx, ONNX initializers, verification). Measured: a QDense of 115M
# weights (460 MB) had grown past 19.6 GB (42 copies) when stopped after 6 minutes.
MEMORY_COPIES = 48
_FLOAT32_BYTES = 4


def default_max_memory() -> int:
    """The memory bnfold may plan to use for one model: the machine's physical memory."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 << 30


@functools.cache
def _custom_classes() -> frozenset[str]:
    """Names of the QKeras and bnfold classes, whose ``activation`` QKeras parses."""
    from bnfold.loading import custom_objects

    return frozenset(custom_objects())


@functools.cache
def _known_classes() -> frozenset[str]:
    """Names of the Keras, QKeras and bnfold classes a configuration may name."""
    from bnfold.keras import keras

    names = set(_custom_classes()) | _MODEL_CLASSES | _VALUE_MARKERS
    for namespace in (keras.layers, keras.initializers, keras.constraints, keras.regularizers):
        names.update(name for name in dir(namespace) if isinstance(getattr(namespace, name), type))
    return frozenset(names - {"Lambda"})


def _layer_configs(config: dict) -> Iterator[tuple[dict, int]]:
    """Every layer config of a model config with its nesting depth (the model itself is 0).

    Walks with an explicit stack: a hostile file may nest far deeper than Python recurses.
    """
    stack = [(config, 0)]
    while stack:
        layer, depth = stack.pop()
        yield layer, depth
        inner = layer.get("config")
        layers = inner.get("layers") if isinstance(inner, dict) else None
        if isinstance(layers, list):
            stack.extend(
                (child, depth + 1) for child in reversed(layers) if isinstance(child, dict)
            )


def _values(config: Any) -> Iterator[dict]:
    """Every dict inside ``config``, ``config`` included, without recursion."""
    stack = [config]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            yield value
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def _layer_name(layer: dict) -> str:
    inner = layer.get("config")
    name = inner.get("name") if isinstance(inner, dict) else None
    return str(name if name is not None else layer.get("name", "?"))


def _unsafe(path: Path, layer: str, what: str) -> UnsafeModelError:
    return UnsafeModelError(
        "A model file may hold only Keras, QKeras and bnfold layers and values, nothing that "
        "runs or imports code while it loads (if you trust the file, load it with "
        f"safe=False or --unsafe-load). Received: {str(path)!r} with layer={layer!r}, {what}"
    )


def _check_object(value: dict, path: Path, layer: str) -> None:
    """Refuse one serialized object that would make Keras run or import code."""
    class_name = value.get("class_name")
    module = value.get("module")
    # Keras looks a "builtins" function up among its own activations and losses.
    builtin_function = module == "builtins" and class_name == "function"
    if (
        module is not None
        and not builtin_function
        and not (
            isinstance(module, str)
            and any(module == safe or module.startswith(f"{safe}.") for safe in SAFE_MODULES)
        )
    ):
        raise _unsafe(path, layer, f"which makes Keras import module {module!r}")
    registered = value.get("registered_name")
    if registered is not None and registered != class_name and registered not in _known_classes():
        raise _unsafe(path, layer, f"which names the registered class {registered!r}")
    if "function_type" in value or class_name == "__lambda__":
        raise _unsafe(path, layer, "a function stored in its configuration")
    if class_name is None or not isinstance(value.get("config", {}), dict | str | list):
        return
    if class_name == "Lambda":
        raise _unsafe(path, layer, "a Lambda layer (its Python code would run)")
    if class_name in _OP_LAMBDAS:
        function = value["config"].get("function") if isinstance(value["config"], dict) else None
        if not (isinstance(function, str) and function.startswith(_SAFE_OP_PREFIXES)):
            raise _unsafe(path, layer, f"a {class_name} calling TensorFlow's {function!r}")
        return
    if not isinstance(class_name, str) or class_name not in _known_classes():
        raise _unsafe(
            path,
            layer,
            f"which uses unknown class {class_name!r} (for a model with custom classes, load "
            "it with their code and pass the model itself)",
        )


def _check_quantizers(layer: dict, path: Path) -> None:
    """Parse every quantizer of a layer with bnfold's parser, as QKeras would read it.

    QKeras replaces a string it cannot parse by its default quantizer without a
    word; bnfold refuses it instead, naming the layer and the string.
    """
    inner = layer.get("config")
    if not isinstance(inner, dict):
        return
    name = _layer_name(layer)
    qkeras_layer = layer.get("class_name") in _custom_classes()
    for key, value in inner.items():
        is_quantizer = key.endswith("quantizer") or (key == "activation" and qkeras_layer)
        if not is_quantizer or value is None:
            continue
        if isinstance(value, str) and not ("(" in value or is_quantizer_name(value)):
            continue  # a Keras activation such as "relu", which Keras looks up by name
        if isinstance(value, dict) and not is_quantizer_name(value.get("class_name")):
            continue
        try:
            as_quantizer(value, layer=name)
        except QuantizerError as error:
            raise QuantizerError(f"{error} Model file: {str(path)!r}.") from None


Shape = tuple[int, ...] | None


def _ints(value: Any) -> list[int] | None:
    """A list of positive ints from a config value (an int or a list of them), else None."""
    values = value if isinstance(value, list) else [value]
    if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        return values
    return None


def _spatial(shape: tuple[int, ...], kernel: list[int], strides: list[int], padding: Any):
    """Spatial dimensions after a window (convolution or pooling), as Keras computes them."""
    dims = []
    for size, window, stride in zip(shape[:-1], kernel, strides, strict=False):
        span = size if padding == "same" else max(size - window + 1, 0)
        dims.append(math.ceil(span / stride))
    return tuple(dims)


def _layer_size(class_name: Any, config: dict, inputs: list[Shape]) -> tuple[int, Shape]:
    """(weights, output shape without batch) of one layer, by the rule its class implies.

    Shapes are followed for the layers whose sizes can grow large (dense,
    convolution, pooling, flatten, concatenation); others keep their input's
    shape. An unknown shape (None) gives 0 weights: the estimate stays a lower bound.
    """
    first = inputs[0] if inputs else None
    if "batch_input_shape" in config and not inputs:
        declared = config["batch_input_shape"]
        dims = declared[1:] if isinstance(declared, list) else []
        return 0, tuple(d if isinstance(d, int) and d > 0 else 1 for d in dims)
    if first is None or len(first) == 0:
        return 0, None
    channels = first[-1]
    kernel = _ints(config.get("kernel_size"))
    if kernel is not None and len(kernel) == 1:
        kernel = kernel * (len(first) - 1)
    strides = _ints(config.get("strides", 1)) or [1]
    if len(strides) == 1:
        strides = strides * (len(first) - 1)
    if _ints(config.get("units")):
        units = config["units"]
        return channels * units + units, (*first[:-1], units)
    if kernel is not None and _ints(config.get("filters")):
        filters = config["filters"]
        weights = math.prod(kernel) * channels * filters + filters
        return weights, (*_spatial(first, kernel, strides, config.get("padding")), filters)
    if kernel is not None and _ints(config.get("depth_multiplier")):
        outputs = channels * config["depth_multiplier"]
        weights = math.prod(kernel) * outputs + outputs
        return weights, (*_spatial(first, kernel, strides, config.get("padding")), outputs)
    pool = _ints(config.get("pool_size"))
    if pool is not None:
        pool = pool * (len(first) - 1) if len(pool) == 1 else pool
        strides = _ints(config.get("strides")) or pool
        strides = strides * (len(first) - 1) if len(strides) == 1 else strides
        return 0, (*_spatial(first, pool, strides, config.get("padding")), channels)
    if class_name == "Flatten":
        return 0, (math.prod(first),)
    if str(class_name).startswith("Global"):
        return 0, (channels,)
    if class_name == "Concatenate" and all(shape is not None for shape in inputs):
        return 0, (*first[:-1], sum(shape[-1] for shape in inputs))
    return 0, first


def _memory_estimate(config: dict) -> tuple[int, str, int]:
    """(bytes an export needs at least, the largest layer, its weights and activation in bytes)."""
    shapes: dict[str, Shape] = {}
    total_weights = largest_activation = 0
    largest = ("", 0)
    previous: Shape = None
    for layer, _ in _layer_configs(config):
        inner = layer.get("config")
        if not isinstance(inner, dict) or layer.get("class_name") in _MODEL_CLASSES:
            continue
        inputs = [shapes.get(name) for name in _inbound_names(layer)]
        if not inputs and previous is not None and "batch_input_shape" not in inner:
            inputs = [previous]  # a Sequential model: the previous layer feeds this one
        try:
            weights, shape = _layer_size(layer.get("class_name"), inner, inputs)
        except (TypeError, ValueError):  # a malformed config: Keras will name it
            weights, shape = 0, None
        shapes[_layer_name(layer)] = previous = shape
        activation = math.prod(shape) if shape is not None else 0
        total_weights += weights
        largest_activation = max(largest_activation, activation)
        size = (weights + activation) * _FLOAT32_BYTES
        if size > largest[1]:
            largest = (_layer_name(layer), size)
    needed = (total_weights + largest_activation) * _FLOAT32_BYTES * MEMORY_COPIES
    return needed, largest[0], largest[1]


def _inbound_names(layer: dict) -> list[str]:
    """Names of the layers feeding a functional model's layer (legacy node format)."""
    names = []
    for node in layer.get("inbound_nodes") or []:
        for tensor in node if isinstance(node, list) else []:
            if isinstance(tensor, list) and tensor and isinstance(tensor[0], str):
                names.append(tensor[0])
    return names


def check_model_config(
    config: Any, path: Path, *, safe: bool = True, max_memory: int | None = None
) -> None:
    """Refuse a model configuration that would run code, or that bnfold cannot handle.

    Args:
        config: the model configuration as Keras saved it (parsed JSON).
        path: the model file, for messages.
        safe: False accepts code (the user trusts the file); the rest is checked.
        max_memory: bytes the export may need (``MEMORY_COPIES`` times the weights
            and the largest activation); None: ``default_max_memory()``.

    Raises:
        UnsafeModelError: a Lambda layer, a function in a configuration, a module
            outside Keras, tf_keras, QKeras and bnfold, or an unknown class.
        QuantizerError: a quantizer string or config bnfold's parser refuses.
        ModelTooLargeError: more than ``MAX_LAYERS`` layers, ``MAX_NESTING`` levels
            of nested models, or declared sizes that need more than ``max_memory``.
        ModelFileError: a configuration that is not a model's, or a layer still
            wrapped for pruning (PruneLowMagnitude).
        UnsupportedLayerError: a QKeras layer QKeras 0.9.0 cannot call on TensorFlow
            2.15 or later (QConv2DTranspose).
    """
    if not isinstance(config, dict) or not isinstance(config.get("class_name"), str):
        raise ModelFileError(
            "A model file's configuration must describe a Keras model. Received: "
            f"{str(path)!r} whose configuration is {type(config).__name__}"
        )
    count = 0
    for layer, depth in _layer_configs(config):
        count += depth > 0 and layer.get("class_name") != "InputLayer"
        if depth > MAX_NESTING and layer.get("class_name") in _MODEL_CLASSES:
            raise ModelTooLargeError(
                f"bnfold reads models nested at most {MAX_NESTING} deep "
                f"(bnfold.config_check.MAX_NESTING). Received: {str(path)!r} whose model "
                f"{_layer_name(layer)!r} is nested {depth} deep"
            )
        if count > MAX_LAYERS:
            raise ModelTooLargeError(
                f"bnfold reads models of at most {MAX_LAYERS} layers "
                f"(bnfold.config_check.MAX_LAYERS). Received: {str(path)!r} with more"
            )
        if layer.get("class_name") == "PruneLowMagnitude":
            raise _pruning_wrapper(layer, path)
        if layer.get("class_name") in _UNCALLABLE:
            raise UnsupportedLayerError(
                f"{layer['class_name']} cannot be exported: {_UNCALLABLE[layer['class_name']]}. "
                f"Received: {str(path)!r} with layer={_layer_name(layer)!r}"
            )
        if safe:
            _check_layer_objects(layer, path)
        _check_quantizers(layer, path)
    limit = default_max_memory() if max_memory is None else max_memory
    needed, layer, size = _memory_estimate(config)
    if needed > limit:
        raise ModelTooLargeError(
            f"A model's declared sizes must fit the memory limit of {_size(limit)} "
            f"(--max-memory; an export holds about {MEMORY_COPIES} copies of the weights and "
            f"of the largest activation). Received: {str(path)!r} needing about "
            f"{_size(needed)}; its largest layer {layer!r} has {_size(size)} of weights and "
            "activation"
        )


def _pruning_wrapper(layer: dict, path: Path) -> ModelFileError:
    """The error for a layer still wrapped for pruning (a checkpoint saved while pruning).

    Measured with tensorflow-model-optimization 0.8.1 (QKeras's own dependency) and
    tf_keras 2.21: in its prune_scope it rebuilds a functional model wrapped whole
    (google/qkeras examples/example_mnist_prune.py), but not hls4ml-tutorial part 4's
    wrapped Sequential MLP ("could not be deserialized properly").
    """
    inner = layer.get("config")
    wrapped = inner.get("layer") if isinstance(inner, dict) else None
    what = (
        f"{wrapped.get('class_name')} {_layer_name(wrapped)!r}"
        if isinstance(wrapped, dict)
        else "a layer"
    )
    return ModelFileError(
        "A pruned model must be saved after tensorflow-model-optimization's strip_pruning "
        "(bnfold does not rebuild the PruneLowMagnitude wrappers pruning adds: strip them "
        "in the training script, model = tfmot.sparsity.keras.strip_pruning(model), and "
        "save again; tfmot's prune_scope loads some such files, not all). Received: "
        f"{str(path)!r} with layer={_layer_name(layer)!r} (PruneLowMagnitude wrapping {what})"
    )


def _size(count: int) -> str:
    """A byte count for people: ``'1.5 GB'``."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{count} bytes"


def _check_layer_objects(layer: dict, path: Path) -> None:
    """Check a layer and every object in its config, but not the layers of a nested model."""
    name = _layer_name(layer)
    own = {key: value for key, value in layer.items() if key != "config"}
    inner = layer.get("config")
    if isinstance(inner, dict):
        own["config"] = {key: value for key, value in inner.items() if key != "layers"}
    for value in _values(own):
        _check_object(value, path, name)
