"""The errors and warnings bnfold raises for problems a user can cause.

Every message states the constraint first, then what was received, and names
the file, layer, class or quantizer at fault. Every error is a ``BnfoldError``;
an export that fails on anything else (a bug, or an unforeseen failure inside
Keras, h5py or tf2onnx) raises an ``ExportError`` naming the stage, so callers
need to catch one class. Warnings are ``BnfoldWarning``s: the export goes on.
"""

from __future__ import annotations


class BnfoldError(Exception):
    """Base class of every error bnfold raises on purpose."""


class ModelFileError(BnfoldError, OSError):
    """A model file or directory cannot be read as a Keras model."""


class UnsafeModelError(ModelFileError):
    """A model file holds something that would run or import code while Keras loads it.

    Lambda layers, functions stored in a configuration, modules outside Keras,
    tf_keras, QKeras and bnfold, and unknown classes; ``load_model(path,
    safe=False)`` (``--unsafe-load``) loads such a file the user trusts.
    """


class ModelTooLargeError(ModelFileError):
    """A model file declares more than bnfold reads: too many layers, too deep, too big.

    Checked from the configuration before anything is built; the limits are
    ``bnfold.config_check.MAX_LAYERS``, ``MAX_NESTING`` and the ``max_memory``
    argument (``--max-memory``).
    """


class OutputPathError(BnfoldError, OSError):
    """An output file cannot be written where it was asked for (checked before any work)."""


class UnsupportedLayerError(BnfoldError, TypeError):
    """A layer of a class bnfold cannot handle at this stage."""


class UnsupportedShapeError(BnfoldError, ValueError):
    """A model input has unknown (None) dimensions where the export needs static shapes."""


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
    """A stage of the ONNX export could not do its part (tf2onnx, annotation, an unforeseen error).

    Attributes:
        stage: the pipeline stage that failed (``bnfold.export.STAGES``), when known.
    """

    def __init__(self, message: str, *, stage: str | None = None) -> None:
        super().__init__(message)
        self.stage = stage


class VerificationError(ExportError):
    """The exported ONNX does not compute what the QKeras model computes."""


class BnfoldWarning(UserWarning):
    """Base class of bnfold's warnings: something the user should know; the export goes on."""


class FloatModelWarning(BnfoldWarning):
    """The model has no QKeras layer: it is exported in float, without Quant nodes."""


class RangeWarning(BnfoldWarning):
    """A number the hardware types will not hold as the float model does.

    Issued for a bias beyond its bias quantizer's range (QKeras clips it, and the
    export keeps the clipped values; the message says "folded bias" for the bias of
    a folded layer), for an accumulator wider than
    32 bits (more than the 32-bit integer many hardware kernels accumulate in), and for
    a layer such as a Multiply whose values are wider than float32's 24-bit significand
    (QKeras rounds them; the hardware does not).
    """


class UntypedAccumulatorWarning(BnfoldWarning):
    """A MAC layer reads a value that is not fixed point, or has a float kernel.

    It is exported in float, with ``bnfold.accumulator`` saying why and no
    ``bnfold.accumulator_hls``; ``strict`` (``--strict-types``) makes it a
    ``TypeInferenceError``.
    """


class InputQuantizerWarning(BnfoldWarning):
    """A model input has no quantizer given and no QActivation reading it: a default is assumed."""
