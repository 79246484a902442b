"""Convert: the float Keras model to an ONNX graph of standard ops, through tf2onnx.

Each QuantPoint of the float model reaches tf2onnx as a ``PreventGradient``
op; the handler here turns it into ``Mul(c, x)`` with a constant ``c`` that
names the point (``strip.point_constant``). A scalar Mul is something tf2onnx's
optimizers move Transposes through, so the graph stays as small as without
points; the constant comes first because tf2onnx folds a ``Mul(x, c)`` after a
bias-less convolution into its kernel. Annotate replaces these Muls by Quant
nodes.

tf2onnx carries on past ops it cannot convert; the result is checked here
instead of trusted.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper

from bnfold.errors import ExportError
from bnfold.export.strip import POINT_PREFIX, Stripped, point_constant
from bnfold.keras import tf


def _point_handler(ctx: Any, node: Any, name: str, args: Any) -> Any:
    """tf2onnx handler: PreventGradient("bnfold:<n>") -> Mul(point_constant(n), x)."""
    message = node.get_attr_value("message")
    message = message.decode() if isinstance(message, bytes) else (message or "")
    del node.attr["message"]
    if not message.startswith(POINT_PREFIX):
        node.type = "Identity"
        return node
    point = int(message[len(POINT_PREFIX) :])
    constant = ctx.make_const(
        f"bnfold_point_{point}", np.array(point_constant(point), dtype=np.float32)
    )
    node.type = "Mul"
    ctx.replace_inputs(node, [constant.output[0], node.input[0]])
    return node


_TO_CHANNELS_LAST = [0, 2, 3, 1]
_TO_CHANNELS_FIRST = [0, 3, 1, 2]


def graph_layout(rank: int, channels_first: bool) -> list[str] | None:
    """The layout of a graph input or output of ``rank`` dimensions, as qonnx writes layouts.

    Keras is channels-last; ``channels_first`` transposes the 4-D (image)
    tensors only, so 3-D ones (Conv1D) stay ``N, W, C``. None for ranks qonnx
    has no layout name for.
    """
    if rank == 4:
        return ["N", "C", "H", "W"] if channels_first else ["N", "H", "W", "C"]
    return {2: ["N", "C"], 3: ["N", "W", "C"]}.get(rank)


def _image_input_names(model: Any) -> list[str]:
    """The 4-D (image) inputs of Keras ``model``, by the names tf2onnx knows them by."""
    return [tensor.name.split(":")[0] + ":0" for tensor in model.inputs if len(tensor.shape) == 4]


def _check_channels_first_inputs(model: Any, onnx_model: onnx.ModelProto) -> None:
    """tf2onnx ignores a name it does not know: check that every 4-D input was transposed."""
    for tensor, value in zip(model.inputs, onnx_model.graph.input, strict=True):
        if len(tensor.shape) != 4:
            continue
        sizes = [dim.dim_value or None for dim in value.type.tensor_type.shape.dim]
        if sizes[1:] != [tensor.shape[axis] for axis in _TO_CHANNELS_FIRST][1:]:
            raise ExportError(
                f"tf2onnx did not make input {value.name!r} channels-first: received shape "
                f"{sizes} for the Keras shape {list(tensor.shape)}"
            )


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]


def _channels_first_outputs(model: onnx.ModelProto) -> None:
    """Make each 4-D graph output NCHW: drop tf2onnx's final NCHW-to-NHWC Transpose where
    the output comes straight from one, else add the opposite Transpose.

    (tf2onnx's own ``outputs_as_nchw`` wants its internal output names.)
    """
    graph = model.graph
    producers = {name: node for node in graph.node for name in node.output}
    readers = {name for node in graph.node for name in node.input}
    for output in graph.output:
        dims = output.type.tensor_type.shape.dim
        if len(dims) != 4:
            continue
        producer = producers.get(output.name)
        perm = [
            list(helper.get_attribute_value(attribute))
            for attribute in (producer.attribute if producer is not None else ())
            if attribute.name == "perm"
        ]
        if (
            producer is not None
            and producer.op_type == "Transpose"
            and perm == [_TO_CHANNELS_LAST]
            and output.name not in readers
        ):
            graph.node.remove(producer)
            _rename(graph, producer.input[0], output.name)
        else:
            channels_last = f"{output.name}_channels_last"
            _rename(graph, output.name, channels_last)
            graph.node.append(
                helper.make_node(
                    "Transpose",
                    [channels_last],
                    [output.name],
                    name=f"{output.name}_channels_first",
                    perm=_TO_CHANNELS_FIRST,
                )
            )
        sizes = [onnx.TensorShapeProto.Dimension() for _ in dims]
        for size, axis in zip(sizes, _TO_CHANNELS_FIRST, strict=True):
            size.CopyFrom(dims[axis])
        for dim, size in zip(dims, sizes, strict=True):
            dim.CopyFrom(size)


def _check_standard_ops(model: onnx.ModelProto) -> None:
    unknown = sorted(
        {
            f"{node.op_type} ({node.name})"
            for node in model.graph.node
            if node.domain not in ("", "ai.onnx") or not onnx.defs.has(node.op_type)
        }
    )
    if unknown:
        raise ExportError(
            "tf2onnx must convert every operation to a standard ONNX op. Received: "
            f"unconverted {', '.join(unknown)}"
        )


def convert(
    stripped: Stripped, *, opset: int = 13, channels_first: bool = False
) -> onnx.ModelProto:
    """Convert the stripped float model with tf2onnx.

    Args:
        stripped: the output of the strip stage.
        opset: the ONNX opset (tf2onnx supports up to 18).
        channels_first: give 4-D graph inputs and outputs the NCHW layout, as
            Brevitas exports them, instead of Keras's NHWC; tf2onnx's optimizer
            cancels the input Transposes this adds against the convolutions'.

    Returns:
        The ONNX model, still holding marker weights and point Muls.

    Raises:
        ExportError: tf2onnx failed or left operations unconverted.
    """
    import tf2onnx

    model = stripped.model
    signature = [
        tf.TensorSpec(tensor.shape, tf.float32, name=tensor.name.split(":")[0])
        for tensor in model.inputs
    ]
    try:
        onnx_model, _ = tf2onnx.convert.from_keras(
            model,
            input_signature=signature,
            opset=opset,
            custom_op_handlers={"PreventGradient": (_point_handler, [])},
            inputs_as_nchw=_image_input_names(model) if channels_first else None,
        )
    except Exception as error:  # tf2onnx raises many types; say which stage failed
        raise ExportError(f"tf2onnx could not convert the float model: {error}") from error
    _check_standard_ops(onnx_model)
    if channels_first:
        _check_channels_first_inputs(model, onnx_model)
        _channels_first_outputs(onnx_model)
    return onnx_model
