"""hls4ml's view of an exported model: the graph it reads and a configuration with bnfold's types.

Two routes, one module each: :mod:`bnfold.hls4ml.onnx_route` (:func:`prepare_for_hls4ml`,
:func:`hls4ml_config`) for the exported QONNX file, whose stages before hls4ml are
:mod:`bnfold.hls4ml.pooling` and :mod:`bnfold.hls4ml.ranges`; and
:mod:`bnfold.hls4ml.keras_route` (:func:`convert_from_keras_model`), hls4ml's Keras front
end on the unfolded model with the same types in its configuration.
"""

from __future__ import annotations

from bnfold.hls4ml.keras_route import convert_from_keras_model
from bnfold.hls4ml.onnx_route import FLOAT_FRACTIONAL_BITS, hls4ml_config, prepare_for_hls4ml

__all__ = [
    "FLOAT_FRACTIONAL_BITS",
    "convert_from_keras_model",
    "hls4ml_config",
    "prepare_for_hls4ml",
]
