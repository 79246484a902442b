"""Average pooling as depthwise convolutions, the form hls4ml 1.3.0 reads from QONNX.

Before hls4ml's preprocessing, average pooling is rewritten, because hls4ml 1.3.0 cannot
read it from QONNX: qonnx's channels-last pass converts only Conv, MaxPool and
BatchNormalization, hls4ml refuses an ``AveragePool`` left channels-first, computes wrong
values for a ``GlobalAveragePool`` behind the transpose that pass leaves (its handler
takes the dimensions as channels-first, its layer reads the data as channels-last), and
has no ``Squeeze``, which tf2onnx puts after every global pooling. An average over a power-of-two
window is a depthwise convolution whose weights are all ``1/n``, a power of two, held
exactly by a 1-bit unsigned Quant node; hls4ml reads that, and computes it exactly. Over
any other window (the DS-CNN's 25x5, a 6x6 global average) ``1/n`` is rounded to a grid
fine enough that the mean is off by at most a quarter of the result's step (the node
carries ``bnfold.rounded``); the result is typed as a float value
(:mod:`bnfold.hls4ml.ranges`). A QKeras pool
with an ``average_quantizer``, exported as the pooling and Muls by ``n`` and by the
quantized ``1/n``, becomes one depthwise convolution whose weights are that quantized
``1/n``: the sum times it, as QKeras computes it.
A ``Squeeze`` becomes the equivalent ``Reshape``. The exported file itself keeps the
plain pooling nodes, which QONNX and FINN read as they are.
"""

from __future__ import annotations

import math
from collections import defaultdict
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper

from bnfold.fixedpoint import FixedPoint
from bnfold.hls4ml.nodes import QONNX_DOMAIN, SAME_VALUES, add_metadata, metadata, quant_type

if TYPE_CHECKING:
    from qonnx.core.modelwrapper import ModelWrapper

__all__ = ["average_pools_as_convolutions"]


def average_pools_as_convolutions(model: ModelWrapper, fractional_bits: int) -> ModelWrapper:
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
    layer = metadata(node, "layer")
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
    add_metadata(quant, layer=layer, role="kernel")
    add_metadata(
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
    layer = metadata(node, "layer")
    outputs = {tensor.name for tensor in model.graph.output}
    tensor, muls = node.output[0], []
    while layer is not None and len(muls) < 2:
        readers = consumers[tensor]
        if len(readers) != 1 or tensor in outputs or readers[0].domain != "":
            return None
        reader = readers[0]
        if reader.op_type == "Mul" and metadata(reader, "layer") == layer:
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
    while node is not None and node.op_type in SAME_VALUES:
        node = producers.get(node.input[0])
    return quant_type(model, node)


def _squeeze_as_reshape(model: ModelWrapper, node: onnx.NodeProto) -> onnx.NodeProto:
    """hls4ml has no Squeeze; a Reshape to the (static) output shape is the same op."""
    target = f"{node.name or node.output[0]}_shape"
    model.set_initializer(target, np.asarray(model.get_tensor_shape(node.output[0]), np.int64))
    reshape = helper.make_node(
        "Reshape", [node.input[0], target], list(node.output), name=node.name
    )
    reshape.metadata_props.extend(node.metadata_props)
    return reshape
