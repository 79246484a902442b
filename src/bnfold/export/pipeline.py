"""The ONNX exporter: a QKeras model with folded batchnorm in, QONNX for hls4ml and FINN out.

``export_onnx`` is the whole pipeline, one stage per line:

    load -> populate -> unfold -> strip -> convert -> annotate -> verify -> write
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import onnx

from bnfold import __version__
from bnfold.accumulator import populate_bias_quantizer_from_accumulator, source_quantizers_for
from bnfold.export.annotate import annotate
from bnfold.export.convert import convert
from bnfold.export.strip import strip
from bnfold.export.verify import Verification, sample_inputs
from bnfold.export.verify import verify as verify_outputs
from bnfold.files import atomic_output
from bnfold.fixedpoint import FixedPoint
from bnfold.keras import keras
from bnfold.loading import load_model
from bnfold.unfold import copy_model, unfold_model

__all__ = ["STAGES", "Verification", "export_onnx"]

logger = logging.getLogger(__name__)

STAGES = ("load", "populate", "unfold", "strip", "convert", "annotate", "verify", "write")
VERIFY_SAMPLES = 8


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


def export_onnx(
    model_or_path: keras.Model | str | os.PathLike[str],
    output_path: str | os.PathLike[str] | None = None,
    *,
    source_quantizers: Sequence[Any] | Any = None,
    opset: int = 13,
    verify: bool = True,
    batch_size: int | None = 1,
    per_channel_scales: bool = True,
    on_stage: Callable[[str], None] | None = None,
) -> onnx.ModelProto:
    """Export a QKeras model with folded batchnorm as QONNX for hls4ml and FINN.

    Args:
        model_or_path: a Keras model, or a .h5/.keras file or SavedModel directory.
            A model passed in is not changed: populating works on a copy.
        output_path: where to write the ONNX file (atomically), or None.
        source_quantizers: one quantizer (object, string, config dict, or None for
            a float input) per model input; None gives each QKeras's default,
            ``quantized_bits(8,0,1)``.
        opset: the ONNX opset of the standard ops.
        verify: compare QONNX execution with QKeras inference on sample inputs
            and fail unless they agree exactly.
        batch_size: the static batch size of the ONNX inputs (hardware flows need
            static shapes), or None for a dynamic batch.
        per_channel_scales: write per-channel power-of-two kernel scales as a
            per-channel scale tensor (QONNX, FINN); False gives each kernel one
            scale and enough bits for every channel, which hls4ml 1.3.0 needs.
        on_stage: called with each stage's name as it starts (progress display).

    Returns:
        The QONNX model.

    Raises:
        bnfold.errors.BnfoldError: a subclass naming the file, layer or quantizer at fault.
    """
    notify = on_stage or (lambda stage: logger.info("bnfold export: %s", stage))
    source_path = None if isinstance(model_or_path, keras.Model) else Path(model_or_path)

    notify("load")
    model = copy_model(model_or_path) if source_path is None else load_model(source_path)
    sources = source_quantizers_for(model, source_quantizers)
    notify("populate")
    populate_bias_quantizer_from_accumulator(model, sources)
    notify("unfold")
    unfolded = unfold_model(model)
    notify("strip")
    stripped = strip(
        unfolded,
        sources,
        batch_size=batch_size,
        folded=model,
        per_channel_scales=per_channel_scales,
    )
    notify("convert")
    converted = convert(stripped, opset=opset)
    notify("annotate")
    exported = annotate(converted, stripped, {"version": __version__, **_source(source_path)})
    if verify:
        notify("verify")
        source_types = [None if q is None else FixedPoint.from_quantizer(q) for q in sources]
        verify_outputs(model, exported, sample_inputs(model, source_types, VERIFY_SAMPLES))
    if output_path is not None:
        notify("write")
        with atomic_output(output_path) as temporary:
            onnx.save(exported, temporary)
    return exported
