"""The ONNX exporter: a QKeras model with folded batchnorm in, QONNX for hls4ml and FINN out.

``export_onnx`` is the whole pipeline, one stage per line:

    load -> populate -> unfold+strip -> convert -> annotate -> verify -> write

Unfolding and stripping are one pass, one Keras rebuild of the loaded model:
each folded layer becomes the float layer holding its folded weights, computed
by the folding code ``unfold_model`` uses (which a user calls to get the plain
QKeras model).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import onnx

from bnfold import __version__
from bnfold.accumulator import populate_bias_quantizer_from_accumulator, source_quantizers_for
from bnfold.errors import (
    BnfoldError,
    ExportError,
    FloatModelWarning,
    UntypedAccumulatorWarning,
)
from bnfold.export.annotate import annotate
from bnfold.export.convert import convert
from bnfold.export.strip import strip
from bnfold.export.verify import Verification, sample_inputs
from bnfold.export.verify import verify as verify_outputs
from bnfold.files import atomic_output, check_output_path
from bnfold.fixedpoint import FixedPoint
from bnfold.graph import iter_layers
from bnfold.keras import keras
from bnfold.loading import load_model
from bnfold.unfold import copy_model

__all__ = ["STAGES", "Verification", "export_onnx"]

logger = logging.getLogger(__name__)

STAGES = ("load", "populate", "unfold+strip", "convert", "annotate", "verify", "write")
VERIFY_SAMPLES = 8
# Of those, the samples with values off the source grids (checking the input Quant nodes).
VERIFY_OFF_GRID = 2
# tf2onnx converts up to opset 18; below 9 the exported graph fails verification.
OPSETS = range(9, 19)


def _source(path: Path | None) -> dict[str, str]:
    """``bnfold.source``: the file name and its sha256 (a SavedModel directory: its name)."""
    if path is None:
        return {}
    if not path.is_file():
        return {"source": path.name}
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return {"source": f"{path.name} sha256:{digest.hexdigest()}"}


def _log_stage(stage: str) -> None:
    logger.info("bnfold export: %s", stage)


def _has_quantizers(model: keras.Model) -> bool:
    """Whether any layer is a QKeras or bnfold layer, or applies a QKeras quantizer."""
    return any(
        type(item).__module__.split(".")[0] in ("qkeras", "bnfold")
        for _, layer in iter_layers(model)
        for item in (layer, getattr(layer, "activation", None))
    )


def _float_model_warning(model: keras.Model, path: Path | None) -> None:
    source = f" from {str(path)!r}" if path is not None else ""
    warnings.warn(
        "bnfold exports quantized models; one without QKeras layers is exported in float, "
        "with no Quant nodes (unless input quantizers are given) and no accumulator types. "
        f"Received: model {model.name!r}{source} without QKeras layers",
        FloatModelWarning,
        stacklevel=5,  # the caller of export_onnx, past _input_quantizers and the wrapper
    )


def _input_quantizers(
    model: keras.Model, source_quantizers: Sequence[Any] | Any, path: Path | None
) -> tuple[bool, list[Any]]:
    """Whether ``model`` is quantized at all, and the source quantizer of each of its inputs.

    A model without QKeras layers is exported in float, with a ``FloatModelWarning``:
    its inputs stay float unless ``source_quantizers`` says otherwise.
    """
    quantized = _has_quantizers(model)
    if not quantized:
        _float_model_warning(model, path)
        if source_quantizers is None:
            source_quantizers = [None] * len(model.inputs)
    return quantized, source_quantizers_for(model, source_quantizers)


def _errors_name_their_stage(
    export: Callable[..., onnx.ModelProto],
) -> Callable[..., onnx.ModelProto]:
    """Turn any exception that is not a ``BnfoldError`` into an ``ExportError`` naming its stage.

    Keras, h5py and tf2onnx raise many types on inputs they cannot handle; callers
    should have one class to catch, and learn which stage failed.
    """

    @functools.wraps(export)
    def run(*args: Any, on_stage: Callable[[str], None] | None = None, **kwargs: Any) -> Any:
        stage = STAGES[0]

        def notify(name: str) -> None:
            nonlocal stage
            stage = name
            (on_stage or _log_stage)(name)

        try:
            return export(*args, on_stage=notify, **kwargs)
        except BnfoldError:
            raise
        except Exception as error:
            lines = str(error).strip().splitlines()
            message = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
            raise ExportError(
                f"The {stage} stage of the export failed on an error bnfold does not "
                f"anticipate. Received: {message}",
                stage=stage,
            ) from error

    return run


@_errors_name_their_stage
def export_onnx(
    model_or_path: keras.Model | str | os.PathLike[str],
    output_path: str | os.PathLike[str] | None = None,
    *,
    source_quantizers: Sequence[Any] | Any = None,
    opset: int = 13,
    verify: bool = True,
    batch_size: int | None = 1,
    per_channel_scales: bool = True,
    strict: bool = False,
    safe: bool = True,
    max_memory: int | None = None,
    channels_first: bool = False,
    on_stage: Callable[[str], None] | None = None,
) -> onnx.ModelProto:
    """Export a QKeras model with folded batchnorm as QONNX for hls4ml and FINN.

    Args:
        model_or_path: a Keras model, or a .h5/.keras file or SavedModel directory.
            A model passed in is not changed: populating works on a copy.
        output_path: where to write the ONNX file (atomically), or None.
        source_quantizers: one quantizer (object, string, config dict, or None for
            a float input) per model input; None gives each input the quantizer of a
            ``QActivation`` that alone reads it, else QKeras's default,
            ``quantized_bits(8,0,1)``, with an ``InputQuantizerWarning``.
        opset: the ONNX opset of the standard ops.
        verify: compare QONNX execution with QKeras inference on sample inputs
            and fail unless they agree: exactly where the model computes in fixed
            point, within ``FLOAT_TOLERANCE`` on outputs computed after a float op.
        batch_size: the static batch size of the ONNX inputs (hardware flows need
            static shapes), or None for a dynamic batch.
        per_channel_scales: write per-channel power-of-two kernel scales as a
            per-channel scale tensor (QONNX, FINN); False gives each kernel one
            scale and enough bits for every channel, which hls4ml 1.3.0 needs.
        strict: fail with ``TypeInferenceError`` where a MAC layer has no
            accumulator type, instead of exporting it in float with a warning.
        safe: refuse a model file that holds code (see ``bnfold.load_model``);
            False runs that code, for a file you trust.
        max_memory: refuse a model file whose declared sizes need more bytes
            (see ``bnfold.load_model``); None: the machine's memory.
        channels_first: give 4-D graph inputs and outputs the NCHW layout, as
            Brevitas exports them, instead of Keras's NHWC. Either way each graph
            input and output carries its layout (``tensor_layout``) for qonnx and FINN.
        on_stage: called with each stage's name as it starts (progress display).

    Returns:
        The QONNX model.

    A model without any QKeras layer is exported in float, with a
    ``FloatModelWarning``: its inputs are float unless ``source_quantizers`` says
    otherwise, its MAC layers have no accumulator types, and verification allows
    a difference of ``FLOAT_TOLERANCE`` relative to the largest output (float sums
    depend on the order of additions, which differs between TensorFlow and
    onnxruntime).

    Raises:
        bnfold.errors.BnfoldError: a subclass naming the file, layer or quantizer at
            fault; ``OutputPathError`` before any work if ``output_path`` cannot be
            written; ``UnsupportedLayerError`` for a layer class or activation the
            layer table lacks; ``TypeInferenceError`` with ``strict``; ``ExportError``
            naming the stage for any unforeseen failure.

    Warns:
        bnfold.errors.BnfoldWarning: ``FloatModelWarning`` as above; ``RangeWarning``
            for a bias (folded or not) its quantizer clips, or an accumulator over 32 bits;
            ``UntypedAccumulatorWarning`` naming each MAC layer without an accumulator
            type (a float input or kernel); ``InputQuantizerWarning`` for an input
            given QKeras's default quantizer.
    """
    notify = on_stage or _log_stage
    source_path = None if isinstance(model_or_path, keras.Model) else Path(model_or_path)
    if opset not in OPSETS:
        raise ExportError(
            f"The ONNX opset must be between {OPSETS[0]} and {OPSETS[-1]}. Received: opset={opset}"
        )
    if output_path is not None:
        check_output_path(output_path, source=source_path)

    notify("load")
    if source_path is None:
        model = copy_model(model_or_path)
    else:
        model = load_model(source_path, safe=safe, max_memory=max_memory)
    quantized, sources = _input_quantizers(model, source_quantizers, source_path)
    notify("populate")
    with warnings.catch_warnings():
        # The strip stage warns about the same layers, once, with the rest.
        warnings.simplefilter("ignore", UntypedAccumulatorWarning)
        populate_bias_quantizer_from_accumulator(model, sources, strict=strict and quantized)
    notify("unfold+strip")
    stripped = strip(
        model,
        sources,
        batch_size=batch_size,
        per_channel_scales=per_channel_scales,
        strict=strict,
        quantized=quantized,
    )
    notify("convert")
    converted = convert(stripped, opset=opset, channels_first=channels_first)
    notify("annotate")
    exported = annotate(
        converted,
        stripped,
        {"version": __version__, **_source(source_path)},
        channels_first=channels_first,
    )
    if verify:
        notify("verify")
        source_types = [None if q is None else FixedPoint.from_quantizer(q) for q in sources]
        verify_outputs(
            model,
            exported,
            sample_inputs(
                model,
                source_types,
                VERIFY_SAMPLES - VERIFY_OFF_GRID,
                off_grid=VERIFY_OFF_GRID,
            ),
            float_outputs=None if quantized else stripped.output_names,
            source_quantizers=sources,
        )
    if output_path is not None:
        notify("write")
        with atomic_output(output_path) as temporary:
            onnx.save(exported, temporary)
    return exported
