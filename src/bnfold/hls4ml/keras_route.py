"""The Keras route: hls4ml's Keras front end on the unfolded model, with bnfold's types."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from bnfold.errors import UnsupportedLayerError
from bnfold.fixedpoint import FixedPoint

__all__ = ["convert_from_keras_model"]


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
