"""Published QKeras models, saved as their users save them, through what their users run.

Each model of ``builders.PUBLISHED_BUILDERS`` reproduces a published architecture, small
(where it comes from is in each builder's docstring):

- google/qkeras examples/: example_mnist.py, example_mnist_po2.py, example_mnist_bn.py,
  example_qdense.py, example_keras_to_qkeras.py, example_cifar10_po2.py,
  example_mnist_ae.py (its QConv2DTranspose, which QKeras 0.9.0 cannot call on
  TensorFlow 2.21, saved as a stack where it ran would save it) and example_mnist_prune.py
  (saved still wrapped for pruning, as the example saves it). example_ternary.py and
  example_b2t.py build no model; example_qoctave.py's model cannot be built with QKeras
  0.9.0 itself (a test keeps that measured);
- fastmachinelearning/hls4ml-tutorial: part 4's jet-tagging MLP (which part 7 deploys)
  and part 6's SVHN CNN (QConv2DBatchnorm, QDense + BatchNormalization, a float Dense
  output);
- MLPerf Tiny v0.7 hls4ml-finn (hls4ml-finn-mlperftiny/tiny_results_v0.7): the image
  classifier resnet_v1_eembc_quantized (RN07) and the anomaly-detection autoencoder AD08
  (QDenseBatchnorm). Its keyword spotting entry is a Brevitas model for FINN, not QKeras.

Four of them are refused, each with bnfold's error naming the layer (``REFUSED``).

One script that imports qkeras first (with TF_USE_LEGACY_KERAS=1) builds, compiles, fits
for one short epoch on random data, and saves every model with ``model.save("x.h5")``;
then one ``python -m bnfold.export`` run exports them all, verifying each. The same script
prunes the tutorial's jet MLP as the tutorial does, and saves it stripped and as a
checkpoint still wrapped for pruning. hls4ml's C simulation of each exported file runs
under the slow marker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

import bnfold
import builders
from bnfold.export.__main__ import main
from bnfold.export.verify import sample_inputs
from bnfold.fixedpoint import FixedPoint
from bnfold.keras import keras
from hls4ml_runs import compiled_hls4ml

PUBLISHED = tuple(builders.PUBLISHED_BUILDERS)
# name: what the export says about a model bnfold refuses (with the reason it is right to).
REFUSED = {
    # u-law companded weights lie on no uniform grid: no Quant node expresses them.
    "qkeras_mnist_bn": "quantized_ulaw has no fixed-point type",
    "qkeras_cifar10_po2": "quantized_ulaw has no fixed-point type",
    # QKeras 0.9.0's QConv2DTranspose fails when called on TensorFlow 2.15 and later.
    "qkeras_mnist_ae": "QConv2DTranspose cannot be exported: QKeras 0.9.0's layer fails",
    # Saved still wrapped for pruning, as the example saves it: Keras cannot rebuild that.
    "qkeras_mnist_prune": "A pruned model must be saved after tensorflow-model-optimization",
}
EXPORTED = tuple(name for name in PUBLISHED if name not in REFUSED)
# Models whose logits a float layer computes (hls4ml computes it in a widened fixed point).
FLOAT_LOGITS = {"hls4ml_tutorial_cnn"}
# name: hls4ml 1.3.0's error on an exported model it cannot read (as the quantizer table says).
HLS4ML_UNREAD = {
    # quantized_relu_po2 activations are QKeras's own ops (Log, Neg, Pow, ...) before a Quant.
    "qkeras_mnist_po2": "Unsupported operation type: Neg",
}
HLS4ML_READ = tuple(name for name in EXPORTED if name not in HLS4ML_UNREAD)
TESTS = Path(__file__).resolve().parent
SOURCE = builders.INPUT_QUANTIZER

SAVE_SCRIPT = """
import os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import qkeras
sys.path.insert(0, sys.argv[1])
import builders
for name in builders.PUBLISHED_BUILDERS:
    builders.save_published(name, os.path.join(sys.argv[2], name + ".h5"))
pruning = os.path.join(sys.argv[2], "pruning")
os.mkdir(pruning)
builders.save_pruned(
    builders.hls4ml_tutorial_jet_mlp(),
    os.path.join(pruning, "checkpoint.h5"),
    os.path.join(pruning, "stripped.h5"),
)
"""


def _run(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess:
    environment = dict(os.environ, PYTHONPATH=str(Path(bnfold.__file__).parent.parent))
    return subprocess.run(
        [sys.executable, *arguments],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=environment,
        timeout=900,
    )


@pytest.fixture(scope="session")
def published(tmp_path_factory):
    """Every published model saved by a user script, then exported by one CLI run."""
    directory = tmp_path_factory.mktemp("published")
    saved = _run(["-c", SAVE_SCRIPT, str(TESTS), str(directory)], directory)
    assert saved.returncode == 0, saved.stderr[-3000:]
    files = [f"{name}.h5" for name in PUBLISHED]
    done = _run(
        ["-m", "bnfold.export", *files, "-o", "out", "--input-quantizer", SOURCE], directory
    )
    lines = {
        Path(line.split()[1].removesuffix(":")).stem: line for line in done.stdout.splitlines()[:-1]
    }
    return SimpleNamespace(directory=directory, done=done, lines=lines)


def test_one_run_exports_every_model_but_the_refused(published):
    assert published.done.returncode == 1, published.done.stderr
    count = len(PUBLISHED)
    summary = published.done.stdout.splitlines()[-1]
    assert summary.startswith(f"exported {len(EXPORTED)} of {count} models, {len(REFUSED)} failed")
    written = sorted(path.name for path in (published.directory / "out").iterdir())
    assert written == sorted(f"{name}.onnx" for name in EXPORTED)


@pytest.mark.parametrize("name", EXPORTED)
def test_export_is_verified_exact_where_qkeras_computes_in_fixed_point(published, name):
    line = published.lines[name]
    assert line.startswith(f"ok      {name}.h5 -> out/{name}.onnx: "), line
    written = onnx.load(published.directory / "out" / f"{name}.onnx")
    onnx.checker.check_model(written, full_check=True)
    metadata = {entry.key: entry.value for entry in written.metadata_props}
    verification = json.loads(metadata["bnfold.verification"])
    # With a float tail (softmax, a float Dense), what the float ops read must be exact.
    assert verification.get("exact_difference", verification["max_difference"]) == 0.0


@pytest.mark.parametrize("name", REFUSED)
def test_refused_model_fails_naming_the_layer_and_leaves_no_file(published, name):
    line = published.lines[name]
    assert line.startswith(f"failed  {name}.h5: {REFUSED[name]}"), line
    assert "layer=" in line
    assert not (published.directory / "out" / f"{name}.onnx").exists()


def test_pruned_model_exports_once_stripped_and_its_checkpoint_says_so(published, capsys):
    """hls4ml tutorial part 4 prunes the jet MLP with tensorflow-model-optimization and saves
    it after strip_pruning; a checkpoint saved while pruning still has the wrappers, which
    Keras cannot rebuild: the error says what to do, naming the layer."""
    directory = published.directory / "pruning"
    stripped, checkpoint = directory / "stripped.h5", directory / "checkpoint.h5"
    assert main([str(stripped), "--input-quantizer", SOURCE]) == 0
    assert "verified: QONNX equals QKeras exactly where" in capsys.readouterr().out
    kernel = bnfold.load_model(stripped).get_layer("fc1").get_weights()[0]
    assert np.mean(kernel == 0) == 0.75  # pruned, as the schedule asks
    assert main([str(checkpoint), "--input-quantizer", SOURCE]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: A pruned model must be saved after ")
    assert "layer='prune_low_magnitude_fc1' (PruneLowMagnitude wrapping QDense 'fc1')" in error
    assert not checkpoint.with_suffix(".onnx").exists()


def test_qkeras_0_9_0_cannot_build_example_qoctave():
    """example_qoctave.py's QOctaveConv2D passes its QSeparableConv2D (and, with
    use_separable=False, its QAveragePooling2D) arguments they do not accept."""
    with pytest.raises(TypeError, match="Keyword argument not understood"):
        builders.qkeras_qoctave()


def _qkeras_logits(model: keras.Model, inputs: list[np.ndarray]) -> np.ndarray:
    """The model's outputs, or the input of its final softmax."""
    last = model.layers[-1]
    if isinstance(last, keras.layers.Activation) and last.get_config()["activation"] == "softmax":
        model = keras.Model(model.inputs, last.input)
    return model.predict(inputs, verbose=0)


def _export_for_hls4ml(model_file: Path, directory: Path, capsys) -> onnx.ModelProto:
    """What an hls4ml user runs: the CLI with --hls4ml-config (one scale per kernel)."""
    output = directory / f"{model_file.stem}.onnx"
    arguments = ["--input-quantizer", SOURCE, "--hls4ml-config", str(directory / "config.yml")]
    assert main([str(model_file), "-o", str(output), *arguments]) == 0, capsys.readouterr()
    return onnx.load(output)


@pytest.mark.parametrize("name", HLS4ML_UNREAD)
def test_hls4ml_refuses_what_the_quantizer_table_says_it_cannot_read(
    published, name, tmp_path, capsys
):
    onnx_model = _export_for_hls4ml(published.directory / f"{name}.h5", tmp_path, capsys)
    with pytest.raises(Exception, match=HLS4ML_UNREAD[name]):
        compiled_hls4ml(onnx_model, tmp_path, skip_softmax=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", HLS4ML_READ)
def test_hls4ml_c_simulation_gives_the_qkeras_logits(published, name, tmp_path, capsys):
    """The hls4ml user's route: the CLI with --hls4ml-config, prepare_for_hls4ml on the
    file with the softmax skipped, hls4ml's C simulation. Logits QKeras computes in fixed
    point are bit-exact; the float Dense output of the tutorial CNN is within 2**-9.

    That bound holds on this draw (``save_published`` seeds each build), not on every one:
    hls4ml computes a batch normalization in fixed point (its scale and offset at 16
    fractional bits), so where QKeras's float value lies within about 2**-16 of the next
    quantized_relu(6)'s rounding tie hls4ml can round it the other way, one step of 2**-6,
    which moves a logit by that step times a weight. Measured on seeds 0 to 6: two of the
    seven draws had such a flip (logits 0.0083 and 0.0073 off, the same class)."""
    model_file = published.directory / f"{name}.h5"
    onnx_model = _export_for_hls4ml(model_file, tmp_path, capsys)
    model = bnfold.load_model(model_file)
    bnfold.populate_bias_quantizer_from_accumulator(model, [SOURCE])
    inputs = sample_inputs(model, [FixedPoint.from_quantizer(SOURCE)], 32)
    hls_model = compiled_hls4ml(onnx_model, tmp_path, skip_softmax=True)
    logits = _qkeras_logits(model, inputs)
    predicted = np.reshape(hls_model.predict(np.ascontiguousarray(inputs[0])), logits.shape)
    if name in FLOAT_LOGITS:
        assert np.max(np.abs(predicted - logits)) <= 2**-9
        np.testing.assert_array_equal(predicted.argmax(-1), logits.argmax(-1))
    else:
        np.testing.assert_array_equal(predicted, logits)
