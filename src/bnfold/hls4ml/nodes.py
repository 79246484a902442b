"""What hls4ml reads of a QONNX node: its Quant type, and the ``bnfold.*`` metadata on it.

Shared by the stages of the ONNX route (:mod:`bnfold.hls4ml.pooling`,
:mod:`bnfold.hls4ml.ranges`, :mod:`bnfold.hls4ml.onnx_route`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper

from bnfold.errors import ExportError
from bnfold.fixedpoint import FixedPoint

if TYPE_CHECKING:
    from qonnx.core.modelwrapper import ModelWrapper

__all__ = ["QONNX_DOMAIN", "SAME_VALUES", "add_metadata", "metadata", "quant_type"]

QONNX_DOMAIN = "qonnx.custom_op.general"
# Ops whose output values are some of their input values: the input's type carries over.
SAME_VALUES = ("Reshape", "Flatten", "Transpose", "Squeeze", "MaxPool", "GlobalMaxPool")


def metadata(node: onnx.NodeProto, key: str) -> str | None:
    """The value of a node's ``bnfold.<key>`` metadata, or None."""
    for entry in node.metadata_props:
        if entry.key == f"bnfold.{key}":
            return entry.value
    return None


def add_metadata(node: onnx.NodeProto, **entries: str | None) -> None:
    """Each entry as ``bnfold.<key>`` metadata of the node; None values are left out."""
    for key, value in entries.items():
        if value is not None:
            entry = node.metadata_props.add()
            entry.key, entry.value = f"bnfold.{key}", value


def quant_type(model: ModelWrapper, node: onnx.NodeProto | None) -> FixedPoint | None:
    """The type of a Quant node with constant parameters; None for anything else."""
    if node is None or node.op_type != "Quant" or node.domain != QONNX_DOMAIN:
        return None
    scale, zeropt, bitwidth = (model.get_initializer(name) for name in node.input[1:4])
    if scale is None or zeropt is None or bitwidth is None or np.any(zeropt != 0):
        return None
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    try:
        return FixedPoint.from_qonnx_quant(
            bitwidth,
            scale,
            signed=bool(attributes.get("signed", 1)),
            narrow=bool(attributes.get("narrow", 0)),
        )
    except ValueError as error:
        layer = metadata(node, "layer")
        if model.get_initializer(node.input[0]) is not None and np.asarray(scale).size > 1:
            raise ExportError(
                "hls4ml 1.3.0 reads one scale per weight Quant node; export with "
                "per_channel_scales=False (--no-per-channel-scales). Received: Quant node "
                f"{node.name!r} of layer {layer!r} with {np.asarray(scale).size} scales"
            ) from error
        raise ExportError(
            f"A Quant node hls4ml reads needs a fixed-point type. Received: node {node.name!r} "
            f"of layer {layer!r}: {error}"
        ) from error
