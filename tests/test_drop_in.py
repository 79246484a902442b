"""use_in_qkeras in a fresh process, as a QKeras script calls it (it changes QKeras for good)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import qkeras
import bnfold
import builders

model = builders.sequential_conv()  # folded conv, depthwise and dense layers
inputs = builders.grid_inputs(model)
before = model.predict(inputs, verbose=0)
try:
    qkeras.print_qstats(model)
except ValueError as error:
    print("QKeras alone:", type(error).__name__)
print("replaced:", ",".join(bnfold.use_in_qkeras()))
qkeras.print_qstats(model)
print("again:", ",".join(bnfold.use_in_qkeras()))
print("outputs unchanged:", (model.predict(inputs, verbose=0) == before).all())
print("dense products:", model.get_layer("dense").kernel.shape.num_elements())
"""


def test_print_qstats_counts_folded_depthwise_and_dense_layers_after_use_in_qkeras():
    environment = {**os.environ, "TF_USE_LEGACY_KERAS": "1"}
    tests = str(Path(__file__).resolve().parent)
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT.format(tests=tests)],
        env=environment,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in result.stdout.splitlines()]
    assert "QKeras alone: ValueError" in lines
    replaced = next(line for line in lines if line.startswith("replaced:")).split()[1]
    assert sorted(replaced.split(",")) == [
        "qkeras.bn_folding_utils.convert_folded_layer_to_unfolded",
        "qkeras.bn_folding_utils.populate_bias_quantizer_from_accumulator",
        "qkeras.bn_folding_utils.unfold_model",
        "qkeras.estimate.unfold_model",
        "qkeras.unfold_model",
        "qkeras.utils.model_save_quantized_weights",
    ]
    assert "again:" in lines
    assert "outputs unchanged: True" in lines
    products = next(line for line in lines if line.startswith("dense products:")).split()[-1]
    qkeras_alone, bnfold_routed = result.stdout.split("replaced:")
    # QKeras's own unfold leaves the folded dense layer out of its count; bnfold's does not.
    counted_by_qkeras = _operation_counts(qkeras_alone)
    assert sorted(counted_by_qkeras) == ["conv", "dw"]
    assert _operation_counts(bnfold_routed) == {**counted_by_qkeras, "dense": products}
    assert "Total Sparsity" in bnfold_routed


def _operation_counts(printed: str) -> dict[str, str]:
    """The 'Number of operations in model' block of print_qstats: layer -> count."""
    block = printed.split("Number of operations in model:\n")[1].split("\n\n")[0]
    return {line.split()[0]: line.split()[2] for line in block.splitlines()}
