"""hls4ml's view of an exported model: the graph it reads and a configuration with bnfold's types.

hls4ml reads QONNX after the preprocessing it documents: qonnx's ``cleanup_model``,
``ConvertToChannelsLastAndClean``, ``GemmToMatMul`` and ``cleanup_model`` again. It reads
no ONNX metadata, and the cleanup renames every node ``<OpType>_<k>``: those names are
the layer names its configuration is keyed by. The ``bnfold.*`` node metadata travels
with the nodes through the cleanup, so the configuration is built from the cleaned graph,
with the names hls4ml sees and the types bnfold inferred.

Before the preprocessing, average pooling is rewritten, because hls4ml 1.3.0 cannot read
it from QONNX: qonnx's channels-last pass converts only Conv, MaxPool and
BatchNormalization, hls4ml refuses an ``AveragePool`` left channels-first, computes wrong
values for a ``GlobalAveragePool`` behind the transpose that pass leaves (its handler
takes the dimensions as channels-first, its layer reads the data as channels-last), and
has no ``Squeeze``, which tf2onnx puts after every global pooling. An average over a power-of-two
window is a depthwise convolution whose weights are all ``1/n``, a power of two, held
exactly by a 1-bit unsigned Quant node; hls4ml reads that, and computes it exactly. Over
any other window (the DS-CNN's 25x5, a 6x6 global average) ``1/n`` is rounded to a grid
fine enough that the mean is off by at most a quarter of the result's step (the node
carries ``bnfold.rounded``); the result is typed as a float value (below). A QKeras pool
with an ``average_quantizer``, exported as the pooling and Muls by ``n`` and by the
quantized ``1/n``, becomes one depthwise convolution whose weights are that quantized
``1/n``: the sum times it, as QKeras computes it.
A ``Squeeze`` becomes the equivalent ``Reshape``. The exported file itself keeps the
plain pooling nodes, which QONNX and FINN read as they are.

Values the export computes in float (after a float activation or layer, a batch
normalization, a rounded mean) get a ``result`` type whose integer bits hold their range
and whose fractional bits are ``fractional_bits`` (16 unless chosen). The range follows by
interval arithmetic from the Quant types and the constants: a mean stays within its
input's range, a softmax or sigmoid within [0, 1], a tanh within [-1, 1], a batch
normalization, a float Dense or Conv within the range its weights give its input's range,
and every other elementwise activation in its function of the input's ends. hls4ml
truncates each such result to the grid, less than ``2**-fractional_bits`` off; a Dense or
Conv reading it infers an exact accumulator from that type. A value whose range bnfold
cannot bound (an op without a rule, such as ``Exp``) keeps hls4ml's own typing, which
falls back on the default precision.

:func:`convert_from_keras_model` is the other route: hls4ml's Keras front end on the
unfolded model, with the same types in its configuration.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections import defaultdict
from collections.abc import Iterator
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import helper

from bnfold.errors import ExportError, UnsupportedLayerError
from bnfold.fixedpoint import FixedPoint

if TYPE_CHECKING:
    from qonnx.core.modelwrapper import ModelWrapper

    OnnxModel = onnx.ModelProto | ModelWrapper | str | os.PathLike[str]

__all__ = ["convert_from_keras_model", "hls4ml_config", "prepare_for_hls4ml"]

QONNX_DOMAIN = "qonnx.custom_op.general"
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
# Ops whose output values are some of their input values: the input's type carries over.
_SAME_VALUES = ("Reshape", "Flatten", "Transpose", "Squeeze", "MaxPool", "GlobalMaxPool")


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
    model = _scalar_quant_parameters(_average_pools_as_convolutions(model, fractional_bits))
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


def _metadata(node: onnx.NodeProto, key: str) -> str | None:
    for entry in node.metadata_props:
        if entry.key == f"bnfold.{key}":
            return entry.value
    return None


def _add_metadata(node: onnx.NodeProto, **entries: str | None) -> None:
    for key, value in entries.items():
        if value is not None:
            entry = node.metadata_props.add()
            entry.key, entry.value = f"bnfold.{key}", value


def _quant_type(model: ModelWrapper, node: onnx.NodeProto | None) -> FixedPoint | None:
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
        layer = _metadata(node, "layer")
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


# ------------------------------------------------------------------ average pooling


def _average_pools_as_convolutions(model: ModelWrapper, fractional_bits: int) -> ModelWrapper:
    """Average pooling as depthwise Conv with ``1/n`` weights; Squeeze as Reshape."""
    from qonnx.transformation.infer_shapes import InferShapes

    model = model.transform(InferShapes())
    producers = {output: node for node in model.graph.node for output in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].append(node)
    nodes, fused, renamed = [], set(), {}
    for node in model.graph.node:
        if node.output[0] in fused:
            continue
        if node.domain == "" and node.op_type in ("GlobalAveragePool", "AveragePool"):
            muls = _average_quantizer_muls(model, node, consumers)
            reciprocal = _scalar_constant(model, muls[1]) if muls else None
            convolution = _pool_as_convolution(model, node, producers, fractional_bits, reciprocal)
            nodes.extend(convolution or [node])
            if convolution and muls:
                # The Muls go; what they multiplied is their product now.
                fused.update(mul.output[0] for mul in muls)
                scaled = next(n for n in muls[0].input if model.get_initializer(n) is None)
                renamed[scaled] = muls[1].output[0]
        elif node.domain == "" and node.op_type == "Squeeze":
            nodes.append(_squeeze_as_reshape(model, node))
        else:
            nodes.append(node)
    for node in nodes:
        node.output[:] = [renamed.get(name, name) for name in node.output]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model.transform(InferShapes())


def _pool_as_convolution(
    model: ModelWrapper,
    node: onnx.NodeProto,
    producers: dict[str, onnx.NodeProto],
    fractional_bits: int,
    reciprocal: float | None = None,
) -> list[onnx.NodeProto] | None:
    """Quant(``1/n`` weights) + depthwise Conv for one average, or None where hls4ml
    cannot compute it (padded or partial windows, or ``n`` not a power of two and an
    input without a fixed-point type to size the weights by).

    With ``reciprocal``, the quantized ``1/n`` of a QKeras ``average_quantizer``
    (:func:`_average_quantizer_muls`), the weights are that value, held exactly: the
    Conv computes the sum times it, the pooling layer's output.
    """
    shape = model.get_tensor_shape(node.input[0])
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    spatial = list(shape[2:])
    if node.op_type == "GlobalAveragePool":
        kernel, strides = spatial, [1] * len(spatial)
    else:
        kernel = list(attributes["kernel_shape"])
        strides = list(attributes.get("strides", [1] * len(kernel)))
        # Padded windows average fewer values at the borders, and ceil_mode adds partial ones.
        if any(attributes.get("pads", [])) or attributes.get("ceil_mode", 0):
            return None
    count = math.prod(kernel)
    averaged = _value_type(model, node.input[0], producers)
    rounded = None
    if reciprocal is not None:
        weight_type = FixedPoint.narrowest_holding(
            reciprocal, reciprocal, 1.0 / Fraction(reciprocal).denominator
        )
        accumulator = averaged and averaged.sum_of(count).product(weight_type)
        weights = np.full((shape[1], 1, *kernel), reciprocal)
    elif count & (count - 1):
        if averaged is None:
            return None
        weight_type = _rounded_reciprocal_type(count, averaged, fractional_bits)
        rounded = f"mean of {count} values with weights 1/{count} rounded to {weight_type}"
        accumulator = averaged.product(weight_type).sum_of(count)
    else:
        # 1/n = 2**-shift, held exactly by a 1-bit Quant node; the mean of n values
        # has the sum's range divided by n, and the step too.
        shift = count.bit_length() - 1
        weight_type = FixedPoint(1, 1 - shift, False)
        accumulator = averaged and FixedPoint(
            averaged.bits + shift, averaged.integer, averaged.signed
        )
    if reciprocal is None:
        weights = weight_type.quantize(np.full((shape[1], 1, *kernel), 1.0 / count))
    channels = shape[1]
    name = node.name or node.output[0]
    weight = f"{name}_average_weight"
    model.set_initializer(weight, weights.astype(np.float32))
    model.set_initializer(f"{weight}_scale", np.float32(weight_type.step))
    model.set_initializer(f"{weight}_zeropt", np.float32(0.0))
    model.set_initializer(f"{weight}_bitwidth", np.float32(weight_type.bits))
    layer = _metadata(node, "layer")
    quant = helper.make_node(
        "Quant",
        [weight, f"{weight}_scale", f"{weight}_zeropt", f"{weight}_bitwidth"],
        [f"{weight}_quantized"],
        name=f"{name}_average_weight_quant",
        domain=QONNX_DOMAIN,
        signed=0,
        narrow=0,
        rounding_mode="ROUND",
    )
    convolution = helper.make_node(
        "Conv",
        [node.input[0], f"{weight}_quantized"],
        list(node.output),
        name=name,
        group=channels,
        kernel_shape=kernel,
        strides=strides,
        pads=[0] * (2 * len(kernel)),
        dilations=[1] * len(kernel),
    )
    _add_metadata(quant, layer=layer, role="kernel")
    _add_metadata(
        convolution,
        layer=layer,
        accumulator_hls=accumulator and accumulator.hls(),
        rounded=rounded,
    )
    return [quant, convolution]


def _average_quantizer_muls(
    model: ModelWrapper, node: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]]
) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
    """The Mul by the count and the Mul by the quantized ``1/count`` that the export writes
    after a pool with a QKeras ``average_quantizer`` (past a Squeeze), or None.

    QKeras computes ``(mean * n) * q(1/n)``. Over a power-of-two ``n`` the mean times
    ``n`` is the sum, so a Conv with weights ``q(1/n)`` computes it exactly; otherwise
    QKeras rounds the mean in float32 and the Conv's sum is the exact one. Left as Muls,
    hls4ml 1.3.0 fails on them in its ``move_scales`` pass when a Conv reads them, and
    without result types for them it merges them and the activation Quant after them
    into the Conv, dropping that Quant's saturation (measured: a 2x2 average followed by
    ``quantized_bits(8,2,1)``, up to 6.8 off).
    """
    layer = _metadata(node, "layer")
    outputs = {tensor.name for tensor in model.graph.output}
    tensor, muls = node.output[0], []
    while layer is not None and len(muls) < 2:
        readers = consumers[tensor]
        if len(readers) != 1 or tensor in outputs or readers[0].domain != "":
            return None
        reader = readers[0]
        if reader.op_type == "Mul" and _metadata(reader, "layer") == layer:
            if _scalar_constant(model, reader) is None:
                return None
            muls.append(reader)
        elif muls or reader.op_type != "Squeeze":
            return None
        tensor = reader.output[0]
    shape = model.get_tensor_shape(node.input[0])
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    kernel = attributes.get("kernel_shape", shape[2:])
    if not muls or _scalar_constant(model, muls[0]) != math.prod(kernel):
        return None
    return muls[0], muls[1]


def _scalar_constant(model: ModelWrapper, node: onnx.NodeProto) -> float | None:
    """The one constant value a binary op multiplies its other input by, or None."""
    constants = [model.get_initializer(name) for name in node.input]
    values = [value for value in constants if value is not None]
    if len(node.input) != 2 or len(values) != 1 or np.asarray(values[0]).size != 1:
        return None
    return float(np.asarray(values[0]).reshape(()))


def _rounded_reciprocal_type(count: int, averaged: FixedPoint, fractional_bits: int) -> FixedPoint:
    """The unsigned type of ``1/count`` rounded so that the mean is off by at most
    ``2**-(fractional_bits + 2)``.

    Each of the ``count`` weights is off by at most half a step, so the mean of values
    up to ``m`` in magnitude is off by at most ``count * m * step / 2``; the step is
    chosen to keep that within a quarter of the result's step, ``2**-fractional_bits``.
    """
    magnitude = max(abs(averaged.min), abs(averaged.max))
    weight_fraction = fractional_bits + 1 + math.ceil(math.log2(count * magnitude))
    code = round(math.ldexp(1.0 / count, weight_fraction))
    return FixedPoint(code.bit_length(), code.bit_length() - weight_fraction, False)


def _value_type(
    model: ModelWrapper, tensor: str, producers: dict[str, onnx.NodeProto]
) -> FixedPoint | None:
    """The type of a tensor made by a Quant node, through ops that only move values."""
    node = producers.get(tensor)
    while node is not None and node.op_type in _SAME_VALUES:
        node = producers.get(node.input[0])
    return _quant_type(model, node)


def _squeeze_as_reshape(model: ModelWrapper, node: onnx.NodeProto) -> onnx.NodeProto:
    """hls4ml has no Squeeze; a Reshape to the (static) output shape is the same op."""
    target = f"{node.name or node.output[0]}_shape"
    model.set_initializer(target, np.asarray(model.get_tensor_shape(node.output[0]), np.int64))
    reshape = helper.make_node(
        "Reshape", [node.input[0], target], list(node.output), name=node.name
    )
    reshape.metadata_props.extend(node.metadata_props)
    return reshape


# ------------------------------------------------------------ ranges of float values

# Elementwise ops whose output does not decrease as their input grows: over an input
# range, the output's range is the op at the ends of it (and at 0, where that is inside).
_MONOTONE = (
    "Relu",
    "LeakyRelu",
    "ThresholdedRelu",
    "Elu",
    "Selu",
    "Sigmoid",
    "HardSigmoid",
    "Tanh",
    "Softplus",
    "Softsign",
)
# Ops whose outputs lie within their input's range (some of its values, or means of them).
_WITHIN = (*_SAME_VALUES, "AveragePool", "GlobalAveragePool")
# Ops that keep a fixed-point input fixed point, on the same grid.
_KEEPS_GRID = (*_SAME_VALUES, "Relu", "Pad", "Concat", "Add")

Range = tuple[float, float]


class _Ranges:
    """The range of every tensor of a graph, by interval arithmetic from its Quant nodes
    and constants, and which tensors hold fixed-point values the export computes exactly.

    A tensor gets no range where an op's rule is missing here (``Exp``, ``Cast``, ...), or
    where it reads such a tensor; hls4ml then types it itself.
    """

    def __init__(self, model: ModelWrapper) -> None:
        self.model = model
        self.producers = {output: node for node in model.graph.node for output in node.output}
        self.ranges: dict[str, Range] = {}
        self.exact: set[str] = set()
        for node in model.graph.node:
            self.visit(node)

    def constant(self, tensor: str) -> np.ndarray | None:
        """A constant's values, read through a Quant node of constant input (weights)."""
        values = self.model.get_initializer(tensor)
        if values is None:
            producer = self.producers.get(tensor)
            if producer is not None and producer.op_type == "Quant":
                values = self.model.get_initializer(producer.input[0])
        return None if values is None else np.asarray(values, dtype=np.float64)

    def of(self, tensor: str) -> Range | None:
        values = self.constant(tensor)
        if values is not None and values.size:
            return float(values.min()), float(values.max())
        return self.ranges.get(tensor)

    def visit(self, node: onnx.NodeProto) -> None:
        output = node.output[0]
        if node.op_type == "Quant":
            fixed = _quant_type(self.model, node)
            if fixed is not None:
                self.ranges[output] = (fixed.min, fixed.max)
                self.exact.add(output)
            return
        if node.op_type in ("Conv", "MatMul"):
            keeps_grid = bool(_metadata(node, "accumulator_hls")) and not _metadata(node, "rounded")
        else:
            keeps_grid = node.op_type in _KEEPS_GRID
        read = node.input if node.op_type in ("Add", "Concat") else node.input[:1]
        if keeps_grid and all(name in self.exact for name in read):
            self.exact.add(output)
        inputs = [self.of(name) for name in node.input if name]
        if not inputs or any(value is None for value in inputs):
            return
        computed = self.compute(node, inputs)
        if computed is not None and all(map(math.isfinite, computed)):
            self.ranges[output] = computed

    def compute(self, node: onnx.NodeProto, inputs: list[Range]) -> Range | None:
        """The output's range from the inputs' ranges; None where there is no rule."""
        op = node.op_type
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if op == "Concat":
            return _hull(inputs)
        if op == "Pad":
            return _hull([inputs[0], (0.0, 0.0)])
        if op in _WITHIN:
            return inputs[0]
        if op == "Softmax":
            return 0.0, 1.0
        if op in _MONOTONE:
            low, high = inputs[0]
            ends = _through(node, [low, min(max(0.0, low), high), high])
            return float(ends.min()), float(ends.max())
        if op in ("Conv", "MatMul"):
            weights = self.constant(node.input[1])
            if weights is None:
                return None
            bias = self.constant(node.input[2]) if len(node.input) > 2 else None
            return _multiply_accumulate(inputs[0], weights, bias, 0 if op == "MatMul" else None)
        if op == "BatchNormalization":
            scale, offset, mean, variance = (self.constant(name) for name in node.input[1:5])
            if scale is None or offset is None or mean is None or variance is None:
                return None
            factor = scale / np.sqrt(variance + attributes.get("epsilon", 1e-5))
            low, high = inputs[0]
            ends = np.stack([factor * low, factor * high]) + (offset - mean * factor)
            return float(ends.min()), float(ends.max())
        (a, b), (c, d) = inputs[0], inputs[-1]
        if op == "Add":
            return a + c, b + d
        if op == "Sub":
            return a - d, b - c
        if op == "Mul":
            products = (a * c, a * d, b * c, b * d)
            return min(products), max(products)
        if op == "Min":
            return min(a, c), min(b, d)
        if op == "Max":
            return max(a, c), max(b, d)
        return None


def _hull(ranges: list[Range]) -> Range:
    return min(low for low, _ in ranges), max(high for _, high in ranges)


def _through(node: onnx.NodeProto, values: list[float]) -> np.ndarray:
    """``node``'s elementwise op applied to ``values`` (ONNX's reference implementation)."""
    from onnx.reference import ReferenceEvaluator

    single = helper.make_node(node.op_type, ["x"], ["y"])
    single.attribute.extend(node.attribute)
    shape = [len(values)]
    graph = helper.make_graph(
        [single],
        "range",
        [helper.make_tensor_value_info("x", onnx.TensorProto.DOUBLE, shape)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.DOUBLE, shape)],
    )
    evaluator = ReferenceEvaluator(helper.make_model(graph))
    return np.asarray(evaluator.run(None, {"x": np.asarray(values, dtype=np.float64)})[0])


def _multiply_accumulate(
    value: Range, weights: np.ndarray, bias: np.ndarray | None, summed_axis: int | None
) -> Range:
    """The range of sums of weight times input, plus bias, for inputs in ``value``.

    Per output: each product lies between the weight times either end of the input's
    range, and 0 stands for a padded position. ``summed_axis`` 0 is a MatMul's weight
    (inputs x outputs); None a Conv's (outputs first, every other axis summed).
    """
    low, high = value
    ends = np.stack([weights * low, weights * high, np.zeros_like(weights)])
    if summed_axis is None:
        axes = tuple(range(1, weights.ndim))
        lows, highs = ends.min(0).sum(axes), ends.max(0).sum(axes)
    else:
        lows, highs = ends.min(0).sum(summed_axis), ends.max(0).sum(summed_axis)
    if bias is not None:
        lows, highs = lows + bias, highs + bias
    return float(lows.min()), float(highs.max())


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
        self.ranges = _Ranges(self.model)
        self.float_step = math.ldexp(1.0, -fractional_bits)
        layers: dict[str, dict[str, Any]] = {}
        for tensor in self.model.graph.input:
            quants = [
                node for node in self.consumers[tensor.name] if _metadata(node, "role") == "input"
            ]
            result = (
                self.typed(_quant_type(self.model, quants[0]), quantizing=True) if quants else None
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
            self.typed(_quant_type(self.model, node))
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
            "weight": self.typed(_quant_type(self.model, self.producer(node, 1)), quantizing=True)
        }
        output = node.output[0]
        if node.op_type == "Conv":
            precision["bias"] = self.typed(
                _quant_type(self.model, self.producer(node, 2)), quantizing=True
            )
        else:
            adds = [c for c in self.consumers[output] if c.op_type == "Add"]
            if len(adds) == 1 and len(self.consumers[output]) == 1:
                bias = [self.producers.get(name) for name in adds[0].input if name != output]
                precision["bias"] = self.typed(
                    _quant_type(self.model, bias[0] if bias else None), quantizing=True
                )
        text = _metadata(node, "accumulator_hls")
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
            or output in self.ranges.exact
            or output not in self.ranges.ranges
            or (node.op_type == "Conv" and self.conv_result(output))
        ):
            return None
        low, high = self.ranges.ranges[output]
        return self.typed(FixedPoint.narrowest_holding(low, high, self.float_step))

    def producer(self, node: onnx.NodeProto, index: int) -> onnx.NodeProto | None:
        return self.producers.get(node.input[index]) if len(node.input) > index else None

    def conv_result(self, output: str) -> str | None:
        """The type of the activation Quant a Conv feeds alone, which hls4ml would merge."""
        consumers = self.consumers[output]
        if len(consumers) != 1 or _metadata(consumers[0], "role") != "activation":
            return None
        return self.typed(_quant_type(self.model, consumers[0]), quantizing=True)


# ---------------------------------------------------------------- hls4ml's Keras front end


def convert_from_keras_model(
    model: Any, source_quantizers: Any = None, **hls4ml_arguments: Any
) -> Any:
    """hls4ml's ``convert_from_keras_model`` on the unfolded model, with bnfold's types.

    The Keras route, beside the ONNX one (:func:`prepare_for_hls4ml`): hls4ml's own QKeras
    front end rejects ``QDepthwiseConv2DBatchnorm`` and ``QDenseBatchnorm``, and with
    TensorFlow 2.16+ hls4ml 1.3.0 parses every model with its Keras 3 parser, which fails
    on tf_keras models. This function populates the empty bias quantizers and unfolds a
    copy of ``model`` (``model`` is not changed), has hls4ml parse it with its Keras 2
    parser (:func:`_keras_2_for_hls4ml`), and configures, by layer name:

    - each input: the source quantizer's type, rounding and saturating as QKeras does;
    - each multiply-accumulate layer: ``accum`` and ``result`` the accumulator type, which
      holds every sum, bias included, so hls4ml neither truncates nor wraps before the
      activation quantizes; a linear activation hls4ml splits off keeps that type; a
      separable convolution, which hls4ml splits in two layers, ``pointwise_accum`` the
      accumulator type and ``depthwise_accum`` and ``depthwise_result`` the depthwise
      stage's own, the type of the pointwise stage's input;
    - everything else as hls4ml's ``config_from_keras_model(granularity="name")`` sets it
      (weights, biases and activations from their QKeras quantizers).

    Average pooling keeps hls4ml's types, which need not hold its exact averages.

    Args:
        model: A Keras model with folded layers (or none).
        source_quantizers: One quantizer per model input, as for
            ``populate_bias_quantizer_from_accumulator``; None for QKeras's default.
        **hls4ml_arguments: Passed to ``hls4ml.converters.convert_from_keras_model``
            (``output_dir``, ``backend``, ``io_type``, ...), except ``hls_config``.

    Returns:
        hls4ml's ``ModelGraph``; ``compile()`` and ``predict()`` it as usual.

    Raises:
        TypeError: ``hls_config`` is given (bnfold builds it).
        bnfold.errors.UnsupportedLayerError: a multiply-accumulate layer inside a nested
            model, which hls4ml's Keras front end does not read.
        bnfold.errors.BnfoldError: as ``populate_bias_quantizer_from_accumulator``.
    """
    import hls4ml

    from bnfold.accumulator import (
        mac_types,
        populate_bias_quantizer_from_accumulator,
        source_quantizers_for,
    )
    from bnfold.unfold import copy_model, unfold_model

    if "hls_config" in hls4ml_arguments:
        raise TypeError(
            "convert_from_keras_model builds hls_config itself, with bnfold's types. "
            "Received: hls_config; edit the configuration of the returned model instead, or "
            "build it with hls4ml.utils.config_from_keras_model"
        )
    populated = populate_bias_quantizer_from_accumulator(copy_model(model), source_quantizers)
    unfolded = unfold_model(populated)
    sources = source_quantizers_for(unfolded, source_quantizers)
    with _keras_2_for_hls4ml():
        config = hls4ml.utils.config_from_keras_model(
            unfolded, granularity="name", backend=hls4ml_arguments.get("backend")
        )
    layers = config["LayerName"]
    for tensor, quantizer in zip(unfolded.inputs, sources, strict=True):
        if quantizer is not None:
            fixed = FixedPoint.from_quantizer(quantizer)
            layers[tensor.name.split(":")[0]]["Precision"]["result"] = fixed.hls4ml_precision(
                quantizing=True
            )
    for name, mac in mac_types(unfolded, sources).items():
        if name not in layers:
            raise UnsupportedLayerError(
                "hls4ml's Keras front end needs every multiply-accumulate layer at the top "
                "level of the model; use the ONNX route (prepare_for_hls4ml) for nested "
                f"models. Received: layer={name!r}"
            )
        accumulator = mac.types.accumulator.hls4ml_precision()
        layers[name]["Precision"].update(accum=accumulator, result=accumulator)
        if mac.types.before is not None:
            # hls4ml splits a separable convolution into a depthwise and a pointwise layer,
            # whose accum are these (its configuration sets them "auto", which would win
            # over accum); QKeras does not round between the two.
            depthwise = mac.types.before.accumulator.hls4ml_precision()
            layers[name]["Precision"].update(
                depthwise_accum=depthwise, depthwise_result=depthwise, pointwise_accum=accumulator
            )
        if f"{name}_linear" in layers:
            layers[f"{name}_linear"]["Precision"]["result"] = accumulator
    with _keras_2_for_hls4ml():
        return hls4ml.converters.convert_from_keras_model(
            unfolded, hls_config=config, **hls4ml_arguments
        )


@contextlib.contextmanager
def _keras_2_for_hls4ml() -> Iterator[None]:
    """While inside, ``import keras`` gives tf_keras: hls4ml 1.3.0 then uses its Keras 2 parser.

    hls4ml picks its parser by ``import keras; keras.__version__``, which TensorFlow 2.16+
    answers with Keras 3 even for a tf_keras model. The swap of ``sys.modules["keras"]``
    is undone on the way out, error or not; another thread importing ``keras`` meanwhile
    would get tf_keras too.
    """
    from bnfold.keras import keras

    absent = object()
    saved = sys.modules.get("keras", absent)
    sys.modules["keras"] = keras
    try:
        yield
    finally:
        if saved is absent:
            sys.modules.pop("keras", None)
        else:
            sys.modules["keras"] = saved
