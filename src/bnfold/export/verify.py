"""Verify: the exported QONNX model must compute the QKeras model's outputs exactly.

Sample inputs are drawn from the grids of the source quantizers, including
both ends of each range, and run through QKeras inference and through qonnx's
executor (which runs the Quant nodes). The largest absolute difference over
all outputs must be 0 (a model without quantizers computes in float, where the
order of additions matters: it gets a small tolerance).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from bnfold.errors import VerificationError
from bnfold.fixedpoint import FixedPoint
from bnfold.keras import keras, tf


@dataclass(frozen=True)
class Verification:
    """The result of comparing QKeras and QONNX outputs."""

    samples: int
    max_difference: float
    worst_output: str


def sample_inputs(
    model: keras.Model, source_types: list[FixedPoint | None], count: int, seed: int = 0
) -> list[np.ndarray]:
    """``count`` inputs per model input on its source grid; the first two are its min and max.

    A float input (no source quantizer) gets values on a grid of step 1/256 in [-4, 4).
    """
    rng = np.random.default_rng(seed)
    samples = []
    for tensor, fixed in zip(model.inputs, source_types, strict=True):
        fixed = fixed or FixedPoint(11, 2, True)
        shape = (count, *tensor.shape[1:])
        low, high = round(fixed.min / fixed.step), round(fixed.max / fixed.step)
        codes = rng.integers(low, high + 1, size=shape)
        codes[0], codes[-1] = low, high
        samples.append((codes * fixed.step).astype(np.float32))
    return samples


def _with_batch_of_one(onnx_model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with a static batch of 1: qonnx's executor checks inputs against static shapes."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.infer_shapes import InferShapes

    dynamic = [
        value
        for value in (*onnx_model.graph.input, *onnx_model.graph.output)
        if not value.type.tensor_type.shape.dim[0].dim_value
    ]
    if not dynamic:
        return onnx_model
    static = onnx.ModelProto()
    static.CopyFrom(onnx_model)
    for value in (*static.graph.input, *static.graph.output):
        batch = value.type.tensor_type.shape.dim[0]
        if not batch.dim_value:
            batch.dim_value = 1
    del static.graph.value_info[:]
    return ModelWrapper(static).transform(InferShapes()).model


def qonnx_outputs(model: Any, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """QONNX execution (Quant nodes included) of ``model``, one sample at a time.

    qonnx's executor checks inputs against the graph's static shapes, whose batch
    is 1 in an exported file, so samples run one by one and are stacked again.

    Args:
        model: an ``onnx.ModelProto`` or qonnx ``ModelWrapper`` with static shapes.
        inputs: one array per graph input, samples along the first axis.

    Returns:
        One array per graph output, samples along the first axis.
    """
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    wrapper = model if isinstance(model, ModelWrapper) else ModelWrapper(model)
    input_names = [tensor.name for tensor in wrapper.graph.input]
    output_names = [tensor.name for tensor in wrapper.graph.output]
    results: dict[str, list[np.ndarray]] = {name: [] for name in output_names}
    for index in range(len(inputs[0])):
        feed = {
            name: values[index : index + 1]
            for name, values in zip(input_names, inputs, strict=True)
        }
        executed = execute_onnx(wrapper, feed)
        for name in output_names:
            results[name].append(executed[name])
    return [np.concatenate(results[name]) for name in output_names]


def verify(
    model: keras.Model,
    onnx_model: onnx.ModelProto,
    inputs: list[np.ndarray],
    *,
    tolerance: float = 0.0,
) -> Verification:
    """Run QKeras and QONNX on ``inputs`` and compare every output.

    Args:
        model: the QKeras model whose outputs are the reference.
        onnx_model: the exported model (its batch may be 1: samples run one by one).
        inputs: one array per model input, samples along the first axis.
        tolerance: the largest difference allowed, relative to the largest output
            magnitude (at least 1); 0 for quantized models.

    Returns:
        The largest difference found (0.0 when the export is exact).

    Raises:
        VerificationError: any output differs, with by how much and where.

    On success the result is recorded in ``onnx_model``'s ``bnfold.verification``.
    """
    # A direct call, not predict: predict first traces the whole model into a graph,
    # which costs more than the comparison itself on large models.
    expected = model(inputs if len(inputs) > 1 else inputs[0], training=False)
    expected = [np.asarray(values) for values in tf.nest.flatten(expected)]
    limit = tolerance * max([1.0, *(float(np.max(np.abs(values))) for values in expected)])
    actual = qonnx_outputs(_with_batch_of_one(onnx_model), inputs)
    output_names = [tensor.name for tensor in onnx_model.graph.output]
    worst, worst_output = 0.0, output_names[0]
    samples = len(inputs[0])
    for name, result, reference in zip(output_names, actual, expected, strict=True):
        difference = float(np.max(np.abs(result - reference)))
        if difference > worst or np.isnan(difference):
            worst, worst_output = difference, name
    if worst > limit or np.isnan(worst):
        within = f"within {limit:g}" if limit else "exactly"
        raise VerificationError(
            f"The exported ONNX must compute the QKeras model's outputs {within}. Received: "
            f"a difference of up to {worst} on output {worst_output!r} over {samples} samples"
        )
    entry = onnx_model.metadata_props.add()
    entry.key = "bnfold.verification"
    entry.value = json.dumps(
        {
            "samples": samples,
            "max_difference": worst,
            "executor": "qonnx.core.onnx_exec.execute_onnx",
        }
        | ({"tolerance": limit} if limit else {})
    )
    return Verification(samples, worst, worst_output)
