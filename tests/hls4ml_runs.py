"""hls4ml's ONNX conversion and C simulation, as every test that runs hls4ml runs it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

import bnfold
import builders
from bnfold.export.verify import sample_inputs
from bnfold.fixedpoint import FixedPoint
from bnfold.hls4ml import prepare_for_hls4ml
from bnfold.keras import keras


def hls4ml_model(cleaned: Any, config: dict, directory: Path) -> Any:
    """hls4ml's model of ``cleaned`` (Vitis backend, io_parallel), not compiled yet.

    hls4ml adds the names of the layers it makes to ``hls_config``, so it gets a copy.
    """
    import hls4ml

    return hls4ml.converters.convert_from_onnx_model(
        cleaned,
        output_dir=str(directory / "hls4ml_prj"),
        backend="Vitis",
        io_type="io_parallel",
        hls_config=copy.deepcopy(config),
    )


def compile_for_c_simulation(hls_model: Any) -> None:
    """hls4ml's ``compile()``, with g++ at -O0 instead of the -O3 of its build script.

    The C++ is hls4ml's, unchanged: ap_fixed arithmetic is integer arithmetic, and the
    float tables are computed with SSE math either way, so the optimization level changes
    no value; -O0 compiles in about 60% of the time (measured 7-9 s against 13 s), which
    keeps the suite's 60-odd C simulations within the CI budget.
    """
    hls_model.write()
    script = Path(hls_model.config.get_output_dir()) / "build_lib.sh"
    text = script.read_text()
    if 'CFLAGS="-O3 ' not in text:
        raise RuntimeError(f"hls4ml's build script changed: {script} has no -O3 to replace")
    script.write_text(text.replace('CFLAGS="-O3 ', 'CFLAGS="-O0 '))
    hls_model._compile()  # compile() would write the build script again


def compiled_hls4ml(onnx_model: Any, directory: Path, **options: Any) -> Any:
    """``prepare_for_hls4ml`` (with ``options``), then hls4ml's conversion, compiled."""
    hls_model = hls4ml_model(*prepare_for_hls4ml(onnx_model, **options), directory)
    compile_for_c_simulation(hls_model)
    return hls_model


def hls4ml_predictions(
    model: keras.Model, skip_softmax: bool, directory: Path, samples: int = 32, **options: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``model`` exported, through hls4ml (compiled): its predictions, QKeras's outputs and
    QKeras's logits (the input of a final softmax, else the outputs)."""
    sources = [builders.INPUT_QUANTIZER]
    onnx_model = bnfold.export_onnx(model, source_quantizers=sources, per_channel_scales=False)
    bnfold.populate_bias_quantizer_from_accumulator(model, sources)
    inputs = sample_inputs(model, [FixedPoint.from_quantizer(sources[0])], samples)
    hls_model = compiled_hls4ml(onnx_model, directory, skip_softmax=skip_softmax, **options)
    predicted = hls_model.predict(np.ascontiguousarray(inputs[0]))
    expected = model.predict(inputs, verbose=0)
    last = model.layers[-1]
    if isinstance(last, keras.layers.Activation) and last.get_config()["activation"] == "softmax":
        logits = keras.Model(model.input, last.input).predict(inputs, verbose=0)
    else:
        logits = expected
    return np.reshape(predicted, expected.shape), expected, logits
