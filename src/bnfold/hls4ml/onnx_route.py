"""The ONNX route: the graph hls4ml reads and a configuration with bnfold's types.

hls4ml reads QONNX after the preprocessing it documents: qonnx's ``cleanup_model``,
``ConvertToChannelsLastAndClean``, ``GemmToMatMul`` and ``cleanup_model`` again. It reads
no ONNX metadata, and the cleanup renames every node ``<OpType>_<k>``: those names are
the layer names its configuration is keyed by. The ``bnfold.*`` node metadata travels
with the nodes through the cleanup, so the configuration is built from the cleaned graph,
with the names hls4ml sees and the types bnfold inferred.

The stages before the preprocessing and the configuration are modules of their own:
average pooling (:mod:`bnfold.hls4ml.pooling`) and the ranges of values computed in
float (:mod:`bnfold.hls4ml.ranges`).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import onnx
from onnx import helper

from bnfold.errors import ExportError
from bnfold.fixedpoint import FixedPoint
from bnfold.hls4ml.nodes import metadata, quant_type
from bnfold.hls4ml.pooling import average_pools_as_convolutions
from bnfold.hls4ml.ranges import value_ranges

if TYPE_CHECKING:
    from qonnx.core.modelwrapper import ModelWrapper

    OnnxModel = onnx.ModelProto | ModelWrapper | str | os.PathLike[str]

__all__ = ["FLOAT_FRACTIONAL_BITS", "hls4ml_config", "prepare_for_hls4ml"]

# hls4ml's own default precision, for a model without any bnfold type.
FALLBACK_PRECISION = "fixed<16,6>"
# Fractional bits of the types given to values computed in float (after a float
# activation or layer, a batch normalization, a mean over a window that is not a power of
# two); their integer bits hold the value's range. 16: a float value then reaches the
# next fixed-point layer within 2**-16 (0.0015 % of a unit), well inside the step of the
# few-bit quantizers QKeras models use, at the cost of wide types in the float part.
FLOAT_FRACTIONAL_BITS = 16
# In a model with float parts the default precision, which hls4ml gives to the float
# layers' weights and to what bnfold cannot bound, holds at least 16 integer bits and the
# chosen fractional bits. Measured: the logits of a QDense + BatchNormalization +
# QActivation MLP then equal QKeras's bit for bit (hls4ml's own union default misses by
# up to 0.04). Pass default_precision to choose another.
FLOAT_TAIL_INTEGER = 16
_POOLING = ("MaxPool", "AveragePool", "GlobalMaxPool", "GlobalAveragePool")


def prepare_for_hls4ml(
    onnx_model: OnnxModel,
    *,
    default_precision: str | None = None,
    skip_softmax: bool = False,
    fractional_bits: int = FLOAT_FRACTIONAL_BITS,
) -> tuple[ModelWrapper, dict[str, Any]]:
    """The graph hls4ml reads and the hls4ml configuration for it, in one call.

    Rewrites average pooling (see the module docstring), runs the QONNX preprocessing
    hls4ml documents, and builds the configuration from the cleaned graph, so that its
    keys are the layer names hls4ml will use. Pass both to
    ``hls4ml.converters.convert_from_onnx_model(model, hls_config=config, ...)``.

    Args:
        onnx_model: A model exported by bnfold (``onnx.ModelProto``, qonnx
            ``ModelWrapper`` or file path), with one scale per weight Quant node
            (``export_onnx(..., per_channel_scales=False)``). It is not changed.
        default_precision: hls4ml's model-wide default type, which it gives to every
            layer it cannot type itself; None for the union of every type in the model,
            which holds every value those layers can carry except wider sums, and, in a
            model with float parts (``bnfold.float_tail``), of a type with 16 integer
            bits and ``fractional_bits`` (``fixed<33,17>`` by default) for what the
            float layers hold that bnfold does not type (a float Dense's weights, a
            batch normalization's scale and offset).
        skip_softmax: set hls4ml's ``skip`` option on every Softmax, so that the
            hardware outputs the logits (hls4ml's usual practice for a classifier
            whose argmax is taken in software; the logits are then bit-exact where
            the model computes them in fixed point). False keeps hls4ml's softmax,
            computed with lookup tables (its ``stable`` implementation), which
            approximates the float softmax.
        fractional_bits: fractional bits of the types of values computed in float
            (their integer bits hold their range), from 0 to 32. hls4ml truncates each
            float layer's result to that grid, less than ``2**-fractional_bits`` off,
            and an average over a window that is not a power of two to less than
            ``1.25 * 2**-fractional_bits`` off the exact mean. More bits, closer
            results and wider hardware.

    Returns:
        The cleaned ``qonnx.core.modelwrapper.ModelWrapper`` and the configuration
        (see :func:`hls4ml_config`).

    Raises:
        ExportError: A weight Quant node has per-channel scales, which hls4ml 1.3.0
            cannot read, or a node's bnfold metadata is malformed.
        ValueError: ``fractional_bits`` is not an int from 0 to 32.
    """
    if (
        not isinstance(fractional_bits, int)
        or isinstance(fractional_bits, bool)
        or not (0 <= fractional_bits <= 32)
    ):
        raise ValueError(
            f"fractional_bits must be an int from 0 to 32. Received: {fractional_bits!r}"
        )
    model = _explicit_alphas(_copy(onnx_model))
    model = _scalar_quant_parameters(average_pools_as_convolutions(model, fractional_bits))
    float_tail = any(entry.key == "bnfold.float_tail" for entry in model.model.metadata_props)
    cleaned = _qonnx_preprocessing(model)
    config = _Config(cleaned).build(default_precision, skip_softmax, float_tail, fractional_bits)
    return cleaned, config


def hls4ml_config(
    onnx_model: OnnxModel,
    *,
    default_precision: str | None = None,
    skip_softmax: bool = False,
    fractional_bits: int = FLOAT_FRACTIONAL_BITS,
) -> dict[str, Any]:
    """An hls4ml configuration (granularity "name") with bnfold's fixed-point types.

    The keys under ``LayerName`` are the graph input and node names of the graph
    :func:`prepare_for_hls4ml` returns, which is the graph to give hls4ml. For a model
    without average pooling, running hls4ml's documented preprocessing yourself gives
    the same graph and names. Per layer:

    - graph inputs: ``result`` is the input quantizer's type, converting as QKeras
      does (round half to even, saturate), so hls4ml's input port is that narrow;
    - Conv and MatMul: ``weight`` and ``bias`` are the types of the Quant nodes that
      feed them (hls4ml derives the same from those nodes); ``accum`` is the layer's
      accumulator from ``bnfold.accumulator_hls``, exact and often a bit narrower than
      hls4ml's own; a Conv's ``result`` is the accumulator type, or the type of the
      Quant node it feeds directly (hls4ml would merge that Quant into it). A MatMul's
      ``result`` stays ``auto``: hls4ml fuses the bias Add into its Dense layer only
      while that type is unset, and then infers a type that holds every value;
    - a layer computing in float (not a MatMul): ``result`` holds its range with
      ``fractional_bits`` fractional bits (see the module docstring); a rounded mean's
      Conv also gets its exact ``accum``;
    - every other layer: ``result`` ``auto`` (and ``accum`` for pooling), as hls4ml's
      ``config_from_onnx_model`` writes it; Quant nodes set their own types.

    Args:
        onnx_model: As for :func:`prepare_for_hls4ml`.
        default_precision: As for :func:`prepare_for_hls4ml`.
        skip_softmax: As for :func:`prepare_for_hls4ml`.
        fractional_bits: As for :func:`prepare_for_hls4ml`.

    Returns:
        ``{"Model": {...}, "LayerName": {name: {"Precision": {...}}}}``, types in
        hls4ml's ``fixed<W,I>`` syntax; plain data, ready for YAML or JSON.

    Raises:
        ExportError: As for :func:`prepare_for_hls4ml`.
    """
    return prepare_for_hls4ml(
        onnx_model,
        default_precision=default_precision,
        skip_softmax=skip_softmax,
        fractional_bits=fractional_bits,
    )[1]


def _copy(onnx_model: OnnxModel) -> ModelWrapper:
    """A ModelWrapper around a copy, so that the caller's model is never changed."""
    from qonnx.core.modelwrapper import ModelWrapper

    if isinstance(onnx_model, (str, os.PathLike)):
        proto = onnx.load(os.fspath(onnx_model))
    else:
        proto = onnx_model.model if isinstance(onnx_model, ModelWrapper) else onnx_model
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    # hls4ml needs static shapes; a dynamic batch (--dynamic-batch) becomes 1.
    for value in (*copy.graph.input, *copy.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            dims[0].dim_value = 1
    del copy.graph.value_info[:]
    return ModelWrapper(copy)


# ONNX's default ``alpha`` of the activations hls4ml reads with an ``alpha`` parameter.
_ONNX_DEFAULT_ALPHA = {"Elu": 1.0, "LeakyRelu": 0.01, "ThresholdedRelu": 1.0}


def _explicit_alphas(model: ModelWrapper) -> ModelWrapper:
    """Each Elu, LeakyRelu and ThresholdedRelu with its ``alpha`` written out.

    tf2onnx leaves out an ``alpha`` equal to ONNX's default, and hls4ml 1.3.0 reads a
    missing one as 0.01 for all three. Measured: a Keras ``elu`` then came out of hls4ml
    with negative values 100 times too small.
    """
    for node in model.graph.node:
        default = _ONNX_DEFAULT_ALPHA.get(node.op_type)
        if node.domain == "" and default is not None:
            if not any(attribute.name == "alpha" for attribute in node.attribute):
                node.attribute.append(helper.make_attribute("alpha", default))
    return model


def _qonnx_preprocessing(model: ModelWrapper) -> ModelWrapper:
    """The passes hls4ml's documentation prescribes for QONNX, in its order."""
    from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean
    from qonnx.transformation.gemm_to_matmul import GemmToMatMul
    from qonnx.util.cleanup import cleanup_model

    model = cleanup_model(model)
    model = model.transform(ConvertToChannelsLastAndClean())
    model = model.transform(GemmToMatMul())
    return cleanup_model(model)


def _scalar_quant_parameters(model: ModelWrapper) -> ModelWrapper:
    """Each one-value Quant scale and zero point as a scalar (rank 0), for hls4ml 1.3.0.

    bnfold writes them with shape (1,), as qonnx's and FINN's passes need; hls4ml
    turns them into Python numbers, which NumPy 2 refuses for an array of rank 1,
    and qonnx's channels-last pass (hls4ml's preprocessing) never finishes on them.
    """
    for node in model.get_nodes_by_op_type("Quant"):
        for name in node.input[1:3]:
            values = model.get_initializer(name)
            if values is not None and values.size == 1 and values.ndim:
                model.set_initializer(name, values.reshape(()))
    return model


# -------------------------------------------------------------------- the configuration


class _Config:
    """Reads the cleaned graph once and builds the configuration from it."""

    def __init__(self, model: ModelWrapper) -> None:
        self.model = model
        self.producers = {output: node for node in model.graph.node for output in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in model.graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.types: list[FixedPoint] = []

    def typed(self, fixed: FixedPoint | None, *, quantizing: bool = False) -> str | None:
        """hls4ml's string for a type, remembered for the default precision."""
        if fixed is None:
            return None
        self.types.append(fixed)
        return fixed.hls4ml_precision(quantizing=quantizing)

    def build(
        self,
        default_precision: str | None,
        skip_softmax: bool,
        float_tail: bool,
        fractional_bits: int,
    ) -> dict[str, Any]:
        self.ranges, self.exact = value_ranges(self.model)
        self.float_step = math.ldexp(1.0, -fractional_bits)
        layers: dict[str, dict[str, Any]] = {}
        for tensor in self.model.graph.input:
            quants = [
                node for node in self.consumers[tensor.name] if metadata(node, "role") == "input"
            ]
            result = (
                self.typed(quant_type(self.model, quants[0]), quantizing=True) if quants else None
            )
            layers[tensor.name] = {"Precision": {"result": result or "auto"}}
        for node in self.model.graph.node:
            precision: dict[str, str] = {"result": "auto"}
            if node.op_type in ("Conv", "MatMul"):
                precision.update(self.mac(node))
            elif node.op_type in _POOLING:
                precision["accum"] = "auto"
            precision["result"] = self.float_result(node) or precision["result"]
            layers[node.name] = {"Precision": precision}
            if node.op_type == "Softmax":
                layers[node.name]["skip"] = skip_softmax
        for node in self.model.graph.node:
            self.typed(quant_type(self.model, node))
        if default_precision is None:
            default_precision = FALLBACK_PRECISION
            if float_tail:
                width = FLOAT_TAIL_INTEGER + 1 + fractional_bits
                self.types.append(FixedPoint(width, FLOAT_TAIL_INTEGER, True))
            if self.types:
                union = self.types[0]
                for fixed in self.types[1:]:
                    union = union.union(fixed)
                default_precision = union.hls4ml_precision()
        return {
            "Model": {
                "Precision": {"default": default_precision},
                "ReuseFactor": 1,
                "Strategy": "Latency",
                "BramFactor": 1_000_000_000,
                "TraceOutput": False,
            },
            "LayerName": layers,
        }

    def mac(self, node: onnx.NodeProto) -> dict[str, str]:
        """weight, bias, accum and result of one Conv or MatMul node."""
        precision: dict[str, str | None] = {
            "weight": self.typed(quant_type(self.model, self.producer(node, 1)), quantizing=True)
        }
        output = node.output[0]
        if node.op_type == "Conv":
            precision["bias"] = self.typed(
                quant_type(self.model, self.producer(node, 2)), quantizing=True
            )
        else:
            adds = [c for c in self.consumers[output] if c.op_type == "Add"]
            if len(adds) == 1 and len(self.consumers[output]) == 1:
                bias = [self.producers.get(name) for name in adds[0].input if name != output]
                precision["bias"] = self.typed(
                    quant_type(self.model, bias[0] if bias else None), quantizing=True
                )
        text = metadata(node, "accumulator_hls")
        if text is not None:
            try:
                accumulator = FixedPoint.from_hls(text)
            except ValueError as error:
                raise ExportError(
                    f"bnfold.accumulator_hls of node {node.name!r} must be an ap_fixed type. "
                    f"Received: {text!r}"
                ) from error
            precision["accum"] = self.typed(accumulator)
            if node.op_type == "Conv":
                precision["result"] = self.conv_result(output) or precision["accum"]
        return {key: value for key, value in precision.items() if value is not None}

    def float_result(self, node: onnx.NodeProto) -> str | None:
        """For a layer computing in float: a type holding its outputs' range, on the grid
        of the chosen fractional bits; None for every other layer.

        A MatMul's result stays unset (see :func:`hls4ml_config`): hls4ml infers it from
        its input type, exactly. A Conv that feeds an activation Quant alone takes that
        Quant's type (:meth:`conv_result`).
        """
        output = node.output[0]
        if (
            node.op_type in ("Quant", "MatMul")
            or output in self.exact
            or output not in self.ranges
            or (node.op_type == "Conv" and self.conv_result(output))
        ):
            return None
        low, high = self.ranges[output]
        return self.typed(FixedPoint.narrowest_holding(low, high, self.float_step))

    def producer(self, node: onnx.NodeProto, index: int) -> onnx.NodeProto | None:
        return self.producers.get(node.input[index]) if len(node.input) > index else None

    def conv_result(self, output: str) -> str | None:
        """The type of the activation Quant a Conv feeds alone, which hls4ml would merge."""
        consumers = self.consumers[output]
        if len(consumers) != 1 or metadata(consumers[0], "role") != "activation":
            return None
        return self.typed(quant_type(self.model, consumers[0]), quantizing=True)
