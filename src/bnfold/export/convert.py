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


def convert(stripped: Stripped, *, opset: int = 13) -> onnx.ModelProto:
    """Convert the stripped float model with tf2onnx.

    Args:
        stripped: the output of the strip stage.
        opset: the ONNX opset (tf2onnx supports up to 18).

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
        )
    except Exception as error:  # tf2onnx raises many types; say which stage failed
        raise ExportError(f"tf2onnx could not convert the float model: {error}") from error
    _check_standard_ops(onnx_model)
    return onnx_model
