"""The errors bnfold raises for problems a user can cause.

Every message states the constraint first, then what was received, and names
the file, layer, class or quantizer at fault.
"""

from __future__ import annotations


class BnfoldError(Exception):
    """Base class of every error bnfold raises on purpose."""


class ModelFileError(BnfoldError, OSError):
    """A model file or directory cannot be read as a Keras model."""


class UnsupportedLayerError(BnfoldError, TypeError):
    """A layer of a class bnfold cannot handle at this stage."""


class InvalidWeightsError(BnfoldError, ValueError):
    """A layer's weights cannot be folded (NaN, inf, negative variance)."""


class TypeInferenceError(BnfoldError, ValueError):
    """A layer needs a fixed-point type that cannot be inferred (float inputs or weights)."""


class QuantizerError(BnfoldError, ValueError):
    """A quantizer bnfold cannot read, or that has no fixed-point type where one is needed.

    Raised for malformed quantizer strings, unknown names, float (no quantizer)
    where a type is required, and QKeras quantizers whose outputs are not on a
    fixed-point grid (stochastic, u-law, tanh, sigmoid, ...).
    """


class ExportError(BnfoldError, RuntimeError):
    """A stage of the ONNX export could not do its part (tf2onnx, annotation)."""


class VerificationError(ExportError):
    """The exported ONNX does not compute what the QKeras model computes."""
