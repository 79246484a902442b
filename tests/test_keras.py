"""Every import order that puts tf_keras behind tf.keras works; each runs in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bnfold.keras import tf

# Unfolds a QKeras model in the process, so the script fails unless QKeras's classes and
# bnfold's are the same Keras's.
_UNFOLD = """
import bnfold
unfold_model = bnfold.unfold_model
import numpy as np
import tensorflow as tf
import qkeras

inputs = tf.keras.Input((5, 5, 2))
outputs = qkeras.QConv2DBatchnorm(
    3, 3, kernel_quantizer="quantized_bits(4,0,1,alpha=1)", bias_quantizer="quantized_bits(8,3,1)"
)(inputs)
model = tf.keras.Model(inputs, outputs)
unfolded = unfold_model(model)
x = np.random.default_rng(0).integers(-8, 8, (4, 5, 5, 2)).astype(np.float32) / 4
assert (unfolded.predict(x, verbose=0) == model.predict(x, verbose=0)).all()
print(type(unfolded.layers[-1]).__name__)
"""


def _run(first_lines: str, *, legacy_variable: bool) -> subprocess.CompletedProcess:
    environment = dict(os.environ)
    environment.pop("TF_USE_LEGACY_KERAS", None)  # set in this process by bnfold itself
    if legacy_variable:
        environment["TF_USE_LEGACY_KERAS"] = "1"
    return subprocess.run(
        [sys.executable, "-c", first_lines + "\n" + _UNFOLD],
        env=environment,
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize(
    ("first_lines", "legacy_variable"),
    [
        pytest.param("import qkeras", True, id="qkeras-first"),
        pytest.param("from qkeras import QConv2DBatchnorm", True, id="qkeras-layer-first"),
        pytest.param("from qkeras import bn_folding_utils", True, id="bn-folding-utils-first"),
        pytest.param("import tensorflow as tf\ntf.keras.Model", True, id="tf-keras-first"),
        pytest.param("import bnfold\nimport qkeras", False, id="bnfold-first"),
    ],
)
def test_import_order_works_when_tf_keras_is_behind_tf_keras(first_lines, legacy_variable):
    result = _run(first_lines, legacy_variable=legacy_variable)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "QConv2D"


@pytest.mark.skipif(
    tf.__version__.startswith("2.15."), reason="TensorFlow 2.15 has no Keras 3 to put there"
)
@pytest.mark.parametrize(
    "first_lines",
    [
        pytest.param("import tensorflow as tf\ntf.keras.Model", id="tf-keras-first"),
        pytest.param("import tensorflow", id="tf-first"),
        pytest.param("import qkeras", id="qkeras-first"),
    ],
)
def test_keras_3_behind_tf_keras_is_a_clear_error(first_lines):
    result = _run(first_lines, legacy_variable=False)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ImportError: bnfold needs TensorFlow's legacy Keras 2")
    assert "'keras.src.models.model'" in last_line
    assert "TF_USE_LEGACY_KERAS=1" in last_line


_KERAS_3_STATE = """
import sys
from tensorflow_model_optimization.python.core.sparsity.keras import prune_registry
print("keras" in sys.modules, prune_registry.base_layer)
import keras
print(keras.__version__.split(".")[0])
"""


@pytest.mark.skipif(
    tf.__version__.startswith("2.15."), reason="TensorFlow 2.15's keras package is Keras 2"
)
def test_qkeras_starts_without_keras_3_and_leaves_it_importable():
    """bnfold spares QKeras's start the import of Keras 3, which QKeras's own start discards."""
    outputs = {}
    for first in ("import bnfold.keras", "import qkeras"):
        environment = dict(os.environ, TF_USE_LEGACY_KERAS="1")
        result = subprocess.run(
            [sys.executable, "-c", first + "\n" + _KERAS_3_STATE],
            env=environment,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
        outputs[first] = result.stdout.split()
    assert outputs["import bnfold.keras"] == ["False", "None", "3"]
    # QKeras alone imports Keras 3 and ends with the same (empty) registry entry.
    assert outputs["import qkeras"] == ["True", "None", "3"]
