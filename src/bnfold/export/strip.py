"""Strip: a plain QKeras model becomes a float Keras model plus a table of what was removed.

Converting QKeras layers with tf2onnx as they are inlines every quantizer as
dozens of Round/Clip/Mul ops; the float model converts fast and clean. What the
annotate stage needs to put the quantization back is recorded here:

- every kernel and bias of the float model holds *markers*, distinct float32
  values, so that annotate finds each weight in the ONNX graph by value, even
  transposed or reshaped, and puts the QKeras-quantized values there;
- every quantizer on an activation or a model input becomes a ``QuantPoint``,
  an identity op (``PreventGradient`` with a ``bnfold:<id>`` message) that the
  convert stage turns into a recognisable node.

Nested models are flattened; float layers are named ``bnfold_<index>`` so that
ONNX node names lead back to their Keras layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bnfold.accumulator import (
    VALUE_PRESERVING_LAYERS,
    MacLayer,
    mac_types,
    warn_unrepresentable,
)
from bnfold.errors import QuantizerError, UnsupportedLayerError, UnsupportedShapeError
from bnfold.fixedpoint import FixedPoint
from bnfold.folding import constructor_arguments, folded_layer_type
from bnfold.graph import iter_layers, propagate
from bnfold.keras import keras, tf
from bnfold.mac import mac_layer_type

POINT_PREFIX = "bnfold:"
# First marker's bit pattern: 2**64, a value no real weight or constant has; markers
# are the consecutive float32 values above it (room for 5e8 of them before inf).
_MARKER_BASE = int(np.float32(2.0**64).view(np.int32))

_FLOAT_MAC_CLASSES = {
    "QConv1D": keras.layers.Conv1D,
    "QConv2D": keras.layers.Conv2D,
    "QDense": keras.layers.Dense,
    "QDepthwiseConv2D": keras.layers.DepthwiseConv2D,
    "Conv1D": keras.layers.Conv1D,
    "Conv2D": keras.layers.Conv2D,
    "Dense": keras.layers.Dense,
    "DepthwiseConv2D": keras.layers.DepthwiseConv2D,
}
# Layers exported as they are: tf2onnx converts them to standard ops.
_PLAIN_LAYERS = (
    *VALUE_PRESERVING_LAYERS,
    "AveragePooling1D",
    "AveragePooling2D",
    "GlobalAveragePooling1D",
    "GlobalAveragePooling2D",
    "Add",
    "Concatenate",
)
SUPPORTED_LAYERS = (
    *(name for name in _FLOAT_MAC_CLASSES),
    "QActivation",
    "Activation (relu, linear)",
    "ReLU",
    *_PLAIN_LAYERS,
    "nested models",
    *("QConv2DBatchnorm", "QDepthwiseConv2DBatchnorm", "QDenseBatchnorm"),
)
# Settings that describe training, not the computation.
_TRAINING_SETTINGS = ("_initializer", "_regularizer", "_constraint", "_quantizer", "_range")


@dataclass(frozen=True)
class QuantSpec:
    """One quantizer to put back, as a QONNX Quant node.

    Attributes:
        fixed: the grid of the values (before any per-channel scale).
        quantizer: the QKeras quantizer string, for metadata.
        scale: per-channel power-of-two multipliers of ``fixed.step``, or None.
    """

    fixed: FixedPoint
    quantizer: str
    scale: np.ndarray | None = None


@dataclass(frozen=True)
class WeightRecord:
    """A kernel or bias: where its markers start, its real values, how they are quantized."""

    path: str
    role: str  # "kernel" or "bias"
    first_marker: int
    values: np.ndarray
    quant: QuantSpec | None


@dataclass(frozen=True)
class PointRecord:
    """A quantizer on an activation or a model input."""

    path: str
    role: str  # "activation" or "input"
    quant: QuantSpec


@dataclass
class LayerRecord:
    """What the exported ONNX says about one Keras layer (the per-layer table)."""

    path: str
    class_name: str
    kernel_quantizer: str | None = None
    bias_quantizer: str | None = None
    activation: str | None = None
    accumulator: FixedPoint | None = None
    scopes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The JSON-friendly form, as written to ``bnfold.layers`` and ``--report``."""
        return {
            "layer": self.path,
            "class": self.class_name,
            "kernel_quantizer": self.kernel_quantizer,
            "bias_quantizer": self.bias_quantizer,
            "activation": self.activation,
            "accumulator": None
            if self.accumulator is None
            else self.accumulator.quantizer_string(),
            "accumulator_hls": None if self.accumulator is None else self.accumulator.hls(),
        }


@dataclass
class Stripped:
    """The float model and everything annotate needs to quantize its ONNX form."""

    model: keras.Model
    layers: dict[str, LayerRecord]
    weights: list[WeightRecord]
    points: list[PointRecord]
    scopes: dict[str, str]  # float layer name -> Keras layer path
    output_names: list[str]  # the Keras model's output names, for the ONNX outputs


MAX_POINTS = 2**20 - 1


def point_constant(point: int) -> np.float32:
    """The multiplier that stands for QuantPoint ``point`` in the converted graph.

    Distinct and exact in float32 for up to ``MAX_POINTS`` points.
    """
    return np.float32(1.0 + (point + 1) * 2.0**-20)


def marker_index(values: np.ndarray) -> np.ndarray:
    """Marker numbers of float32 marker values (negative or huge where not a marker)."""
    return np.asarray(values, dtype=np.float32).view(np.int32).astype(np.int64) - _MARKER_BASE


def _markers(first: int, shape: tuple[int, ...]) -> np.ndarray:
    count = math.prod(shape)
    return (
        (np.arange(first, first + count, dtype=np.int64) + _MARKER_BASE)
        .astype(np.int32)
        .view(np.float32)
        .reshape(shape)
    )


class QuantPoint(keras.layers.Layer):
    """Identity in the float model; marks where a Quant node goes, by number."""

    def __init__(self, point: int, relu: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.point = point
        self.relu = relu

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        if self.relu:
            inputs = tf.nn.relu(inputs)
        return tf.raw_ops.PreventGradient(input=inputs, message=f"{POINT_PREFIX}{self.point}")

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "point": self.point, "relu": self.relu}


def _activation_quant(quantizer: Any, path: str) -> tuple[QuantSpec, bool]:
    """The Quant for an activation quantizer, and whether a Relu comes before it."""
    name = type(quantizer).__name__
    if name not in ("quantized_bits", "quantized_relu"):
        raise QuantizerError(
            "An activation quantizer must be quantized_bits (alpha None or 1) or "
            f"quantized_relu to export as a QONNX Quant. Received: layer={path!r} with "
            f"quantizer={str(quantizer)!r}"
        )
    _check_full_quantization(quantizer, path)
    fixed = FixedPoint.from_quantizer(quantizer, layer=path)
    return QuantSpec(fixed, str(quantizer)), name == "quantized_relu"


def _check_full_quantization(quantizer: Any, path: str) -> None:
    factor = getattr(quantizer, "qnoise_factor", 1.0)
    if float(np.asarray(factor)) != 1.0:
        raise QuantizerError(
            "A quantizer must fully quantize (qnoise_factor 1) to export. Received: "
            f"layer={path!r} with quantizer={str(quantizer)!r}, qnoise_factor={float(factor)}"
        )


def _weight_quant(
    mac: MacLayer, role: str, path: str, per_channel_scales: bool
) -> QuantSpec | None:
    """The Quant of a kernel or bias; None when QKeras leaves it float.

    Without ``per_channel_scales`` a kernel with per-channel power-of-two scales
    gets one scale, the finest channel step, and a bit width wide enough for
    every channel (the same values; hls4ml 1.3.0 cannot read per-channel scales).
    """
    weights = mac.weights
    layer = mac.layer
    entry = mac_layer_type(layer)
    if role == "kernel":
        quantizer = getattr(layer, entry.kernel_quantizer) if entry.kernel_quantizer else None
        fixed, scale = weights.kernel_grid, weights.kernel_scale
        if not per_channel_scales and scale is not None:
            fixed, scale = weights.kernel_type, None
    else:
        quantizer = getattr(layer, "bias_quantizer_internal", None)
        fixed, scale = weights.bias_type, None
    if quantizer is None:
        return None
    _check_full_quantization(quantizer, path)
    return QuantSpec(fixed, str(quantizer), scale)


def _float_config(layer: Any, float_class: type) -> dict[str, Any]:
    """The settings of ``layer`` that ``float_class`` has, minus training-only ones."""
    accepted = constructor_arguments(float_class)
    return {
        key: value
        for key, value in layer.get_config().items()
        if key in accepted and key != "name" and not key.endswith(_TRAINING_SETTINGS)
    } | {"activation": None}


class _Stripper:
    """Builds the float model layer by layer while recording the table."""

    def __init__(self, macs: dict[str, MacLayer], per_channel_scales: bool) -> None:
        self.macs = macs
        self.per_channel_scales = per_channel_scales
        self.layers: dict[str, LayerRecord] = {}
        self.weights: list[WeightRecord] = []
        self.points: list[PointRecord] = []
        self.scopes: dict[str, str] = {}
        self.float_layers: dict[str, Any] = {}
        self.next_marker = 0

    def _scope(self, path: str) -> str:
        scope = f"bnfold_{len(self.scopes)}"
        self.scopes[scope] = path
        self.layers[path].scopes.append(scope)
        return scope

    def point(self, tensor: Any, path: str, role: str, quant: QuantSpec, relu: bool) -> Any:
        if len(self.points) == MAX_POINTS:
            raise UnsupportedLayerError(
                f"bnfold exports at most {MAX_POINTS} quantized activations and inputs. "
                f"Received: more, at layer={path!r}"
            )
        self.points.append(PointRecord(path, role, quant))
        return QuantPoint(len(self.points) - 1, relu=relu, name=self._scope(path))(tensor)

    def _record(self, path: str, layer: Any) -> LayerRecord:
        if path not in self.layers:
            self.layers[path] = LayerRecord(path, type(layer).__name__)
        return self.layers[path]

    def visit(self, layer: Any, tensors: list[Any], path: str) -> list[Any]:
        record = self._record(path, layer)
        name = type(layer).__name__
        if name in _FLOAT_MAC_CLASSES:
            return [self._mac(layer, tensors[0], path, record)]
        if name == "QActivation":
            quant, relu = _activation_quant(layer.quantizer, path)
            record.activation = quant.quantizer
            return [self.point(tensors[0], path, "activation", quant, relu)]
        if name in ("Activation", "ReLU") or name in _PLAIN_LAYERS:
            return [self._plain(layer, tensors, path)]
        raise UnsupportedLayerError(
            f"bnfold cannot export layers of class {name}. Received: layer={path!r} of class "
            f"{name}. Supported: {', '.join(SUPPORTED_LAYERS)}"
        )

    def _plain(self, layer: Any, tensors: list[Any], path: str) -> Any:
        name = type(layer).__name__
        if name == "Activation" and layer.activation.__name__ not in ("relu", "linear"):
            raise UnsupportedLayerError(
                "An Activation layer must be relu or linear to export. Received: "
                f"layer={path!r} with activation {layer.activation.__name__!r}"
            )
        if name == "ReLU" and (
            layer.max_value is not None
            or float(layer.negative_slope) != 0
            or float(layer.threshold) != 0
        ):
            raise UnsupportedLayerError(
                "A ReLU layer must have no max_value, negative_slope or threshold to export. "
                f"Received: layer={path!r}"
            )
        if path not in self.float_layers:
            config = {**layer.get_config(), "name": self._scope(path)}
            self.float_layers[path] = type(layer).from_config(config)
        float_layer = self.float_layers[path]
        return float_layer(tensors if len(tensors) > 1 else tensors[0])

    def _mac(self, layer: Any, tensor: Any, path: str, record: LayerRecord) -> Any:
        mac = self.macs[path]
        if path not in self.float_layers:
            float_class = _FLOAT_MAC_CLASSES[type(layer).__name__]
            config = _float_config(layer, float_class) | {"name": self._scope(path)}
            float_layer = float_class(**config)
            float_layer.build(tensor.shape)
            markers = []
            for role, values in (("kernel", mac.weights.kernel), ("bias", mac.weights.bias)):
                if values is None:
                    continue
                quant = _weight_quant(mac, role, path, self.per_channel_scales)
                self.weights.append(WeightRecord(path, role, self.next_marker, values, quant))
                markers.append(_markers(self.next_marker, values.shape))
                self.next_marker += values.size
                setattr(record, f"{role}_quantizer", quant and quant.quantizer)
            float_layer.set_weights(markers)
            self.float_layers[path] = float_layer
            record.accumulator = mac.types and mac.types.accumulator
        output = self.float_layers[path](tensor)
        return self._activation(layer.activation, output, path, record)

    def _activation(self, activation: Any, tensor: Any, path: str, record: LayerRecord) -> Any:
        name = getattr(activation, "__name__", None)
        if name == "linear":
            return tensor
        if name == "relu":
            record.activation = "relu"
            return keras.layers.ReLU(name=self._scope(path))(tensor)
        if type(activation).__module__.startswith("qkeras"):
            quant, relu = _activation_quant(activation, path)
            record.activation = quant.quantizer
            return self.point(tensor, path, "activation", quant, relu)
        raise UnsupportedLayerError(
            "A layer's activation must be linear, relu or a QKeras quantizer to export. "
            f"Received: layer={path!r} with activation {name or activation!r}"
        )


def _input_spec(tensor: Any, batch_size: int | None) -> tuple[int | None, ...]:
    """The input's shape; every dimension but the batch must be known, even with a free batch.

    Hardware flows need static shapes, and verification needs sample inputs.
    """
    shape = tuple(tensor.shape[1:])
    if None in shape:
        shown = ", ".join("None" if size is None else str(size) for size in shape)
        raise UnsupportedShapeError(
            "Export needs every input dimension but the batch to be known (hardware flows "
            "need static shapes). Received: input "
            f"{tensor.name.split(':')[0]!r} with shape (batch, {shown}); rebuild the model "
            "on a keras.Input of fixed shape and copy the weights over"
        )
    return (batch_size, *shape)


def strip(
    model: keras.Model,
    source_quantizers: list[Any],
    *,
    batch_size: int | None = 1,
    folded: keras.Model | None = None,
    per_channel_scales: bool = True,
    allow_float: bool = False,
) -> Stripped:
    """Turn a plain (unfolded) QKeras model into a float model with markers, and its table.

    Args:
        model: an unfolded model, bias quantizers populated.
        source_quantizers: one quantizer per model input (None for a float input).
        batch_size: the static batch size of the float model's inputs, or None.
        folded: the model ``model`` was unfolded from, whose layer classes the
            table reports (a user knows their layers as QConv2DBatchnorm, ...).
        per_channel_scales: keep per-channel power-of-two kernel scales as a
            scale tensor; False gives each kernel one scale and a wider bit width.
        allow_float: let MAC layers with a float input or kernel through, without
            an accumulator type (for models with no quantizer at all).

    Returns:
        The float model and the records annotate needs.

    Raises:
        UnsupportedLayerError: a layer or activation bnfold cannot export.
        UnsupportedShapeError: an input dimension other than the batch is unknown.
        QuantizerError: a quantizer with no QONNX Quant form.
        TypeInferenceError: a MAC layer has no accumulator type (unless ``allow_float``).

    Warns:
        RangeWarning: a bias (folded or not) beyond its quantizer's range, or an
            accumulator wider than 32 bits.
    """
    specs = [_input_spec(tensor, batch_size) for tensor in model.inputs]
    macs = mac_types(model, source_quantizers, strict=not allow_float)
    folded_layers = list(iter_layers(folded)) if folded is not None else []
    warn_unrepresentable(
        macs, folded=[path for path, layer in folded_layers if folded_layer_type(layer)]
    )
    stripper = _Stripper(macs, per_channel_scales)
    inputs, starts = [], []
    for tensor, spec, quantizer in zip(model.inputs, specs, source_quantizers, strict=True):
        name = tensor.name.split(":")[0]
        placeholder = keras.Input(batch_shape=spec, name=name)
        inputs.append(placeholder)
        if quantizer is None:
            starts.append(placeholder)
            continue
        stripper.layers.setdefault(name, LayerRecord(name, "InputLayer"))
        quant = QuantSpec(FixedPoint.from_quantizer(quantizer, layer=name), str(quantizer))
        stripper.layers[name].activation = quant.quantizer
        starts.append(stripper.point(placeholder, name, "input", quant, relu=False))
    outputs = propagate(model, starts, stripper.visit)
    for path, layer in folded_layers:
        if path in stripper.layers:
            stripper.layers[path].class_name = type(layer).__name__
    float_model = keras.Model(inputs, outputs, name=f"{model.name}_float")
    return Stripped(
        float_model,
        stripper.layers,
        stripper.weights,
        stripper.points,
        stripper.scopes,
        list(model.output_names),
    )
