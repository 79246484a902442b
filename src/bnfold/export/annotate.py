"""Annotate: put the quantization back into the converted graph, as QONNX.

- Each kernel and bias initializer is found by its markers and given the
  values QKeras itself quantized, followed by a QONNX ``Quant`` node whose
  parameters reproduce exactly those values (checked here).
- Each point Mul becomes a ``Quant`` node with the same output.
- Dense layers become MatMul + Add (hls4ml wants them; qonnx's own Gemm
  conversion would drop the node metadata); Conv and pooling nodes get explicit
  pads, strides and dilations; a Reshape that tf2onnx wrote for a layout change
  is a Transpose again, so that layout inference can follow it.
- Graph inputs and outputs carry their ``tensor_layout`` (and inputs their
  ``finn_datatype``) as quantization annotations, for qonnx and FINN; an
  activation Quant whose ``rounding_mode`` is not ROUND, that mode.
- Every node gets ``bnfold.*`` metadata naming its Keras layer; MAC nodes also
  their quantizers and accumulator type; the model a summary.

Anything planned that finds no place in the graph is an error, never skipped.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnfold.errors import ExportError
from bnfold.export.convert import graph_layout
from bnfold.export.strip import (
    PointRecord,
    QuantSpec,
    Stripped,
    WeightRecord,
    marker_index,
    point_constant,
)
from bnfold.finn import ROUNDING_ANNOTATION
from bnfold.graph import propagate

QONNX_DOMAIN = "qonnx.custom_op.general"
QONNX_OPSET = 1
_MAC_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
_SCOPE = re.compile(r"(?:^|/)(bnfold_\d+)(?:/|$)")


def _set_metadata(node: onnx.NodeProto, **entries: str | None) -> None:
    existing = {entry.key: entry for entry in node.metadata_props}
    for key, value in entries.items():
        if value is None:
            continue
        name = f"bnfold.{key}"
        entry = existing.get(name) or node.metadata_props.add()
        entry.key, entry.value = name, str(value)


def _metadata(node: onnx.NodeProto, key: str) -> str | None:
    for entry in node.metadata_props:
        if entry.key == f"bnfold.{key}":
            return entry.value
    return None


def _consumers(graph: onnx.GraphProto) -> defaultdict[str, list[onnx.NodeProto]]:
    """The nodes that read each tensor, by tensor name (an empty list for unread ones)."""
    consumers: defaultdict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    return consumers


def _minimal_broadcast(values: np.ndarray) -> np.ndarray:
    """The smallest array that broadcasts to ``values``: constant axes collapse to 1."""
    for axis in range(values.ndim):
        first = np.take(values, [0], axis=axis)
        if np.all(values == first):
            values = first
    return values


def _parameter_shape(values: np.ndarray | np.float32) -> np.ndarray:
    """A Quant scale or zero point as qonnx's and FINN's passes read it.

    One value for the whole tensor has shape ``(1,)``, as Brevitas writes it:
    qonnx's ``ExtractBiasFromConv`` reshapes any other shape to the bias's, and
    a rank-0 tensor cannot take it. Per-channel values keep their broadcast shape.
    """
    values = np.asarray(values, dtype=np.float32)
    return values.reshape(1) if values.size == 1 else values


class _Annotator:
    def __init__(self, model: onnx.ModelProto, stripped: Stripped) -> None:
        self.model = model
        self.graph = model.graph
        self.stripped = stripped
        self.new_initializers: list[onnx.TensorProto] = []
        self.new_nodes: list[onnx.NodeProto] = []
        # ONNX node name -> Keras layer path, and which of its MACs the node computes
        self.mac_nodes: dict[str, tuple[str, int]] = {}
        self.probes: list[dict[str, Any]] = []
        self.names: set[str] = {node.name for node in self.graph.node}
        self.names |= {tensor.name for tensor in self.graph.initializer}

    def unique(self, name: str) -> str:
        candidate, number = name, 1
        while candidate in self.names:
            candidate, number = f"{name}_{number}", number + 1
        self.names.add(candidate)
        return candidate

    def constant(self, name: str, values: Any) -> str:
        tensor = numpy_helper.from_array(np.asarray(values, dtype=np.float32), self.unique(name))
        self.new_initializers.append(tensor)
        return tensor.name

    def quant_node(
        self,
        source: str,
        output: str,
        quant: QuantSpec,
        scale: np.ndarray | float,
        path: str,
        role: str,
    ) -> onnx.NodeProto:
        fixed = quant.fixed
        base = self.unique(f"{path.replace('/', '_')}_{role}_quant")
        scale_input = self.constant(
            f"{base}_scale", _parameter_shape(np.float32(fixed.step) * scale)
        )
        if quant.node == "BipolarQuant":
            node = helper.make_node(
                "BipolarQuant", [source, scale_input], [output], name=base, domain=QONNX_DOMAIN
            )
        else:
            node = helper.make_node(
                "Quant",
                [
                    source,
                    scale_input,
                    self.constant(f"{base}_zeropt", _parameter_shape(np.float32(0.0))),
                    self.constant(f"{base}_bitwidth", fixed.bits),
                ],
                [output],
                name=base,
                domain=QONNX_DOMAIN,
                signed=int(fixed.signed),
                narrow=int(fixed.narrow),
                rounding_mode=quant.rounding,
            )
        _set_metadata(node, layer=path, role=role, quantizer=quant.quantizer)
        return node

    # ------------------------------------------------------------------ weights

    def weights(self) -> None:
        records = sorted(self.stripped.weights, key=lambda record: record.first_marker)
        starts = np.array([record.first_marker for record in records])
        placed: dict[int, int] = defaultdict(int)
        consumers = _consumers(self.graph)
        for tensor in list(self.graph.initializer):
            if tensor.data_type != onnx.TensorProto.FLOAT:
                continue
            values = numpy_helper.to_array(tensor)
            if values.size == 0:
                continue
            markers = marker_index(values).reshape(-1)
            slot = int(np.searchsorted(starts, markers[0], side="right")) - 1
            if slot < 0:
                continue
            record = records[slot]
            offsets = markers - record.first_marker
            size = record.values.size
            if not np.all((offsets >= 0) & (offsets < size)):
                continue
            if offsets.size != size or np.unique(offsets).size != size:
                raise ExportError(
                    f"The {record.role} of layer {record.path!r} reached ONNX altered "
                    f"(initializer {tensor.name!r} holds part of it)"
                )
            self._place_weight(
                tensor, record, offsets.reshape(values.shape), consumers[tensor.name]
            )
            placed[slot] += 1
        lost = [
            f"{records[i].role} of {records[i].path!r}"
            for i in range(len(records))
            if not placed[i]
        ]
        if lost:
            raise ExportError(
                "Every kernel and bias must reach the ONNX graph unchanged, so that its Quant "
                f"node has a place. Received: no initializer for the {', '.join(lost)}"
            )

    def _place_weight(
        self,
        tensor: onnx.TensorProto,
        record: WeightRecord,
        offsets: np.ndarray,
        consumers: list[onnx.NodeProto],
    ) -> None:
        values = record.values.reshape(-1)[offsets].astype(np.float32)
        tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
        for node in consumers:
            if record.role == "kernel" and node.op_type in _MAC_OPS:
                self.mac_nodes[node.name] = (record.path, record.mac)
            _set_metadata(node, layer=record.path)
        if record.quant is None:
            return
        scale = np.float32(1.0)
        if record.quant.scale is not None:
            full = np.broadcast_to(record.quant.scale, record.values.shape).reshape(-1)
            scale = _minimal_broadcast(full[offsets].astype(np.float32))
        _check_reproduced(values, record, scale)
        output = self.unique(f"{tensor.name}_quantized")
        self.new_nodes.append(
            self.quant_node(tensor.name, output, record.quant, scale, record.path, record.role)
        )
        for node in consumers:
            node.input[:] = [output if name == tensor.name else name for name in node.input]

    # ------------------------------------------------------------------- points

    def points(self) -> None:
        constants = {
            tensor.name: numpy_helper.to_array(tensor)
            for tensor in self.graph.initializer
            if tensor.data_type == onnx.TensorProto.FLOAT
        }
        by_constant = {
            float(point_constant(number)): number for number in range(len(self.stripped.points))
        }
        found: dict[int, int] = defaultdict(int)
        nodes = []
        bypassed: dict[str, str] = {}  # a probe Mul's output -> its input
        for node in self.graph.node:
            value = constants.get(node.input[0]) if node.op_type == "Mul" else None
            number = (
                by_constant.get(float(value)) if value is not None and value.size == 1 else None
            )
            if number is None:
                nodes.append(node)
                continue
            found[number] += 1
            point: PointRecord = self.stripped.points[number]
            if point.quant is None:
                bypassed[node.output[0]] = bypassed.get(node.input[1], node.input[1])
                if point.role == "probe":
                    self.probes.append(
                        {
                            "tensor": bypassed[node.output[0]],
                            "layer": point.path,
                            "input": point.index,
                        }
                    )
                continue
            nodes.append(
                self.quant_node(
                    node.input[1], node.output[0], point.quant, 1.0, point.path, point.role
                )
            )
        lost = [
            f"{p.role} quantizer of {p.path!r}"
            for i, p in enumerate(self.stripped.points)
            if found[i] != 1
        ]
        if lost:
            raise ExportError(
                "Every activation and input quantizer must find exactly one place in the ONNX "
                f"graph. Received: none or several for the {', '.join(lost)}"
            )
        for node in nodes:
            node.input[:] = [bypassed.get(name, name) for name in node.input]
        del self.graph.node[:]
        self.graph.node.extend(nodes)

    def float_tail(self) -> dict[str, str]:
        """``bnfold.float_tail``: the outputs computed in float, and the fixed-point tensors
        float ops read (verified exactly); nothing for a model computed in fixed point."""
        if not self.probes and not self.stripped.float_outputs:
            return {}
        tail = {"outputs": self.stripped.float_outputs, "boundaries": self.probes}
        return {"float_tail": json.dumps(tail)}

    # --------------------------------------------------------------- node forms

    def gemm_to_matmul(self) -> None:
        """Gemm(A, B, C) -> Add(MatMul(A, B), C), with B transposed if transB."""
        nodes = []
        for node in self.graph.node:
            if node.op_type != "Gemm":
                nodes.append(node)
                continue
            attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if (
                attributes.get("transA", 0)
                or attributes.get("alpha", 1.0) != 1.0
                or attributes.get("beta", 1.0) != 1.0
                or attributes.get("transB", 0)
            ):
                raise ExportError(f"Unexpected Gemm form from tf2onnx: {node.name} {attributes}")
            product = self.unique(f"{node.name}_product")
            matmul = helper.make_node(
                "MatMul",
                list(node.input[:2]),
                [product if len(node.input) > 2 else node.output[0]],
                name=self.unique(f"{node.name}_MatMul"),
            )
            matmul.metadata_props.extend(node.metadata_props)
            nodes.append(matmul)
            if node.name in self.mac_nodes:
                self.mac_nodes[matmul.name] = self.mac_nodes.pop(node.name)
            if len(node.input) > 2:
                add = helper.make_node(
                    "Add",
                    [product, node.input[2]],
                    list(node.output),
                    name=self.unique(f"{node.name}_Add"),
                )
                add.metadata_props.extend(node.metadata_props)
                nodes.append(add)
        del self.graph.node[:]
        self.graph.node.extend(nodes)

    def explicit_attributes(self) -> None:
        """hls4ml and qonnx's channels-last pass need pads, strides and dilations written out."""
        for node in self.graph.node:
            if node.op_type not in ("Conv", "MaxPool", "AveragePool"):
                continue
            attributes = {a.name: a for a in node.attribute}
            if "auto_pad" in attributes:
                if attributes["auto_pad"].s not in (b"", b"NOTSET", b"VALID"):
                    raise ExportError(
                        f"tf2onnx left auto_pad={attributes['auto_pad'].s.decode()} on "
                        f"{node.name}; bnfold needs explicit pads"
                    )
                node.attribute.remove(attributes.pop("auto_pad"))
            kernel = (
                list(helper.get_attribute_value(attributes["kernel_shape"]))
                if "kernel_shape" in attributes
                else None
            )
            if kernel is None:
                continue
            defaults = {"pads": [0] * (2 * len(kernel)), "strides": [1] * len(kernel)}
            if node.op_type == "Conv":
                defaults["dilations"] = [1] * len(kernel)
            for name, value in defaults.items():
                if name not in attributes:
                    node.attribute.append(helper.make_attribute(name, value))

    # ----------------------------------------------------------------- metadata

    def layer_metadata(self) -> None:
        """``bnfold.layer`` on every node: from its name's scope, else the one float layer
        with no node of its own between the layers around it, else from its neighbours."""
        scopes = self.stripped.scopes
        for node in self.graph.node:
            if _metadata(node, "layer") is None:
                match = _SCOPE.search(node.name)
                if match and match.group(1) in scopes:
                    _set_metadata(node, layer=scopes[match.group(1)])
        producers = {output: node for node in self.graph.node for output in node.output}
        consumers = _consumers(self.graph)
        self._layers_between(producers, consumers)
        changed = True
        while changed:
            changed = False
            for node in self.graph.node:
                if _metadata(node, "layer") is not None:
                    continue
                neighbours = [producers[name] for name in node.input if name in producers]
                neighbours += [c for name in node.output for c in consumers[name]]
                for neighbour in neighbours:
                    layer = _metadata(neighbour, "layer")
                    if layer is not None:
                        _set_metadata(node, layer=layer)
                        changed = True
                        break
        for node in self.graph.node:
            if node.name not in self.mac_nodes:
                continue
            path, mac = self.mac_nodes[node.name]
            record = self.stripped.layers[path]
            if mac < len(record.earlier_macs):
                _set_metadata(node, **record.earlier_macs[mac].summary())
                continue
            _set_metadata(
                node,
                kernel_quantizer=record.kernel_quantizer,
                bias_quantizer=record.bias_quantizer,
                accumulator=record.accumulator_marker(),
                accumulator_hls=record.accumulator and record.accumulator.hls(),
            )

    def _layers_between(
        self,
        producers: dict[str, onnx.NodeProto],
        consumers: defaultdict[str, list[onnx.NodeProto]],
    ) -> None:
        """Name the layer of each node tf2onnx named outside every scope.

        tf2onnx names some nodes afresh (``Resize__29``: its transpose optimizer
        rebuilds an UpSampling2D's Resize, and its constants), so the name says
        nothing; their neighbours belong to the layers before and after. The node
        computes a float layer that has no named node and lies between those layers
        in the float model; it is taken when there is exactly one.
        """
        scopes = self.stripped.scopes
        float_layer: dict[str, str] = {}  # node name -> the float layer named in it
        for node in self.graph.node:
            for name in (node.name, *node.output):
                match = _SCOPE.search(name)
                if match and match.group(1) in scopes:
                    float_layer[node.name] = match.group(1)
                    break
        named = {layer: layer for layer in float_layer.values()}
        inputs = _float_inputs(self.stripped.model)
        outputs: defaultdict[str, list[str]] = defaultdict(list)
        for layer, sources in inputs.items():
            for source in sources:
                outputs[source].append(layer)
        between: defaultdict[tuple[frozenset[str], frozenset[str]], list[str]]
        between = defaultdict(list)
        for layer in inputs:
            if layer in scopes and layer not in named:
                before = _first_labelled(inputs[layer], named.get, inputs.__getitem__)
                after = _first_labelled(outputs[layer], named.get, outputs.__getitem__)
                between[before, after].append(layer)
        upstream = {
            node.name: [producers[name].name for name in node.input if name in producers]
            for node in self.graph.node
        }
        downstream = {
            node.name: [other.name for name in node.output for other in consumers[name]]
            for node in self.graph.node
        }

        for node in self.graph.node:
            if node.name in float_layer or _metadata(node, "layer") is not None:
                continue
            before = _first_labelled(upstream[node.name], float_layer.get, upstream.__getitem__)
            after = _first_labelled(downstream[node.name], float_layer.get, downstream.__getitem__)
            candidates = between.get((before, after), [])
            if len(candidates) == 1:
                _set_metadata(node, layer=scopes[candidates[0]])

    def output_names(self) -> None:
        """Name the graph outputs after the Keras model's outputs, not the float layers."""
        renames = {}
        for output, name in zip(self.graph.output, self.stripped.output_names, strict=True):
            if output.name != name:
                renames[output.name] = self.unique(name)
                output.name = renames[output.name]
        for node in self.graph.node:
            node.output[:] = [renames.get(name, name) for name in node.output]
            node.input[:] = [renames.get(name, name) for name in node.input]
        for probe in self.probes:
            probe["tensor"] = renames.get(probe["tensor"], probe["tensor"])

    def interface_annotations(self, channels_first: bool) -> None:
        """Each graph input's datatype (FINN reads it) and each input's and output's layout.

        Without ``tensor_layout``, qonnx's ``InferDataLayouts`` (which FINN runs)
        takes a 4-D graph input for NCHW, and labels every tensor after a
        channels-last input wrongly.
        """
        datatypes = {
            point.path: point.quant.fixed.value_datatype()
            for point in self.stripped.points
            if point.role == "input"
        }
        for value in (*self.graph.input, *self.graph.output):
            entries = {}
            if value.name in datatypes:
                entries["finn_datatype"] = datatypes[value.name]
            layout = graph_layout(len(value.type.tensor_type.shape.dim), channels_first)
            if layout is not None:
                entries["tensor_layout"] = str(layout)
            _annotate(self.graph, value.name, entries)

    def rounding_annotations(self) -> None:
        """An activation Quant's ``rounding_mode`` other than ROUND, on its output too.

        FINN's conversion replaces the Quant by thresholds and forgets its rounding;
        ``bnfold.finn``'s step reads it here (qonnx renames annotations with tensors).
        """
        initializers = {tensor.name for tensor in self.graph.initializer}
        for node in self.graph.node:
            if node.op_type != "Quant" or node.input[0] in initializers:
                continue
            mode = helper.get_attribute_value(
                next(a for a in node.attribute if a.name == "rounding_mode")
            ).decode()
            if mode != "ROUND":
                _annotate(self.graph, node.output[0], {ROUNDING_ANNOTATION: mode})

    def finish(self) -> None:
        """Add the new initializers, and each weight's Quant node just before its first consumer.

        tf2onnx's graph is in topological order, and a weight Quant reads only
        initializers, so the graph stays in order.
        """
        self.graph.initializer.extend(self.new_initializers)
        quants = {node.output[0]: node for node in self.new_nodes}
        nodes = []
        for node in self.graph.node:
            nodes.extend(quants.pop(name) for name in node.input if name in quants)
            nodes.append(node)
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        used = {name for node in self.graph.node for name in node.input}
        live = [tensor for tensor in self.graph.initializer if tensor.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(live)
        self.model.opset_import.append(helper.make_opsetid(QONNX_DOMAIN, QONNX_OPSET))


def _first_labelled(
    start: list[str], label: Callable[[str], str | None], step: Callable[[str], list[str]]
) -> frozenset[str]:
    """The labels of the items first reached from ``start`` along ``step``: the walk
    stops at each item that has one."""
    found: set[str] = set()
    seen: set[str] = set()
    todo = list(start)
    while todo:
        item = todo.pop()
        if item in seen:
            continue
        seen.add(item)
        labelled = label(item)
        if labelled is None:
            todo.extend(step(item))
        else:
            found.add(labelled)
    return frozenset(found)


def _float_inputs(model: Any) -> dict[str, list[str]]:
    """Each layer of the float model, by name, with the names of the layers it reads."""
    inputs: dict[str, list[str]] = {}

    def visit(layer: Any, values: list[str | None], path: str) -> list[str]:
        inputs[layer.name] = [value for value in values if value is not None]
        produced = layer.get_output_at(0)
        return [layer.name] * (len(produced) if isinstance(produced, list | tuple) else 1)

    propagate(model, [None] * len(model.inputs), visit)
    return inputs


def _annotate(graph: onnx.GraphProto, tensor: str, entries: dict[str, str]) -> None:
    """Add ``entries`` to ``tensor``'s quantization annotation (made if it has none)."""
    if not entries:
        return
    annotation = next((a for a in graph.quantization_annotation if a.tensor_name == tensor), None)
    if annotation is None:
        annotation = graph.quantization_annotation.add(tensor_name=tensor)
    for key, text in entries.items():
        entry = annotation.quant_parameter_tensor_names.add()
        entry.key, entry.value = key, text


def _infer_shapes(model: onnx.ModelProto) -> None:
    """Give every tensor of ``model`` its shape, as qonnx's executor and transformations expect.

    ONNX's shape inference does not know Quant; it runs on a copy in which each
    Quant is an Identity of its input, whose shape a Quant's output has.
    (qonnx's InferShapes does the same, but its lookups make it quadratic in
    the model's size.)
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for node in probe.graph.node:
        if node.domain == QONNX_DOMAIN:
            del node.input[1:], node.attribute[:]
            node.op_type, node.domain = "Identity", ""
    inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=True).graph
    graph = model.graph
    outputs = {value.name for value in graph.output}
    computed = {name for node in graph.node for name in node.output} - outputs
    del graph.value_info[:]
    graph.value_info.extend(value for value in inferred.value_info if value.name in computed)
    graph.value_info.extend(
        helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
        for tensor in graph.initializer
    )


def _layout_changes_as_transposes(model: onnx.ModelProto) -> None:
    """Write back as a Transpose each Reshape with which tf2onnx replaced a layout change.

    Moving a channel axis of size 1 (a one-channel image into a Conv) does not
    move any data, so tf2onnx writes it as a Reshape; qonnx's ``InferDataLayouts``
    then carries the channels-last label through it and misreads every layout
    after it. The Transpose computes the same and says what changes.
    """
    graph = model.graph
    shapes = {
        value.name: [dim.dim_value for dim in value.type.tensor_type.shape.dim]
        for value in (*graph.input, *graph.value_info, *graph.output)
    }
    targets = {tensor.name: tensor for tensor in graph.initializer}
    replaced = set()
    for index, node in enumerate(graph.node):
        if node.op_type != "Reshape" or node.input[1] not in targets:
            continue
        source, result = shapes.get(node.input[0]), shapes.get(node.output[0])
        # Images only: qonnx's channels-last pass (hls4ml's preprocessing) never
        # finishes on such a Transpose of a 3-D (Conv1D) tensor.
        if not source or result is None or len(source) != 4 or source[-1] != 1:
            continue
        for order in ([0, 3, 1, 2], [0, 2, 3, 1]):  # channels-last to -first, and back
            if [source[axis] for axis in order] == result and result != source:
                transpose = helper.make_node(
                    "Transpose", [node.input[0]], list(node.output), name=node.name, perm=order
                )
                transpose.metadata_props.extend(node.metadata_props)
                replaced.add(node.input[1])
                graph.node[index].CopyFrom(transpose)
                break
    used = {name for node in graph.node for name in node.input}
    unused = replaced - used
    for tensors in (graph.initializer, graph.value_info):
        kept = [tensor for tensor in tensors if tensor.name not in unused]
        del tensors[:]
        tensors.extend(kept)


def _check_reproduced(values: np.ndarray, record: WeightRecord, scale: np.ndarray) -> None:
    """A Quant node with these parameters must give the QKeras-quantized values back."""
    fixed = record.quant.fixed
    reproduced = fixed.quantize(values / scale) * scale
    if not np.array_equal(reproduced.astype(np.float32), values):
        worst = float(np.max(np.abs(reproduced - values)))
        raise ExportError(
            f"The Quant node for the {record.role} of layer {record.path!r} would not reproduce "
            f"QKeras's quantized values (off by up to {worst}); quantizer {record.quant.quantizer}"
        )


def annotate(
    model: onnx.ModelProto,
    stripped: Stripped,
    metadata: dict[str, str] | None = None,
    *,
    channels_first: bool = False,
) -> onnx.ModelProto:
    """Turn the converted float graph into QONNX with bnfold metadata.

    Args:
        model: the convert stage's output (changed in place).
        stripped: the strip stage's records.
        metadata: extra model-level ``metadata_props`` (keys without the prefix).
        channels_first: whether ``model`` was converted with channels-first 4-D
            inputs and outputs (the layout annotations say so).

    Returns:
        The QONNX model, with every tensor's shape, passing ``onnx.checker``.

    Raises:
        ExportError: a planned Quant node found no place, or would not reproduce
            QKeras's values.
    """
    annotator = _Annotator(model, stripped)
    annotator.weights()
    annotator.points()
    annotator.gemm_to_matmul()
    annotator.explicit_attributes()
    annotator.finish()
    annotator.layer_metadata()
    annotator.output_names()
    annotator.interface_annotations(channels_first)
    annotator.rounding_annotations()
    summary = {
        "layers": json.dumps([record.summary() for record in stripped.layers.values()]),
        **annotator.float_tail(),
        **(metadata or {}),
    }
    for key, value in summary.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = f"bnfold.{key}", value
    _infer_shapes(model)
    _layout_changes_as_transposes(model)
    onnx.checker.check_model(model, full_check=True)
    return model
