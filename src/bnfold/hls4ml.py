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
exactly by a 1-bit unsigned Quant node; hls4ml reads that, and computes it exactly.
A ``Squeeze`` becomes the equivalent ``Reshape``. The exported file itself keeps the
plain pooling nodes, which QONNX and FINN read as they are.

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
# Layers that compute in float (batch normalization, float layers, what reads them) get
# hls4ml's default precision; in a model with a float tail it holds at least 16 integer
# and 16 fractional bits. Measured: the logits of a QDense + BatchNormalization +
# QActivation MLP then equal QKeras's bit for bit (hls4ml's own union default misses by
# up to 0.04). Pass default_precision to choose another.
FLOAT_TAIL_PRECISION = FixedPoint(33, 16, True)
_POOLING = ("MaxPool", "AveragePool", "GlobalMaxPool", "GlobalAveragePool")
# Ops whose output values are some of their input values: the input's type carries over.
_SAME_VALUES = ("Reshape", "Flatten", "Transpose", "Squeeze", "MaxPool", "GlobalMaxPool")


def prepare_for_hls4ml(
    onnx_model: OnnxModel, *, default_precision: str | None = None, skip_softmax: bool = False
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
            model with float parts (``bnfold.float_tail``), of ``fixed<33,16>`` (16
            integer and 16 fractional bits) for the layers that compute in float.
        skip_softmax: set hls4ml's ``skip`` option on every Softmax, so that the
            hardware outputs the logits (hls4ml's usual practice for a classifier
            whose argmax is taken in software; the logits are then bit-exact where
            the model computes them in fixed point). False keeps hls4ml's softmax,
            computed with lookup tables (its ``stable`` implementation), which
            approximates the float softmax.

    Returns:
        The cleaned ``qonnx.core.modelwrapper.ModelWrapper`` and the configuration
        (see :func:`hls4ml_config`).

    Raises:
        ExportError: A weight Quant node has per-channel scales, which hls4ml 1.3.0
            cannot read, or a node's bnfold metadata is malformed.
    """
    model = _scalar_quant_parameters(_average_pools_as_convolutions(_copy(onnx_model)))
    float_tail = any(entry.key == "bnfold.float_tail" for entry in model.model.metadata_props)
    cleaned = _qonnx_preprocessing(model)
    return cleaned, _Config(cleaned).build(default_precision, skip_softmax, float_tail)


def hls4ml_config(
    onnx_model: OnnxModel, *, default_precision: str | None = None, skip_softmax: bool = False
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
    - every other layer: ``result`` ``auto`` (and ``accum`` for pooling), as hls4ml's
      ``config_from_onnx_model`` writes it; Quant nodes set their own types.

    Args:
        onnx_model: As for :func:`prepare_for_hls4ml`.
        default_precision: As for :func:`prepare_for_hls4ml`.
        skip_softmax: As for :func:`prepare_for_hls4ml`.

    Returns:
        ``{"Model": {...}, "LayerName": {name: {"Precision": {...}}}}``, types in
        hls4ml's ``fixed<W,I>`` syntax; plain data, ready for YAML or JSON.

    Raises:
        ExportError: As for :func:`prepare_for_hls4ml`.
    """
    return prepare_for_hls4ml(
        onnx_model, default_precision=default_precision, skip_softmax=skip_softmax
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


def _average_pools_as_convolutions(model: ModelWrapper) -> ModelWrapper:
    """Average pooling as depthwise Conv with ``1/n`` weights; Squeeze as Reshape."""
    from qonnx.transformation.infer_shapes import InferShapes

    model = model.transform(InferShapes())
    producers = {output: node for node in model.graph.node for output in node.output}
    nodes = []
    for node in model.graph.node:
        if node.domain == "" and node.op_type in ("GlobalAveragePool", "AveragePool"):
            nodes.extend(_pool_as_convolution(model, node, producers) or [node])
        elif node.domain == "" and node.op_type == "Squeeze":
            nodes.append(_squeeze_as_reshape(model, node))
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model.transform(InferShapes())


def _pool_as_convolution(
    model: ModelWrapper, node: onnx.NodeProto, producers: dict[str, onnx.NodeProto]
) -> list[onnx.NodeProto] | None:
    """Quant(1/n weights) + depthwise Conv for one average, or None where not exact."""
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
    if count & (count - 1):
        return None  # 1/n is not a power of two: no exact weight
    channels = shape[1]
    name = node.name or node.output[0]
    weight = f"{name}_average_weight"
    values = np.full((channels, 1, *kernel), 1.0 / count, dtype=np.float32)
    model.set_initializer(weight, values)
    model.set_initializer(f"{weight}_scale", np.float32(1.0 / count))
    model.set_initializer(f"{weight}_zeropt", np.float32(0.0))
    model.set_initializer(f"{weight}_bitwidth", np.float32(1.0))
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
    averaged = _value_type(model, node.input[0], producers)
    if averaged is not None:
        # The mean of n = 2**shift values: the sum's range divided by n, the step too.
        shift = count.bit_length() - 1
        averaged = FixedPoint(averaged.bits + shift, averaged.integer, averaged.signed)
    _add_metadata(convolution, layer=layer, accumulator_hls=averaged and averaged.hls())
    return [quant, convolution]


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
        self, default_precision: str | None, skip_softmax: bool, float_tail: bool
    ) -> dict[str, Any]:
        self.float_tail = float_tail
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
            layers[node.name] = {"Precision": precision}
            if node.op_type == "Softmax":
                layers[node.name]["skip"] = skip_softmax
        for node in self.model.graph.node:
            self.typed(_quant_type(self.model, node))
        if default_precision is None:
            default_precision = FALLBACK_PRECISION
            if self.float_tail:
                self.types.append(FLOAT_TAIL_PRECISION)
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
      activation quantizes; a linear activation hls4ml splits off keeps that type;
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
