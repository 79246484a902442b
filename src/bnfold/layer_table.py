"""Every Keras layer class bnfold handles, one entry each, and everything bnfold does with it.

An entry says how the type of the layer's output follows from its inputs (a rule
of ``bnfold.typerules``; a MAC layer is typed from its weights instead), where a
MAC layer keeps its kernels (a separable convolution has two), how the strip
stage exports the layer, the ONNX ops it becomes, whether the export computes it
exactly, and what hls4ml's ONNX front end and FINN read of it. The README's
table of supported layers is checked against this one by a test. Adding a layer
class is one entry here and its test. Folded layers stay in
``bnfold.folding.FOLDED_LAYER_TYPES``, the one place for them; their entries
here are derived from it.

Export kinds (``LayerSpec.export``), one method each in the strip stage:

- ``"mac"``: rebuilt as the plain Keras class ``float_class`` holding weight
  markers; its kernel and bias quantizers become Quant nodes. A folded layer is
  one too: its markers stand for its folded weights (the strip stage unfolds).
- ``"quantizer"``: the layer's quantizer becomes a Quant node.
- ``"copy"``: rebuilt from its config with its weights; tf2onnx converts it.
- ``"average"``: a QKeras average pooling layer: the float pooling layer, the
  multiplications by the count and the quantized reciprocal that QKeras does
  with an ``average_quantizer``, and the activation's Quant.
- ``"batchnorm"``: a Keras BatchNormalization holding the weights the layer
  computes with (QBatchNormalization: after its quantizers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bnfold import typerules
from bnfold.errors import UnsupportedLayerError
from bnfold.folding import FOLDED_LAYER_TYPES
from bnfold.graph import iter_layers
from bnfold.keras import keras


@dataclass(frozen=True)
class Kernel:
    """One kernel of a MAC layer.

    Attributes:
        attribute: attribute name of the kernel variable.
        quantizer: attribute holding its quantizer object, None for plain Keras layers.
        output_axes: the kernel axes (negative) that index output channels; the
            other axes are summed over, so their sizes multiply to the number of
            products summed per output (at most, for a transposed convolution).
    """

    attribute: str
    quantizer: str | None
    output_axes: tuple[int, ...] = (-1,)


@dataclass(frozen=True)
class MacLayerType:
    """Where a MAC layer keeps its kernels and kernel quantizers.

    Attributes:
        kernels: the kernels in the order the layer applies them; each multiplies
            the unrounded sums of the one before (a separable convolution: the
            depthwise, then the pointwise kernel). The bias and activation follow
            the last one.
        float_class: the plain Keras class the strip stage rebuilds it as.
    """

    kernels: tuple[Kernel, ...]
    float_class: str


@dataclass(frozen=True)
class LayerSpec:
    """What bnfold does with one Keras layer class.

    Attributes:
        name: the Keras class name.
        export: how the strip stage exports it (see the module docstring).
        onnx: the ONNX ops it becomes, as the README shows them.
        exact: "exact" when the export computes it bit for bit as QKeras does,
            "float" when within the float tolerance, or the condition for exact.
        hls4ml: what hls4ml 1.3.0's ONNX front end makes of those ops.
        finn: what FINN (through QONNX) makes of them.
        type_rule: the output type from the input types; None for MAC layers,
            which are typed from their weights.
        mac: where a MAC layer keeps its kernels; None for other layers.
        computes: for a layer that is an activation or normalization itself, the
            function it computes as the per-layer table names it (``activation``
            column), e.g. ``leaky_relu(alpha=0.2)``; None for other layers.
    """

    name: str
    export: str
    onnx: str
    exact: str
    hls4ml: str
    finn: str
    type_rule: typerules.TypeRule | None = None
    mac: MacLayerType | None = None
    computes: Callable[[Any], str] | None = None


@dataclass(frozen=True)
class ActivationFunction:
    """A Keras activation function (``Activation`` layer or ``activation=`` argument)."""

    name: str
    onnx: str
    exact: str
    hls4ml: str
    finn: str


_MOVES = "yes"
_SWISH = "yes (its sigmoid from a 1024-entry table: within abs(x)/256)"
# hls4ml's tables span inputs in [-8, 8); measured after a QDense with outputs in [-20.5, 21.1].
_SATURATING = "for inputs in [-8, 8) (its table stays at its value at 8 beyond: %g off at x = 21)"


def _table(measured: float) -> str:
    return f"yes (lookup table; measured within {measured:g})"


_FLOAT_OP = "no (float op, left to software)"
# FINN's step_streamline lowers a grouped Conv only when it has as many outputs as inputs
# (qonnx's LowerConvsToMatMul); measured on golden separable_gap (README, FINN section).
_MULTIPLIER_STOPS = (
    "depth_multiplier > 1: no (step_streamline stops: qonnx's LowerConvsToMatMul "
    "cannot lower the grouped Conv)"
)
_FINN_BY_KIND = {
    "Depthwise": f"yes, depth_multiplier 1; {_MULTIPLIER_STOPS}",
    "Separable": (
        "depth_multiplier 1: streamlined exactly, its hardware not measured (in "
        f"quantized_pooling it follows a software AveragePool); {_MULTIPLIER_STOPS}"
    ),
}


# A MAC layer's kernels, by kind: the kernel attribute and its quantizer's name
# (QKeras keeps the quantizer object in "<name>_internal"), and output-channel axes.
_KERNELS = {
    "Separable": (
        ("depthwise_kernel", "depthwise_quantizer", (-2, -1)),
        ("pointwise_kernel", "pointwise_quantizer", (-1,)),
    ),
    "Depthwise": (("depthwise_kernel", "depthwise_quantizer", (-2, -1)),),
    # A transposed convolution's kernel is (height, width, filters, input channels).
    "Transpose": (("kernel", "kernel_quantizer", (-2,)),),
    "": (("kernel", "kernel_quantizer", (-1,)),),
}


def _mac(name: str, float_class: str, quantized: bool, onnx: str, hls4ml: str) -> LayerSpec:
    kind = next(kind for kind in _KERNELS if kind in name)
    kernels = tuple(
        Kernel(attribute, f"{quantizer}_internal" if quantized else None, axes)
        for attribute, quantizer, axes in _KERNELS[kind]
    )
    return LayerSpec(
        name,
        "mac",
        f"{onnx} (+ Quant on weights)" if quantized else onnx,
        "exact" if quantized else "exact if its weights and input are fixed point",
        hls4ml,
        _FINN_BY_KIND.get(kind, "yes") if quantized else _FLOAT_OP,
        mac=MacLayerType(kernels, float_class),
    )


def _plain(
    name: str, rule: typerules.TypeRule, onnx: str, hls4ml: str = _MOVES, finn: str = "yes"
) -> LayerSpec:
    return LayerSpec(name, "copy", onnx, "exact", hls4ml, finn, type_rule=rule)


def _no_handler(*ops: str) -> str:
    return f"no (no handler for {', '.join(ops)})"


def _float(
    name: str, onnx: str, hls4ml: str, computes: Callable[[Any], str], export: str = "copy"
) -> LayerSpec:
    return LayerSpec(
        name,
        export,
        onnx,
        "float",
        hls4ml,
        _FLOAT_OP,
        type_rule=typerules.float_output,
        computes=computes,
    )


# What FINN's build steps made of these layers in the test models (README, FINN section).
_FINN_SEQUENCE = (
    "no (in sequence_decoder, FINN's step_qonnx_to_finn leaves tensors without shapes, so the "
    "model no longer executes, and step_convert_to_hw stops: IndexError)"
)
_FINN_SOFTWARE = "no ({} stays in software at step_convert_to_hw{})"
_PAD_1D = "no (hls4ml 1.3.0 mis-shapes a 1-D Pad: the next Reshape's shapes differ)"


def _call(function: str, layer: Any, **defaults: Any) -> str:
    """``function(setting=value, ...)`` for the settings of ``layer`` that differ from
    ``defaults``; ``function`` alone when none does."""
    settings = []
    for key, default in defaults.items():
        value = getattr(layer, key, default)
        if value is not None and not isinstance(value, str | int):
            value = float(value)  # Keras keeps some settings as NumPy scalars
        if value != default:
            settings.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    return f"{function}({', '.join(settings)})" if settings else function


def _batchnorm(layer: Any) -> str:
    text = _call("batchnorm", layer, epsilon=1e-3)
    # The quantizer objects: a layer read from a file keeps only their configs in
    # ``gamma_quantizer``, ...
    quantizers = [
        f"{name}={quantizer}"
        for name in ("gamma", "beta", "mean", "variance")
        if (quantizer := getattr(layer, f"{name}_quantizer_internal", None)) is not None
    ]
    return f"{text}, quantized {', '.join(quantizers)}" if quantizers else text


_NO_CONV1D = "no (hls4ml 1.3.0 reads no 1-D Conv from ONNX)"
# A separable convolution is a depthwise, then a pointwise convolution.
_SEPARABLE = "Conv (group) + Conv (1x1)"
_SEPARABLE_1D = "Conv (group) + Conv (1-D, the second 1-wide)"
_SEPARABLE_HLS4ML = "yes, depth_multiplier 1"
_NO_TRANSPOSE = "no (hls4ml 1.3.0 reads no transposed convolution, from ONNX or Keras)"
_AVERAGE = (
    "yes, as a depthwise Conv, when unpadded: exact over a power-of-two window, else its "
    "weights 1/n rounded (see hls4ml below)"
)
# With an average_quantizer, QKeras computes (mean * n) * q(1/n): the sum times q(1/n).
_QUANTIZED_AVERAGE_HLS4ML = (
    "yes, as a depthwise Conv, when unpadded; with average_quantizer its weights are the "
    "quantized 1/count: bit for bit over a power-of-two count, else exact where QKeras "
    "rounds the mean in float32 (see hls4ml below)"
)
_BATCHNORM = (
    "BatchNormalization (4-D); Mul + Add (2-D)",
    "yes (BatchNormOnnx; Mul + Add with constants become ApplyAlpha)",
    "yes (streamlined into thresholds)",
)

LAYERS: dict[str, LayerSpec] = {
    spec.name: spec
    for spec in (
        _mac("QConv1D", "Conv1D", True, "Conv", _NO_CONV1D),
        _mac("QConv2D", "Conv2D", True, "Conv", "yes"),
        _mac(
            "QDepthwiseConv2D", "DepthwiseConv2D", True, "Conv (group)", "yes, depth_multiplier 1"
        ),
        _mac("QDense", "Dense", True, "MatMul + Add", "yes"),
        _mac("QSeparableConv1D", "SeparableConv1D", True, _SEPARABLE_1D, _NO_CONV1D),
        _mac("QSeparableConv2D", "SeparableConv2D", True, _SEPARABLE, _SEPARABLE_HLS4ML),
        _mac("Conv1D", "Conv1D", False, "Conv", _NO_CONV1D),
        _mac("Conv2D", "Conv2D", False, "Conv", "yes"),
        _mac(
            "DepthwiseConv2D", "DepthwiseConv2D", False, "Conv (group)", "yes, depth_multiplier 1"
        ),
        _mac("Dense", "Dense", False, "MatMul + Add", "yes"),
        _mac("SeparableConv1D", "SeparableConv1D", False, _SEPARABLE_1D, _NO_CONV1D),
        _mac("SeparableConv2D", "SeparableConv2D", False, _SEPARABLE, _SEPARABLE_HLS4ML),
        _mac("DepthwiseConv1D", "DepthwiseConv1D", False, "Conv (group)", _NO_CONV1D),
        # QKeras 0.9.0's QConv2DTranspose fails when called on TensorFlow 2.21
        # (array_ops.stack is gone), so a model with it has no QKeras reference.
        _mac("Conv2DTranspose", "Conv2DTranspose", False, "ConvTranspose", _NO_TRANSPOSE),
        *(
            LayerSpec(
                entry.folded,
                "mac",
                f"as {entry.plain.__name__}",
                "exact",
                "yes",
                "yes",
                mac=MacLayerType(
                    (
                        Kernel(
                            entry.kernel,
                            f"{entry.kernel_quantizer}_internal",
                            tuple(range(-entry.output_channel_axes, 0)),
                        ),
                    ),
                    entry.plain.__name__.removeprefix("Q"),
                ),
            )
            for entry in FOLDED_LAYER_TYPES.values()
        ),
        LayerSpec(
            "QActivation",
            "quantizer",
            "Quant (quantized_relu: Relu + Quant)",
            "exact",
            "yes",
            "yes",
            type_rule=typerules.quantized,
        ),
        LayerSpec(
            "Activation",
            "copy",
            "the function's ops (table below)",
            "exact for relu and linear",
            "see the function",
            "see the function",
            type_rule=typerules.activation,
            computes=lambda layer: getattr(layer.activation, "__name__", str(layer.activation)),
        ),
        LayerSpec(
            "ReLU",
            "copy",
            "Relu; Clip, LeakyRelu or ThresholdedRelu with options",
            "exact without options",
            "yes without max_value (" + _no_handler("Clip") + ")",
            "yes without options",
            type_rule=typerules.relu_layer,
            computes=lambda layer: _call(
                "relu", layer, max_value=None, negative_slope=0.0, threshold=0.0
            ),
        ),
        _float("Softmax", "Softmax", "yes", lambda layer: _call("softmax", layer, axis=-1)),
        _float(
            "LeakyReLU", "LeakyRelu", "yes", lambda layer: _call("leaky_relu", layer, alpha=0.0)
        ),
        _float(
            "ELU",
            "Elu (alpha 1); Elu, Greater, Not, Cast, Mul, Add otherwise",
            "alpha 1 only",
            lambda layer: _call("elu", layer, alpha=0.0),
        ),
        _float(
            "PReLU", "Relu, Neg, Mul, Add", _no_handler("Neg"), lambda _: "prelu (learned slopes)"
        ),
        _float(
            "ThresholdedReLU",
            "ThresholdedRelu",
            "yes",
            lambda layer: _call("thresholded_relu", layer, theta=0.0),
        ),
        _float("BatchNormalization", *_BATCHNORM[:2], _batchnorm, export="batchnorm"),
        _float("QBatchNormalization", *_BATCHNORM[:2], _batchnorm, export="batchnorm"),
        *(
            _plain(name, typerules.same, onnx, hls4ml)
            for name, onnx, hls4ml in (
                ("MaxPooling1D", "Unsqueeze, MaxPool, Squeeze", _no_handler("Unsqueeze")),
                ("MaxPooling2D", "MaxPool", _MOVES),
                ("GlobalMaxPooling1D", "ReduceMax", _no_handler("ReduceMax")),
                ("GlobalMaxPooling2D", "ReduceMax", _no_handler("ReduceMax")),
                ("Flatten", "Reshape", _MOVES),
                ("Reshape", "Reshape", _MOVES),
                ("Permute", "Transpose", _MOVES),
                ("ZeroPadding1D", "Pad", _PAD_1D),
                ("ZeroPadding2D", "Pad", _MOVES),
                ("Cropping1D", "Slice", _no_handler("Slice")),
                ("Cropping2D", "Slice", _no_handler("Slice")),
                ("Dropout", "(nothing)", _MOVES),
                ("SpatialDropout1D", "(nothing)", _MOVES),
                ("SpatialDropout2D", "(nothing)", _MOVES),
            )
        ),
        *(
            LayerSpec(
                name,
                "copy",
                onnx,
                "exact over a power-of-two window, else float",
                hls4ml,
                "yes",
                type_rule=rule,
            )
            for name, onnx, rule, hls4ml in (
                (
                    "AveragePooling1D",
                    "Unsqueeze, AveragePool, Squeeze",
                    typerules.average_pooling,
                    _no_handler("Unsqueeze"),
                ),
                ("AveragePooling2D", "AveragePool", typerules.average_pooling, _AVERAGE),
                (
                    "GlobalAveragePooling1D",
                    "ReduceMean or GlobalAveragePool",
                    typerules.global_average_pooling,
                    _AVERAGE,
                ),
                (
                    "GlobalAveragePooling2D",
                    "ReduceMean or GlobalAveragePool",
                    typerules.global_average_pooling,
                    _AVERAGE,
                ),
            )
        ),
        *(
            LayerSpec(
                name,
                "average",
                f"{onnx}; with average_quantizer then Mul (count), Mul (quantized 1/count)",
                "exact over a power-of-two count, else float",
                hls4ml,
                finn,
                type_rule=typerules.quantized_average_pooling,
            )
            for name, onnx, hls4ml, finn in (
                (
                    "QAveragePooling2D",
                    "AveragePool",
                    _QUANTIZED_AVERAGE_HLS4ML,
                    "no (exact through step_streamline, then its AveragePool stays in software)",
                ),
                (
                    "QGlobalAveragePooling2D",
                    "ReduceMean or GlobalAveragePool",
                    _QUANTIZED_AVERAGE_HLS4ML,
                    "partly (exact through step_streamline; its sum becomes GlobalAccPool, its "
                    "Mul by 1/count stays in software)",
                ),
            )
        ),
        LayerSpec(
            "UpSampling1D",
            "copy",
            "Split, Concat",
            "exact",
            _no_handler("Split"),
            _FINN_SEQUENCE,
            type_rule=typerules.upsampling,
        ),
        LayerSpec(
            "UpSampling2D",
            "copy",
            "Resize (nearest, linear or cubic)",
            "exact; bilinear: exact over power-of-two factors; bicubic, area: float",
            "no (hls4ml 1.3.0 fails on the empty roi input of tf2onnx's Resize)",
            _FINN_SOFTWARE.format(
                "Resize",
                "; nearest and bilinear exact through the steps before, with --round-half-even",
            ),
            type_rule=typerules.upsampling,
        ),
        _plain(
            "RepeatVector",
            typerules.same,
            "Unsqueeze, Tile",
            _no_handler("Unsqueeze"),
            _FINN_SEQUENCE,
        ),
        _plain("Add", typerules.add, "Add"),
        _plain("Subtract", typerules.subtract, "Sub", finn="yes (ElementwiseSub)"),
        _plain("Multiply", typerules.multiply, "Mul", finn="yes (ElementwiseMul)"),
        _plain("Maximum", typerules.union, "Max", finn="yes (ElementwiseMax)"),
        _plain("Minimum", typerules.union, "Min", finn=_FINN_SOFTWARE.format("Min", "")),
        LayerSpec(
            "Average",
            "copy",
            "Add, Mul",
            "exact over a power-of-two number of inputs, else float",
            "no (hls4ml 1.3.0 fails making the Mul by 1/n an ApplyAlpha: its bias type)",
            "yes over a power-of-two number of inputs (ElementwiseAdd, ElementwiseMul)",
            type_rule=typerules.average,
        ),
        _plain(
            "Concatenate",
            typerules.union,
            "Concat",
            "yes for two inputs (hls4ml 1.3.0 merges at most two; tf2onnx chains the other merges)",
        ),
    )
}

ACTIVATION_FUNCTIONS: dict[str, ActivationFunction] = {
    function.name: function
    for function in (
        ActivationFunction("linear", "(nothing)", "exact", "yes", "yes"),
        ActivationFunction("relu", "Relu", "exact", "yes", "yes"),
        ActivationFunction(
            "softmax", "Softmax", "float", "yes (lookup tables; see hls4ml below)", _FLOAT_OP
        ),
        ActivationFunction("sigmoid", "Sigmoid", "float", _table(0.0044), _FLOAT_OP),
        ActivationFunction("tanh", "Tanh", "float", _table(0.0067), _FLOAT_OP),
        ActivationFunction(
            "hard_sigmoid",
            "Mul, Add, Min, Max",
            "float",
            "no (Min and Max with a constant fail in its precision inference)",
            _FLOAT_OP,
        ),
        ActivationFunction("softplus", "Softplus", "float", _SATURATING % 13, _FLOAT_OP),
        ActivationFunction("softsign", "Softsign", "float", _SATURATING % 0.066, _FLOAT_OP),
        ActivationFunction("elu", "Elu", "float", _table(0.0039), _FLOAT_OP),
        ActivationFunction("selu", "Selu", "float", _table(0.0076), _FLOAT_OP),
        ActivationFunction("swish", "Mul, Sigmoid, Mul", "float", _SWISH, _FLOAT_OP),
        ActivationFunction("silu", "Mul, Sigmoid, Mul", "float", _SWISH, _FLOAT_OP),
        ActivationFunction("exponential", "Exp", "float", _no_handler("Exp"), _FLOAT_OP),
        ActivationFunction("relu6", "Clip", "float", _no_handler("Clip"), _FLOAT_OP),
    )
}
# gelu is missing on purpose: tf2onnx 1.17 cannot convert its Erfc.


def layer_spec(layer: Any) -> LayerSpec | None:
    """The table entry for ``layer``'s class, or None when bnfold has none."""
    return LAYERS.get(type(layer).__name__)


def mac_layer_type(layer: Any) -> MacLayerType | None:
    """Where ``layer`` keeps its kernel, or None when it is not a MAC layer."""
    spec = layer_spec(layer)
    return spec.mac if spec is not None else None


def _function_name(activation: Any) -> str | None:
    """The name of a Keras activation function; None for a QKeras quantizer or none at all."""
    if activation is None or type(activation).__module__.startswith("qkeras"):
        return None
    return getattr(activation, "__name__", repr(activation))


def check_supported(model: keras.Model) -> None:
    """Refuse, naming the first one, a layer or activation function the table lacks.

    Called before any type inference, so that an unsupported layer is reported
    as itself and not as a missing type further on.

    Raises:
        UnsupportedLayerError: naming the layer, its class and what is supported.
    """
    for path, layer in iter_layers(model):
        name = type(layer).__name__
        if isinstance(layer, keras.Model) or name == "InputLayer":
            continue
        if name not in LAYERS:
            raise UnsupportedLayerError(
                f"bnfold exports the layer classes of its table. Received: layer={path!r} of "
                f"class {name}. Supported: {', '.join(LAYERS)}, nested models"
            )
        if LAYERS[name].mac is None and name != "Activation":
            continue
        function = _function_name(getattr(layer, "activation", None))
        if function is not None and function not in ACTIVATION_FUNCTIONS:
            raise UnsupportedLayerError(
                "bnfold exports the activation functions tf2onnx converts. Received: "
                f"layer={path!r} ({name}) with activation {function!r}. Supported: "
                f"{', '.join(ACTIVATION_FUNCTIONS)} and QKeras quantizers"
            )
