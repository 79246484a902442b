"""Strip: a QKeras model becomes a float Keras model plus a table of what was removed.

This is also where the export unfolds: a folded layer (QConv2DBatchnorm, ...)
becomes the float layer holding its folded weights, computed by the folding code
``unfold_model`` uses (``bnfold.mac.quantized_weights``), so the exporter rebuilds
the model in Keras once after loading it, not once to unfold and again to strip.

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

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bnfold.accumulator import (
    FLOAT_MARKER,
    TypeInference,
    infer_types,
    warn_unrepresentable,
    warn_untyped,
)
from bnfold.errors import QuantizerError, UnsupportedLayerError, UnsupportedShapeError
from bnfold.fixedpoint import FixedPoint
from bnfold.folding import constructor_arguments
from bnfold.graph import propagate
from bnfold.keras import keras, tf
from bnfold.layer_table import layer_spec, mac_layer_type
from bnfold.mac import QuantizedWeights
from bnfold.quantizer_table import describe, quantizer_kind
from bnfold.typerules import Untyped, pooled_area

POINT_PREFIX = "bnfold:"
# First marker's bit pattern: 2**64, a value no real weight or constant has; markers
# are the consecutive float32 values above it (room for 5e8 of them before inf).
_MARKER_BASE = int(np.float32(2.0**64).view(np.int32))

# Settings that describe training, not the computation.
_TRAINING_SETTINGS = ("_initializer", "_regularizer", "_constraint", "_quantizer", "_range")


@dataclass(frozen=True)
class QuantSpec:
    """One quantizer to put back, as a QONNX Quant node.

    Attributes:
        fixed: the grid of the values (before any per-channel scale).
        quantizer: the QKeras quantizer string, for metadata.
        scale: per-channel power-of-two multipliers of ``fixed.step``, or None.
        node: the QONNX op, ``"Quant"`` or ``"BipolarQuant"`` (+-1, scale ``fixed.step``).
        rounding: the Quant node's ``rounding_mode``.
    """

    fixed: FixedPoint
    quantizer: str
    scale: np.ndarray | None = None
    node: str = "Quant"
    rounding: str = "ROUND"


@dataclass(frozen=True)
class WeightRecord:
    """A kernel or bias: where its markers start, its real values, how they are quantized."""

    path: str
    role: str  # "kernel" or "bias"
    first_marker: int
    values: np.ndarray
    quant: QuantSpec | None
    mac: int = 0  # which of the layer's MACs it belongs to (see ``MacLayerType.kernels``)


@dataclass(frozen=True)
class PointRecord:
    """A quantizer on an activation or a model input, or a probe.

    A probe (role "probe", no quant) marks a fixed-point tensor that a float
    layer reads: the last exact values before a float tail, which verification
    compares exactly. ``path`` is then the float layer, ``index`` which of its
    inputs (-1: a MAC layer's own output, before its float activation). A
    barrier (role "barrier", no quant) only keeps tf2onnx from merging two ops;
    annotate removes both kinds.
    """

    path: str
    role: str  # "activation", "input", "probe" or "barrier"
    quant: QuantSpec | None
    index: int = 0


@dataclass(frozen=True)
class EarlierMac:
    """A MAC before a layer's last one (a separable convolution's depthwise stage)."""

    kernel_quantizer: str | None
    accumulator: FixedPoint | None

    def summary(self) -> dict[str, str | None]:
        """Its node metadata, and its entry in ``bnfold.layers``."""
        fixed = self.accumulator
        return {
            "kernel_quantizer": self.kernel_quantizer,
            "accumulator": None if fixed is None else fixed.quantizer_string(),
            "accumulator_hls": None if fixed is None else fixed.hls(),
        }


@dataclass
class LayerRecord:
    """What the exported ONNX says about one Keras layer (the per-layer table)."""

    path: str
    class_name: str
    kernel_quantizer: str | None = None
    bias_quantizer: str | None = None
    activation: str | None = None
    accumulator: FixedPoint | None = None
    untyped: str | None = None  # why a MAC layer has no accumulator type
    scopes: list[str] = field(default_factory=list)
    # The quantizer and accumulator above are the last MAC's; these, the ones before it.
    earlier_macs: list[EarlierMac] = field(default_factory=list)

    def accumulator_marker(self) -> str | None:
        """``bnfold.accumulator``: the type's quantizer string, or why it is float."""
        if self.accumulator is not None:
            return self.accumulator.quantizer_string()
        return None if self.untyped is None else f"{FLOAT_MARKER}{self.untyped}"

    def summary(self) -> dict[str, Any]:
        """The JSON-friendly form, as written to ``bnfold.layers`` and ``--report``."""
        return {
            "layer": self.path,
            "class": self.class_name,
            "kernel_quantizer": self.kernel_quantizer,
            "bias_quantizer": self.bias_quantizer,
            "activation": self.activation,
            "accumulator": self.accumulator_marker(),
            "accumulator_hls": None if self.accumulator is None else self.accumulator.hls(),
        } | (
            {"earlier_macs": [mac.summary() for mac in self.earlier_macs]}
            if self.earlier_macs
            else {}
        )


@dataclass
class Stripped:
    """The float model and everything annotate needs to quantize its ONNX form."""

    model: keras.Model
    layers: dict[str, LayerRecord]
    weights: list[WeightRecord]
    points: list[PointRecord]
    scopes: dict[str, str]  # float layer name -> Keras layer path
    output_names: list[str]  # the Keras model's output names, for the ONNX outputs
    float_outputs: list[str]  # those computed after a float op: verified within a tolerance


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
    """Identity in the float model; marks where a Quant node goes, by number.

    ``before`` is the float op of the quantizer that comes before its Quant node (a
    Relu for ``quantized_relu``), from the quantizer table; tf2onnx converts it.
    """

    def __init__(self, point: int, before: Callable[[Any], Any] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.point = point
        self.before = before

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        if self.before is not None:
            inputs = self.before(inputs)
        return tf.raw_ops.PreventGradient(input=inputs, message=f"{POINT_PREFIX}{self.point}")

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "point": self.point}


def _activation_quant(quantizer: Any, path: str) -> tuple[QuantSpec, Callable[[Any], Any]]:
    """The Quant for an activation quantizer, and the float op that comes before it.

    Every quantizer with a type has an activation form in the quantizer table.
    """
    _check_full_quantization(quantizer, path)
    fixed = FixedPoint.from_quantizer(quantizer, layer=path)
    kind = quantizer_kind(quantizer)
    form = kind.activation
    if form.node == "BipolarQuant" and fixed.min != -fixed.max:
        raise QuantizerError(
            f"{kind.name} exports on activations as a QONNX BipolarQuant, which outputs -1 "
            f"and 1, not 0 and 1 (use_01). Received: layer={path!r} with "
            f"quantizer={describe(quantizer)!r}"
        )
    quant = QuantSpec(fixed, describe(quantizer), node=form.node, rounding=form.rounding)
    return quant, functools.partial(form.before, quantizer)


def _check_full_quantization(quantizer: Any, path: str) -> None:
    factor = getattr(quantizer, "qnoise_factor", 1.0)
    if float(np.asarray(factor)) != 1.0:
        raise QuantizerError(
            "A quantizer must fully quantize (qnoise_factor 1) to export. Received: "
            f"layer={path!r} with quantizer={describe(quantizer)!r}, qnoise_factor={float(factor)}"
        )


def _weight_quant(
    layer: Any,
    weights: QuantizedWeights,
    quantizer: Any,
    role: str,
    path: str,
    per_channel_scales: bool,
) -> QuantSpec | None:
    """The Quant of a kernel or bias; None when QKeras leaves it float.

    Without ``per_channel_scales`` a kernel with per-channel power-of-two scales
    gets one scale, the finest channel step, and a bit width wide enough for
    every channel (the same values; hls4ml 1.3.0 cannot read per-channel scales).
    """
    if role == "kernel":
        fixed, scale = weights.kernel_grid, weights.kernel_scale
        if not per_channel_scales and scale is not None:
            fixed, scale = weights.kernel_type, None
    else:
        fixed, scale = weights.bias_type, None
    if quantizer is None:
        return None
    _check_full_quantization(quantizer, path)
    return QuantSpec(fixed, describe(quantizer), scale)


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

    def __init__(self, types: TypeInference, per_channel_scales: bool, quantized: bool) -> None:
        self.quantized = quantized
        self.macs = types.macs
        self.types = types.layers
        self.after_float = types.after_float
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

    def point(
        self,
        tensor: Any,
        path: str,
        role: str,
        quant: QuantSpec | None,
        before: Callable[[Any], Any] | None,
        index: int = 0,
    ) -> Any:
        if len(self.points) == MAX_POINTS:
            raise UnsupportedLayerError(
                f"bnfold exports at most {MAX_POINTS} quantized activations and inputs. "
                f"Received: more, at layer={path!r}"
            )
        self.points.append(PointRecord(path, role, quant, index))
        return QuantPoint(len(self.points) - 1, before, name=self._scope(path))(tensor)

    def _record(self, path: str, layer: Any) -> LayerRecord:
        if path not in self.layers:
            self.layers[path] = LayerRecord(path, type(layer).__name__)
        return self.layers[path]

    def visit(self, layer: Any, tensors: list[Any], path: str) -> list[Any]:
        record = self._record(path, layer)
        if path not in self.float_layers and self._starts_float_tail(path):
            inputs, after_float = self.types[path][0], self.after_float[path]
            tensors = [
                self.point(tensor, path, "probe", None, None, index)
                if isinstance(value, FixedPoint) and not floated
                else tensor
                for index, (tensor, value, floated) in enumerate(
                    zip(tensors, inputs, after_float, strict=True)
                )
            ]
        spec = layer_spec(layer)
        if spec.computes is not None:
            record.activation = spec.computes(layer)
        return [getattr(self, f"_{spec.export}")(layer, tensors, path, record)]

    def _starts_float_tail(self, path: str) -> bool:
        """Whether the layer's output is float while an input is fixed point.

        A MAC layer with a type computes exactly; a float activation after it is
        probed on its own (``_activation``).
        """
        inputs, outputs = self.types[path]
        mac = self.macs.get(path)
        if mac is not None and mac.types is not None:
            return False
        return isinstance(outputs[0], Untyped) and any(
            isinstance(value, FixedPoint) for value in inputs
        )

    def _quantizer(self, layer: Any, tensors: list[Any], path: str, record: LayerRecord) -> Any:
        quant, before = _activation_quant(layer.quantizer, path)
        record.activation = quant.quantizer
        return self.point(tensors[0], path, "activation", quant, before)

    def _copy(self, layer: Any, tensors: list[Any], path: str, record: LayerRecord) -> Any:
        return self._rebuilt(layer, tensors, path, type(layer), layer.get_config(), layer.weights)

    def _average(self, layer: Any, tensors: list[Any], path: str, record: LayerRecord) -> Any:
        """QAveragePooling2D, QGlobalAveragePooling2D, computed as QKeras computes them.

        The float mean; with an ``average_quantizer``, times the count, then times
        the quantized reciprocal of the count: two multiplications, each rounded in
        float32 as in QKeras, kept apart by a barrier. Then the activation.
        """
        float_class = getattr(keras.layers, type(layer).__name__.removeprefix("Q"))
        accepted = constructor_arguments(float_class) - {"name"}
        config = {key: value for key, value in layer.get_config().items() if key in accepted}
        tensor = self._rebuilt(layer, tensors, path, float_class, config, [])
        quantizer = layer.average_quantizer_internal
        if quantizer is not None:
            # The quantized 1/count is the one weight it multiplies by (a depthwise
            # Conv's kernel, as hls4ml reads it); the table shows its quantizer there.
            record.kernel_quantizer = describe(quantizer)
            area = np.float32(pooled_area(layer))
            reciprocal = np.float32(quantizer(np.float32(1.0) / area))
            tensor = _scaled(tensor, area, self._scope(path))
            tensor = self.point(tensor, path, "barrier", None, None)
            tensor = _scaled(tensor, reciprocal, self._scope(path))
        return self._activation(layer.activation, tensor, path, record)

    def _batchnorm(self, layer: Any, tensors: list[Any], path: str, record: LayerRecord) -> Any:
        """A BatchNormalization with the weights ``layer`` computes with at inference.

        QBatchNormalization quantizes gamma, beta, mean and variance before
        normalizing; the exported op holds those quantized values. It stays a
        batch normalization, not folded into the layer before it, whose kernel was
        quantized before the normalization: folding would change the numbers.
        tf2onnx writes it as ONNX ``BatchNormalization`` on 4-D tensors, which
        hls4ml's ONNX front end reads (after qonnx's channels-last pass, which
        converts BatchNormalization but moves only scalar Mul/Add) and FINN's
        streamlining turns into thresholds; on 2-D tensors Keras computes it as a
        Mul and an Add with constants, which both read as well.
        """
        if not any(point.path == path for point in self.points[-1:]):
            # tf2onnx folds a batch normalization into the convolution before it,
            # kernel markers included; a point between them keeps them apart.
            tensors = [self.point(tensors[0], path, "barrier", None, None)]
        config = {
            key: value
            for key, value in layer.get_config().items()
            if key in constructor_arguments(keras.layers.BatchNormalization)
            and not key.endswith(_TRAINING_SETTINGS)
        }
        return self._rebuilt(
            layer, tensors, path, keras.layers.BatchNormalization, config, batchnorm_weights(layer)
        )

    def _rebuilt(
        self, layer: Any, tensors: list[Any], path: str, cls: type, config: dict, weights: list
    ) -> Any:
        """``layer`` as a new ``cls`` layer (once, even when shared) with ``weights``."""
        inputs = tensors if len(tensors) > 1 else tensors[0]
        if path in self.float_layers:
            return self.float_layers[path](inputs)
        float_layer = cls.from_config({**config, "name": self._scope(path)})
        output = float_layer(inputs)
        float_layer.set_weights([np.asarray(weight) for weight in weights])
        self.float_layers[path] = float_layer
        return output

    def _mac(self, layer: Any, tensors: list[Any], path: str, record: LayerRecord) -> Any:
        tensor = tensors[0]
        mac = self.macs[path]
        if path not in self.float_layers:
            entry = mac_layer_type(layer)
            float_class = getattr(keras.layers, entry.float_class)
            # A folded layer always has a folded bias, whatever its own use_bias says.
            config = _float_config(layer, float_class) | {
                "name": self._scope(path),
                "use_bias": mac.weights.bias is not None,
            }
            float_layer = float_class(**config)
            float_layer.build(tensor.shape)
            stages = _stages(mac.weights)
            types = _stages(mac.types) if mac.types is not None else [None] * len(stages)
            # The float layer's weights: its kernels in order, then the bias.
            weights = [
                (
                    number,
                    "kernel",
                    stage.kernel,
                    getattr(layer, kernel.quantizer) if kernel.quantizer else None,
                )
                for number, (stage, kernel) in enumerate(zip(stages, entry.kernels, strict=True))
            ]
            if mac.weights.bias is not None:
                quantizer = getattr(layer, "bias_quantizer_internal", None)
                weights.append((len(stages) - 1, "bias", mac.weights.bias, quantizer))
            markers = []
            for number, role, values, quantizer in weights:
                quant = _weight_quant(
                    layer, stages[number], quantizer, role, path, self.per_channel_scales
                )
                self.weights.append(
                    WeightRecord(path, role, self.next_marker, values, quant, number)
                )
                markers.append(_markers(self.next_marker, values.shape))
                self.next_marker += values.size
                if number == len(stages) - 1:
                    setattr(record, f"{role}_quantizer", quant and quant.quantizer)
                else:
                    record.earlier_macs.append(
                        EarlierMac(
                            quant and quant.quantizer, types[number] and types[number].accumulator
                        )
                    )
            float_layer.set_weights(markers)
            self.float_layers[path] = float_layer
            record.accumulator = mac.types and mac.types.accumulator
            record.untyped = mac.untyped if self.quantized else None
        output = self.float_layers[path](tensor)
        return self._activation(layer.activation, output, path, record)

    def _activation(self, activation: Any, tensor: Any, path: str, record: LayerRecord) -> Any:
        """A MAC layer's activation: a QKeras quantizer is a Quant, a function its own layer."""
        name = getattr(activation, "__name__", None)
        if activation is None or name == "linear":
            return tensor
        if type(activation).__module__.startswith("qkeras"):
            quant, before = _activation_quant(activation, path)
            record.activation = quant.quantizer
            return self.point(tensor, path, "activation", quant, before)
        record.activation = name
        if record.accumulator is not None and name != "relu" and not any(self.after_float[path]):
            tensor = self.point(tensor, path, "probe", None, None, -1)
        return keras.layers.Activation(activation, name=self._scope(path))(tensor)


def _scaled(tensor: Any, factor: np.float32, name: str) -> Any:
    """``tensor * factor`` in float32: one ONNX Mul by a constant."""
    return keras.layers.Lambda(lambda values: values * factor, name=name)(tensor)


def _stages(last: Any) -> list[Any]:
    """A chain of ``before`` links (weights or types of a MAC layer), first MAC first."""
    chain = [last]
    while chain[0].before is not None:
        chain.insert(0, chain[0].before)
    return chain


def batchnorm_weights(layer: Any) -> list[np.ndarray]:
    """gamma, beta, moving mean and variance as ``layer`` applies them at inference.

    A QBatchNormalization applies its gamma, beta, mean and variance quantizers
    to them first; a missing gamma (``scale=False``) or beta (``center=False``)
    stays missing, as in a BatchNormalization with the same settings.
    """
    weights = []
    for name, quantizer in (
        ("gamma", "gamma_quantizer_internal"),
        ("beta", "beta_quantizer_internal"),
        ("moving_mean", "mean_quantizer_internal"),
        ("moving_variance", "variance_quantizer_internal"),
    ):
        variable = getattr(layer, name)
        if variable is None:
            continue
        apply = getattr(layer, quantizer, None)
        weights.append(np.asarray(apply(variable) if apply else variable, dtype=np.float32))
    return weights


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
    per_channel_scales: bool = True,
    strict: bool = False,
    quantized: bool = True,
) -> Stripped:
    """Turn a QKeras model into a float model with markers, and its table, unfolding as it goes.

    Args:
        model: a model with bias quantizers populated, its folded layers as they
            are (or already unfolded: the float model is the same). The table
            reports its layer classes, as the user knows them (QConv2DBatchnorm, ...).
        source_quantizers: one quantizer per model input (None for a float input).
        batch_size: the static batch size of the float model's inputs, or None.
        per_channel_scales: keep per-channel power-of-two kernel scales as a
            scale tensor; False gives each kernel one scale and a wider bit width.
        strict: raise instead of warning when a MAC layer has no accumulator type.
        quantized: False for a model without quantizers, whose MAC layers have no
            types by design (no warnings then).

    Returns:
        The float model and the records annotate needs.

    Raises:
        UnsupportedLayerError: a layer or activation bnfold cannot export.
        UnsupportedShapeError: an input dimension other than the batch is unknown.
        QuantizerError: a quantizer with no QONNX Quant form.
        TypeInferenceError: with ``strict``, a MAC layer has no accumulator type.

    Warns:
        UntypedAccumulatorWarning: naming each MAC layer without an accumulator type.
        RangeWarning: a bias (folded or not) beyond its quantizer's range, or an
            accumulator wider than 32 bits.
    """
    specs = [_input_spec(tensor, batch_size) for tensor in model.inputs]
    types = infer_types(model, source_quantizers, strict=strict and quantized)
    if quantized:
        warn_untyped(types.macs)
    warn_unrepresentable(types.macs)
    stripper = _Stripper(types, per_channel_scales, quantized)
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
        starts.append(stripper.point(placeholder, name, "input", quant, None))
    outputs = propagate(model, starts, stripper.visit)
    float_model = keras.Model(inputs, outputs, name=f"{model.name}_float")
    return Stripped(
        float_model,
        stripper.layers,
        stripper.weights,
        stripper.points,
        stripper.scopes,
        list(model.output_names),
        [
            name
            for name, floated in zip(model.output_names, types.outputs_after_float, strict=True)
            if floated
        ],
    )
