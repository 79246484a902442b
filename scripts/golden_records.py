"""What the golden files record about a model, and how two recordings differ.

Shared by ``scripts/make_golden.py`` (which writes the files, or with ``--check``
compares a fresh rebuild with them) and ``tests/test_golden.py`` (which compares
what bnfold computes today from the stored models with them), so that both
report a difference the same way: model, layer, field, old value, new value.

For each model ``golden/<name>.h5`` there are three expected files:

- ``<name>.json``: the source quantizers, each layer's quantizers as stored,
  each MAC layer's inferred types, and the bias quantizers after populating;
- ``<name>.npz``: sample inputs on the source quantizers' grids, the folded
  model's outputs on them, and each MAC layer's kernel and bias exactly as
  QKeras applies them (folded, then quantized);
- ``<name>.onnx.json``: a summary of the exported QONNX model (op counts; per
  layer its ops, Quant node parameters, MAC node attributes and metadata).

Every value is computed from the model *after* filling empty bias quantizers
with ``bnfold.populate_bias_quantizer_from_accumulator``: that is the model the
export writes and hardware runs.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import onnx
from onnx import helper, numpy_helper

import bnfold
from bnfold.accumulator import mac_types
from bnfold.export.verify import qonnx_outputs
from bnfold.folding import folded_layer_type
from bnfold.graph import iter_layers
from bnfold.keras import keras
from bnfold.loading import INPUT_LAYER_HAS_OPTIONAL

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
MODEL_NAMES = (
    "resnet_tiny",
    "kws_dscnn",
    "dense_autoencoder",
    "jet_tagging_mlp",
    "two_in_two_out",
    "nested_blocks",
    "po2_no_bias",
    "tutorial_cnn",
    "softmax_batchnorm_mlp",
    "binary_ternary_po2",
    "separable_gap",
)
MODEL_LEVEL = "(model)"
MISSING = "<missing>"
# Sections of the JSON files whose keys are layer paths, so a difference names its layer.
_LAYER_SECTIONS = ("inputs", "outputs", "layers", "accumulators", "bias_quantizers")
_QUANTIZER_ATTRIBUTES = (
    "kernel_quantizer",
    "depthwise_quantizer",
    "pointwise_quantizer",
    "bias_quantizer",
    "average_quantizer",
)
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# A zip member's timestamp; fixed so that unchanged contents give identical bytes.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class Difference:
    """One value that differs between the stored golden files and a fresh recording."""

    model: str
    layer: str
    field: str
    old: str
    new: str

    def __str__(self) -> str:
        return (
            f"{self.model}: layer {self.layer}, field {self.field}: old {self.old}, new {self.new}"
        )


@dataclass
class Recording:
    """The contents of one model's three expected files."""

    record: dict[str, Any]  # <name>.json
    arrays: dict[str, np.ndarray]  # <name>.npz
    onnx_summary: dict[str, Any]  # <name>.onnx.json


@dataclass
class Loaded:
    """A golden model read from its .h5 file, populated, unfolded and exported once."""

    name: str
    source_quantizers: list[str]
    stored_layers: dict[str, dict[str, Any]]  # quantizers as in the file, before populating
    folded: keras.Model  # bias quantizers populated
    unfolded: keras.Model
    onnx_model: onnx.ModelProto


# ------------------------------------------------------------------------ computing


def load(path: Path, source_quantizers: list[str]) -> Loaded:
    """Read ``path`` with ``bnfold.load_model``, populate and unfold it, and export it.

    The export starts again from the file, as ``python -m bnfold.export`` does,
    and runs bnfold's own verification.
    """
    folded = bnfold.load_model(path)
    stored_layers = layer_quantizers(folded)
    bnfold.populate_bias_quantizer_from_accumulator(folded, source_quantizers)
    return Loaded(
        name=path.stem,
        source_quantizers=list(source_quantizers),
        stored_layers=stored_layers,
        folded=folded,
        unfolded=bnfold.unfold_model(folded),
        onnx_model=bnfold.export_onnx(path, source_quantizers=source_quantizers),
    )


def _quantizer_text(quantizer: Any) -> str | None:
    return None if quantizer is None else str(quantizer)


def _activation_text(activation: Any) -> str | None:
    if activation is None:
        return None
    return getattr(activation, "__name__", None) or str(activation)


def layer_quantizers(model: keras.Model) -> dict[str, dict[str, Any]]:
    """Each layer's class and quantizers as the model holds them (``block/conv`` when nested)."""
    layers = {}
    for path, layer in iter_layers(model):
        entry: dict[str, Any] = {"class": type(layer).__name__}
        for attribute in _QUANTIZER_ATTRIBUTES:
            if hasattr(layer, f"{attribute}_internal"):
                entry[attribute] = _quantizer_text(getattr(layer, f"{attribute}_internal"))
        if hasattr(layer, "quantizer"):
            entry["quantizer"] = _quantizer_text(layer.quantizer)
        elif hasattr(layer, "activation"):
            entry["activation"] = _activation_text(layer.activation)
        if hasattr(layer, "use_bias"):
            entry["use_bias"] = bool(layer.use_bias)
        layers[path] = entry
    return layers


def _input_names(model: keras.Model) -> list[str]:
    return [tensor.name.split(":")[0] for tensor in model.inputs]


def _type_fields(mac: Any, exact: Any) -> dict[str, str]:
    types = mac.types
    if types is None:
        return {"untyped": mac.untyped, "products_summed": mac.weights.products}
    fields = {
        "input": types.input.quantizer_string(),
        "sum_of_products": types.sum_of_products.quantizer_string(),
        "accumulator": types.accumulator.quantizer_string(),
        "accumulator_hls": types.accumulator.hls(),
        "exact_accumulator": exact.types.accumulator.quantizer_string(),
        "products_summed": mac.weights.products,
    }
    if types.before is not None:
        # A separable convolution's depthwise MAC, whose sums the fields above multiply.
        fields |= {
            "depthwise_input": types.before.input.quantizer_string(),
            "depthwise_accumulator": types.before.accumulator.quantizer_string(),
            "depthwise_exact_accumulator": exact.types.before.accumulator.quantizer_string(),
            "depthwise_products_summed": mac.weights.before.products,
        }
    return fields


def record(loaded: Loaded) -> dict[str, Any]:
    """The contents of ``<name>.json``: quantizers, inferred types, populated bias quantizers."""
    model = loaded.folded
    widths = mac_types(model, loaded.source_quantizers)
    exact = mac_types(model, loaded.source_quantizers, mode="weights")
    return {
        "model": loaded.name,
        "source_quantizers": loaded.source_quantizers,
        "inputs": {
            name: {"shape": list(tensor.shape[1:]), "source_quantizer": quantizer}
            for name, tensor, quantizer in zip(
                _input_names(model), model.inputs, loaded.source_quantizers, strict=True
            )
        },
        "outputs": {
            name: {"shape": list(tensor.shape[1:])}
            for name, tensor in zip(model.output_names, model.outputs, strict=True)
        },
        "layers": loaded.stored_layers,
        "accumulators": {path: _type_fields(mac, exact[path]) for path, mac in widths.items()},
        "bias_quantizers": {
            path: _quantizer_text(layer.bias_quantizer_internal)
            for path, layer in iter_layers(model)
            if folded_layer_type(layer) is not None
        },
    }


def _as_list(outputs: Any) -> list[np.ndarray]:
    return list(outputs) if isinstance(outputs, list | tuple) else [outputs]


def keras_outputs(model: keras.Model, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``model``'s outputs on ``inputs`` (keyed by input name), keyed by output name."""
    feed = [inputs[name] for name in _input_names(model)]
    batch = len(feed[0])
    outputs = _as_list(model.predict(feed, verbose=0, batch_size=batch))
    return dict(zip(model.output_names, outputs, strict=True))


def onnx_outputs(
    onnx_model: onnx.ModelProto, inputs: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """QONNX execution (Quant nodes included) of the exported model, one sample at a time."""
    ordered = [inputs[tensor.name] for tensor in onnx_model.graph.input]
    names = [tensor.name for tensor in onnx_model.graph.output]
    return dict(zip(names, qonnx_outputs(onnx_model, ordered), strict=True))


def arrays(loaded: Loaded, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The contents of ``<name>.npz``: inputs, folded outputs, quantized kernels and biases."""
    result = {f"input/{name}": values for name, values in inputs.items()}
    outputs = keras_outputs(loaded.folded, inputs)
    result |= {f"output/{name}": values for name, values in outputs.items()}
    for path, mac in mac_types(loaded.folded, loaded.source_quantizers).items():
        result[f"kernel/{path}"] = mac.weights.kernel
        if mac.weights.bias is not None:
            result[f"bias/{path}"] = mac.weights.bias
    return result


def _metadata(entries: Iterable[Any]) -> dict[str, str]:
    return {entry.key: entry.value for entry in entries}


def _attribute_values(node: onnx.NodeProto) -> dict[str, Any]:
    values = {}
    for attribute in node.attribute:
        value = helper.get_attribute_value(attribute)
        values[attribute.name] = value.decode() if isinstance(value, bytes) else value
    return {name: list(v) if isinstance(v, list | tuple) else v for name, v in values.items()}


def _shape(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value or d.dim_param for d in value.type.tensor_type.shape.dim]


def _scalar_or_list(values: np.ndarray) -> Any:
    flat = [float(value) for value in np.asarray(values, dtype=np.float64).reshape(-1)]
    return flat[0] if len(flat) == 1 else flat


def _add_entry(section: dict[str, Any], key: str, entry: dict[str, Any]) -> None:
    """Add ``entry`` under ``key``, or ``key#2``... for a layer used more than once."""
    candidate, number = key, 1
    while candidate in section:
        number += 1
        candidate = f"{key}#{number}"
    section[candidate] = entry


def _quant_entry(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> dict[str, Any]:
    """A Quant node's parameters and metadata (its layer and role are the keys above it)."""
    _, scale, zeropt, bitwidth = (constants.get(name) for name in node.input)
    entry: dict[str, Any] = {
        "bitwidth": None if bitwidth is None else int(bitwidth),
        "scale": None if scale is None else _scalar_or_list(scale),
        "scale_shape": None if scale is None else list(scale.shape),
        "zeropt": None if zeropt is None else _scalar_or_list(zeropt),
    }
    entry |= _attribute_values(node)
    metadata = _metadata(node.metadata_props)
    return entry | {k: v for k, v in metadata.items() if k not in ("bnfold.layer", "bnfold.role")}


def onnx_summary(onnx_model: onnx.ModelProto) -> dict[str, Any]:
    """The contents of ``<name>.onnx.json``: what the exported QONNX model says, by layer.

    Node names are left out (tf2onnx's naming is not stable); nodes are found
    through their ``bnfold.layer`` metadata. The bnfold version and the model
    file's digest are replaced by placeholders, so that neither a release nor
    re-saving an unchanged model counts as a change.
    """
    graph = onnx_model.graph
    constants = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    datatypes = {
        annotation.tensor_name: _metadata(annotation.quant_parameter_tensor_names)
        for annotation in graph.quantization_annotation
    }
    layers: dict[str, dict[str, Any]] = {}
    for node in graph.node:
        metadata = _metadata(node.metadata_props)
        layer = layers.setdefault(
            metadata.get("bnfold.layer", MISSING), {"ops": Counter(), "quant": {}, "mac": {}}
        )
        layer["ops"][node.op_type] += 1
        if node.op_type == "Quant":
            role = metadata.get("bnfold.role", MISSING)
            _add_entry(layer["quant"], role, _quant_entry(node, constants))
        elif node.op_type in ("Conv", "MatMul", "Gemm"):
            entry = {"op": node.op_type} | _attribute_values(node)
            entry |= {k: v for k, v in metadata.items() if k != "bnfold.layer"}
            _add_entry(layer["mac"], node.op_type, entry)
        elif set(metadata) - {"bnfold.layer"}:
            extra = {k: v for k, v in metadata.items() if k != "bnfold.layer"}
            _add_entry(layer.setdefault("metadata", {}), node.op_type, extra)
    model_metadata = _metadata(onnx_model.metadata_props)
    table = json.loads(model_metadata.pop("bnfold.layers", "[]"))
    for row in table:
        path = row.pop("layer")
        layers.setdefault(path, {"ops": Counter(), "quant": {}, "mac": {}})["table"] = row
    if "bnfold.version" in model_metadata:
        model_metadata["bnfold.version"] = "<bnfold.__version__>"
    if "bnfold.source" in model_metadata:
        model_metadata["bnfold.source"] = _DIGEST.sub(
            "sha256:<digest>", model_metadata["bnfold.source"]
        )
    if "bnfold.verification" in model_metadata:
        verification = json.loads(model_metadata["bnfold.verification"])
        if "tolerance" in verification:
            # Float ops differ by ulps between machines: record that they were within bounds.
            verification["max_difference"] = "<within tolerance>"
        model_metadata["bnfold.verification"] = verification
    if "bnfold.float_tail" in model_metadata:
        tail = json.loads(model_metadata["bnfold.float_tail"])
        for boundary in tail["boundaries"]:
            boundary["tensor"] = "<tf2onnx tensor name>"
        model_metadata["bnfold.float_tail"] = tail
    return {
        "ir_version": onnx_model.ir_version,
        "opsets": {opset.domain or "ai.onnx": opset.version for opset in onnx_model.opset_import},
        "op_counts": dict(sorted(Counter(node.op_type for node in graph.node).items())),
        "inputs": {
            value.name: {"shape": _shape(value), **datatypes.get(value.name, {})}
            for value in graph.input
        },
        "outputs": {
            value.name: {"shape": _shape(value), **datatypes.get(value.name, {})}
            for value in graph.output
        },
        "metadata": model_metadata,
        "layers": {
            path: {**entry, "ops": dict(sorted(entry["ops"].items()))}
            for path, entry in layers.items()
        },
    }


def recording(loaded: Loaded, inputs: dict[str, np.ndarray]) -> Recording:
    """Everything the expected files hold, computed now for ``loaded`` on ``inputs``.

    The JSON parts go through a JSON round trip, so that they compare with the
    stored files as equals (lists, not tuples; no NumPy numbers).
    """
    as_stored = json.loads(json.dumps([record(loaded), onnx_summary(loaded.onnx_model)]))
    return Recording(as_stored[0], arrays(loaded, inputs), as_stored[1])


# ------------------------------------------------------------------------ files


def paths(name: str, directory: Path = GOLDEN) -> dict[str, Path]:
    """The four files of model ``name``."""
    return {
        "h5": directory / f"{name}.h5",
        "json": directory / f"{name}.json",
        "npz": directory / f"{name}.npz",
        "onnx.json": directory / f"{name}.onnx.json",
    }


def read(name: str, directory: Path = GOLDEN) -> Recording:
    """The stored expected files of model ``name``."""
    files = paths(name, directory)
    with np.load(files["npz"], allow_pickle=False) as stored:
        stored_arrays = {key: stored[key] for key in stored.files}
    return Recording(
        json.loads(files["json"].read_text()),
        stored_arrays,
        json.loads(files["onnx.json"].read_text()),
    )


def stored_inputs(recorded: Recording) -> dict[str, np.ndarray]:
    """The sample inputs of a recording, keyed by model input name."""
    return {
        key.removeprefix("input/"): values
        for key, values in recorded.arrays.items()
        if key.startswith("input/")
    }


def _render(value: Any, depth: int, sort_keys: bool) -> str:
    """JSON, indented, with lists of plain values (shapes, scales) kept on one line."""
    inner, outer = "  " * (depth + 1), "  " * depth
    if isinstance(value, dict) and value:
        keys = sorted(value) if sort_keys else list(value)
        items = [f"{inner}{json.dumps(k)}: {_render(value[k], depth + 1, sort_keys)}" for k in keys]
        return "{\n" + ",\n".join(items) + f"\n{outer}}}"
    if isinstance(value, list) and any(isinstance(item, dict | list) for item in value):
        items = [f"{inner}{_render(item, depth + 1, sort_keys)}" for item in value]
        return "[\n" + ",\n".join(items) + f"\n{outer}]"
    return json.dumps(value)


def json_text(value: Any, *, sort_keys: bool = False) -> str:
    """The text of a golden JSON file: one value per line, one trailing newline."""
    return _render(value, 0, sort_keys) + "\n"


def npz_bytes(values: dict[str, np.ndarray]) -> bytes:
    """An .npz archive ``np.load`` reads, with fixed timestamps so equal arrays give equal bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key in sorted(values):
            member = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE)
            member.compress_type = zipfile.ZIP_DEFLATED
            data = io.BytesIO()
            np.lib.format.write_array(data, np.ascontiguousarray(values[key]), allow_pickle=False)
            archive.writestr(member, data.getvalue())
    return buffer.getvalue()


def write(name: str, recorded: Recording, directory: Path = GOLDEN) -> list[Path]:
    """Write the expected files whose contents changed; return those written."""
    files = paths(name, directory)
    contents = {
        "json": json_text(recorded.record).encode(),
        "npz": npz_bytes(recorded.arrays),
        "onnx.json": json_text(recorded.onnx_summary, sort_keys=True).encode(),
    }
    written = []
    for kind, data in contents.items():
        path = files[kind]
        if path.is_file() and path.read_bytes() == data:
            continue
        path.write_bytes(data)
        written.append(path)
    return written


# ------------------------------------------------------------------------ comparing

_ABSENT = object()  # a key one side lacks


def _union(old: dict[Any, Any], new: dict[Any, Any]) -> list[Any]:
    """The keys of ``old`` in order, then those only ``new`` has."""
    return [*old, *(key for key in new if key not in old)]


def _show(value: Any) -> str:
    return MISSING if value is _ABSENT else json.dumps(value)


def _flatten(value: Any, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Leaf values of nested dicts (and lists of dicts) by key path; scalar lists are leaves."""
    if isinstance(value, dict) and value:
        items: Iterable[tuple[str, Any]] = ((str(k), v) for k, v in value.items())
    elif isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return {path: value}
    flat = {}
    for key, item in items:
        flat |= _flatten(item, (*path, key))
    return flat


def _changed_leaves(old: Any, new: Any) -> list[tuple[tuple[str, ...], Any, Any]]:
    """(path, old, new) for every leaf that differs; a missing side is ``_ABSENT``."""
    old_flat, new_flat = _flatten(old), _flatten(new)
    changes = []
    for path in _union(old_flat, new_flat):
        before, after = old_flat.get(path, _ABSENT), new_flat.get(path, _ABSENT)
        if before is _ABSENT or after is _ABSENT or before != after:
            changes.append((path, before, after))
    return changes


def compare_json(model: str, old: Any, new: Any, prefix: str) -> list[Difference]:
    """Every leaf of ``old`` and ``new`` that differs, missing keys included.

    ``prefix`` names the file in each field (``json``, ``onnx``). Below a
    layer-keyed section the key is the layer: ``layers.fc1.kernel_quantizer`` is
    layer ``fc1``, field ``json.layers.kernel_quantizer``.
    """
    differences = []
    for path, before, after in _changed_leaves(old, new):
        if len(path) > 1 and path[0] in _LAYER_SECTIONS:
            layer, field = path[1], ".".join((prefix, path[0], *path[2:]))
        else:
            layer, field = MODEL_LEVEL, ".".join((prefix, *path))
        differences.append(Difference(model, layer, field, _show(before), _show(after)))
    return differences


def _describe(values: np.ndarray | None) -> str:
    return MISSING if values is None else f"{values.dtype}{list(values.shape)}"


def _array_change(old: np.ndarray, new: np.ndarray) -> tuple[str, str] | None:
    """How two arrays differ, as (old, new) texts; None when they are equal value for value."""
    if old.dtype != new.dtype or old.shape != new.shape:
        return _describe(old), _describe(new)
    unequal = ~((old == new) | (np.isnan(old) & np.isnan(new)))
    if not unequal.any():
        return None
    first = tuple(int(i) for i in np.argwhere(unequal)[0])
    count = f"{int(unequal.sum())} of {unequal.size} values differ"
    return f"{old[first].item()!r} at {list(first)}", f"{new[first].item()!r} ({count})"


def compare_arrays(
    model: str, old: dict[str, np.ndarray], new: dict[str, np.ndarray], label: str = ""
) -> list[Difference]:
    """Every array that differs; ``kernel/block/conv`` is layer ``block/conv``, field ``kernel``.

    Values are compared exactly (0.0 equals -0.0; NaN equals NaN). ``label``
    prefixes the field, e.g. "unfolded" for outputs computed by another route.
    """
    differences = []
    for key in _union(old, new):
        kind, _, layer = key.partition("/")
        if key not in old or key not in new:
            change = (_describe(old.get(key)), _describe(new.get(key)))
        else:
            change = _array_change(np.asarray(old[key]), np.asarray(new[key]))
        if change is not None:
            field = f"{label} {kind}".strip()
            differences.append(Difference(model, layer, field, *change))
    return differences


def compare(model: str, old: Recording, new: Recording) -> list[Difference]:
    """Every difference between two recordings of ``model``, file by file."""
    return [
        *compare_json(model, old.record, new.record, "json"),
        *compare_arrays(model, old.arrays, new.arrays),
        *compare_json(model, old.onnx_summary, new.onnx_summary, "onnx"),
    ]


def _config_fields(config: dict[str, Any], prefix: str = "") -> dict[tuple[str, ...], Any]:
    """A saved model config by (layer path, field...), nested models entered."""
    body = config["config"]
    fields = {
        (prefix.rstrip("/") or MODEL_LEVEL, *path): value
        for path, value in _flatten({k: v for k, v in body.items() if k != "layers"}).items()
    }
    for entry in body.get("layers", []):
        path = f"{prefix}{entry['config']['name']}"
        if "layers" in entry["config"]:
            fields |= _config_fields(entry, f"{path}/")
            entry = {k: v for k, v in entry.items() if k != "config"}
        fields |= {(path, *key): value for key, value in _flatten(entry).items()}
    return fields


def h5_contents(
    path: Path,
) -> tuple[dict[tuple[str, ...], Any], dict[tuple[str, str], np.ndarray]]:
    """A Keras .h5 file's model config by (layer, field...) and its weights by (layer, name)."""

    def text(value: Any) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    with h5py.File(path, "r") as file:
        config = _config_fields(json.loads(text(file.attrs["model_config"])))
        weights = {}
        group = file["model_weights"]
        for layer in map(text, group.attrs["layer_names"]):
            for weight in map(text, group[layer].attrs["weight_names"]):
                weights[(layer, weight)] = np.asarray(group[layer][weight])
    return config, weights


def _as_this_keras_saves(config: dict[tuple[str, ...], Any]) -> dict[tuple[str, ...], Any]:
    """A stored config as the running Keras would save the same model.

    The one per-stack difference in golden/: the reference stack's tf_keras
    saves ``optional: false`` in every InputLayer config, and a Keras without
    that argument (TensorFlow 2.15's) saves nothing there.
    """
    if INPUT_LAYER_HAS_OPTIONAL:
        return config
    inputs = {
        key[0]
        for key, value in config.items()
        if key[1:] == ("class_name",) and value == "InputLayer"
    }
    return {
        key: value
        for key, value in config.items()
        if not (key[0] in inputs and key[1:] == ("config", "optional") and value is False)
    }


def compare_h5(model: str, old: Path, new: Path) -> list[Difference]:
    """Differences in model config and weights between two .h5 files (not their bytes)."""
    old_config, old_weights = h5_contents(old)
    old_config = _as_this_keras_saves(old_config)
    new_config, new_weights = h5_contents(new)
    differences = []
    for key in _union(old_config, new_config):
        before, after = old_config.get(key, _ABSENT), new_config.get(key, _ABSENT)
        if before is _ABSENT or after is _ABSENT or before != after:
            field = ".".join(("h5 config", *key[1:]))
            differences.append(Difference(model, key[0], field, _show(before), _show(after)))
    for group, weight in _union(old_weights, new_weights):
        before, after = old_weights.get((group, weight)), new_weights.get((group, weight))
        if before is None or after is None:
            change = (_describe(before), _describe(after))
        else:
            change = _array_change(before, after)
        if change is not None:
            layer, field = _weight_layer(group, weight)
            differences.append(Difference(model, layer, f"h5 weight {field}", *change))
    return differences


def _weight_layer(group: str, weight: str) -> tuple[str, str]:
    """Layer path and weight of an .h5 weight: ``conv_b/kernel:0`` in group ``res_block``
    is layer ``res_block/conv_b``, weight ``kernel:0``."""
    owner, _, rest = weight.partition("/")
    if not rest:
        return group, weight
    return (group if owner == group else f"{group}/{owner}"), rest


def format_differences(differences: list[Difference]) -> str:
    """One line per difference, for test failures and ``make_golden.py --check``."""
    return "\n".join(str(difference) for difference in differences)
