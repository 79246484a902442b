from __future__ import annotations

import io
import zipfile

import h5py
import pytest

import bnfold
import bnfold.loading
import builders
from bnfold.errors import ModelFileError, UnsafeModelError, UnsupportedLayerError
from bnfold.keras import keras, qkeras, tf

# The one test that fails on the py3.10-tf2.15 row (README, "Supported versions"). There
# QKeras's tensorflow-model-optimization 0.8 installs tf_keras 2.15 and sets
# TF_USE_LEGACY_KERAS, so tf.keras is tf_keras; tf_keras 2.15's .keras loader then rebuilds
# the Sequential from the built-in keras 2.15 package, which refuses the tf_keras layers
# ("The added layer must be an instance of class Layer"). With the variable unset, the
# mix is the other way round. .h5 files, what QKeras and hls4ml use, load on both stacks.
KERAS_ARCHIVES_LOAD = not tf.__version__.startswith("2.15.")


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory, folded_models) -> bytes:
    path = tmp_path_factory.mktemp("loading") / "conv.h5"
    folded_models["sequential_conv"].save(path)
    return path.read_bytes()


def test_missing_path(tmp_path):
    with pytest.raises(ModelFileError, match=r"must exist.*nothing.h5"):
        bnfold.load_model(tmp_path / "nothing.h5")


def test_directory_that_is_not_a_savedmodel(tmp_path):
    with pytest.raises(ModelFileError, match=r"SavedModel.*directory"):
        bnfold.load_model(tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.h5"
    path.touch()
    with pytest.raises(ModelFileError, match=r"empty.h5.*is empty"):
        bnfold.load_model(path)


def test_unknown_suffix(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\0" * 8)
    with pytest.raises(ModelFileError, match=r"\.h5.*model\.onnx"):
        bnfold.load_model(path)


def test_file_that_is_not_hdf5(tmp_path):
    path = tmp_path / "text.h5"
    path.write_text("not a model")
    with pytest.raises(ModelFileError, match=r"HDF5 file or a .keras zip archive.*text.h5"):
        bnfold.load_model(path)


def test_hdf5_file_without_a_model(tmp_path):
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as file:
        file["x"] = [1, 2, 3]
    with pytest.raises(ModelFileError, match=r"whole Keras model.*data.h5.*no model config"):
        bnfold.load_model(path)


@pytest.mark.parametrize("keep", [0.001, 0.1, 0.5, 0.9, 0.999], ids=lambda k: f"{k:.1%}")
def test_truncated_h5_says_how_much_is_there(model_bytes, tmp_path, keep):
    path = tmp_path / "cut.h5"
    size = max(1, int(len(model_bytes) * keep))
    path.write_bytes(model_bytes[:size])
    # A few bytes do not hold the superblock that records the file's length.
    pattern = r"cut.h5.*(truncated|damaged)" if size < 100 else rf"cut.h5' is truncated \({size} "
    with pytest.raises(ModelFileError, match=pattern):
        bnfold.load_model(path)


@pytest.mark.xfail(
    not KERAS_ARCHIVES_LOAD, reason="TensorFlow 2.15 with tf_keras mixes two Keras", strict=True
)
def test_keras_archive_with_truncated_weights(folded_models, tmp_path):
    saved = tmp_path / "whole.keras"
    folded_models["sequential_conv"].save(saved)
    damaged = io.BytesIO()
    with zipfile.ZipFile(saved) as archive, zipfile.ZipFile(damaged, "w") as copy:
        for name in archive.namelist():
            data = archive.read(name)
            copy.writestr(name, data[: len(data) // 2] if name.endswith(".h5") else data)
    path = tmp_path / "damaged.keras"
    path.write_bytes(damaged.getvalue())
    assert bnfold.load_model(saved).name == "sequential_conv"
    with pytest.raises(ModelFileError, match=r"damaged.keras' is truncated"):
        bnfold.load_model(path)


class Mystery(keras.layers.Layer):
    """A custom layer, unknown wherever the model is loaded without its code."""

    def call(self, inputs):
        return inputs * 2


def test_unknown_custom_layer_names_its_class(tmp_path):
    model = keras.Sequential(
        [
            keras.Input((4,)),
            Mystery(name="mystery"),
            qkeras.QDense(2, kernel_quantizer="quantized_bits(4,0,1)", name="dense"),
        ]
    )
    path = tmp_path / "custom.h5"
    model.save(path)
    with pytest.raises(UnsafeModelError, match=r"custom.h5' with layer='mystery'.*class 'Mystery'"):
        bnfold.load_model(path)


def test_config_keras_cannot_rebuild_names_file_and_reason(model_bytes, tmp_path):
    path = tmp_path / "bad_config.h5"
    path.write_bytes(model_bytes.replace(b'"filters": 6,', b'"filters": 6;', 1))
    with pytest.raises(
        ModelFileError, match=r"model_config must be JSON.*bad_config.h5.*Expecting"
    ):
        bnfold.load_model(path)


def test_qconv2dtranspose_from_an_older_stack_is_refused_naming_the_layer(tmp_path):
    """Keras fails rebuilding it deep in the layer's call (array_ops.stack), naming neither
    the layer nor what would work: the configuration check says both first."""
    inputs = keras.Input((4, 4, 1))
    x = qkeras.QConv2D(2, 3, kernel_quantizer="quantized_bits(4,0,1)", name="conv")(inputs)
    x = keras.layers.Conv2DTranspose(2, 3, name="up")(x)
    path = tmp_path / "transposed.h5"
    keras.Model(inputs, x).save(path)
    builders.rename_layer_classes(path, {"Conv2DTranspose": "QConv2DTranspose"})
    with pytest.raises(
        UnsupportedLayerError,
        match=r"QConv2DTranspose cannot be exported.*Conv2DTranspose exports\. "
        r"Received: '.*transposed.h5' with layer='up'",
    ):
        bnfold.load_model(path)


# A damaged file can make h5py spin or crash (see bnfold.loading); these stand-in
# probes do that on purpose, deterministically, to show how load_model reports it.
@pytest.mark.parametrize(
    ("probe", "reason"),
    [
        ("import time; time.sleep(30)", r"made it hang \(no result within 1 s\)"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", r"made it crash \(SIGSEGV\)"),
        ("raise SystemExit(3)", r"made the reading process fail \(exit status 3\)"),
    ],
    ids=["hang", "crash", "silent_exit"],
)
def test_probe_that_hangs_or_crashes_is_a_model_file_error(
    model_bytes, tmp_path, monkeypatch, probe, reason
):
    path = tmp_path / "model.h5"
    path.write_bytes(model_bytes)
    monkeypatch.setattr(bnfold.loading, "_PROBE", probe)
    monkeypatch.setattr(bnfold.loading, "PROBE_SECONDS", 1.0)
    with pytest.raises(ModelFileError, match=rf"model.h5', which {reason}; .*damaged"):
        bnfold.load_model(path)
