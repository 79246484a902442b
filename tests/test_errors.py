"""Bad input, end to end: through ``export_onnx`` and through ``python -m bnfold.export``.

Every failure is one ``BnfoldError`` naming the file or layer at fault; the
command line prints it as one line and exits 1 (2 for a usage error); an
existing output file stays as it was, and no other file appears.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import h5py
import numpy as np
import onnx
import pytest

import bnfold
import bnfold.errors
import bnfold.export.pipeline
import builders
from bnfold.__main__ import main as unfold_main
from bnfold.errors import (
    BnfoldError,
    BnfoldWarning,
    ExportError,
    FloatModelWarning,
    InvalidWeightsError,
    ModelFileError,
    ModelTooLargeError,
    OutputPathError,
    QuantizerError,
    RangeWarning,
    UnsafeModelError,
    UnsupportedShapeError,
)
from bnfold.export.__main__ import main
from bnfold.keras import keras, qkeras

PREVIOUS = b"the previous export"
# The file a hostile model's code creates if it ever runs, and the module a hostile
# model names (see test_module_in_the_working_directory_is_never_imported).
MARKER = "payload_ran"
MARKER_MODULE = "bnfold_payload"


class Mystery(keras.layers.Layer):
    """A custom layer whose code a model file does not carry."""

    def call(self, inputs):
        return inputs * 2


def _save(model: keras.Model, path: Path) -> Path:
    model.save(path)
    return path


def _set_weight(source: Path, path: Path, layer: str, weight: str, index: int, value: float):
    """A copy of the model file ``source`` with one weight value changed, as a damaged file has."""
    path.write_bytes(source.read_bytes())
    with h5py.File(path, "r+") as file:
        names = []
        file.visit(names.append)
        name = next(n for n in names if f"/{layer}/" in n and n.endswith(f"/{weight}:0"))
        values = file[name][()]
        values.flat[index] = value
        file[name][...] = values
    return path


def _dense_model(*layers: keras.layers.Layer, shape: tuple[int | None, ...] = (6,)):
    return keras.Sequential([keras.Input(shape), *layers])


def _replace_kernel(source: Path, path: Path, make) -> Path:
    """A copy of ``source`` whose 'dense' kernel dataset is ``make(its shape)``."""
    path.write_bytes(source.read_bytes())
    with h5py.File(path, "r+") as file:
        names = []
        file.visit(names.append)
        name = next(n for n in names if "/dense/" in n and n.endswith("/kernel:0"))
        shape = file[name].shape
        del file[name]
        file[name] = make(shape)
    return path


def _edit_config(source: Path, path: Path, edit) -> Path:
    """A copy of the .h5 or .keras model file ``source`` whose configuration ``edit`` changed."""
    if source.suffix == ".keras":
        with zipfile.ZipFile(source) as original, zipfile.ZipFile(path, "w") as edited:
            for item in original.infolist():
                data = original.read(item)
                if item.filename == "config.json":
                    data = json.dumps(edit(json.loads(data))).encode()
                edited.writestr(item, data)
        return path
    path.write_bytes(source.read_bytes())
    with h5py.File(path, "r+") as file:
        file.attrs["model_config"] = json.dumps(edit(json.loads(file.attrs["model_config"])))
    return path


def _layer(config: dict, name: str) -> dict:
    return next(layer for layer in config["config"]["layers"] if layer["config"]["name"] == name)


def _set_field(layer: str, key: str, value):
    def edit(config):
        _layer(config, layer)["config"][key] = value
        return config

    return edit


def _import_module(module: str):
    """An edit that makes the model's class come from ``module``, which Keras imports to find it."""

    def edit(config):
        return {**config, "module": module, "class_name": "Payload", "registered_name": None}

    return edit


def _model_only_file(path: Path, config: dict) -> Path:
    """An HDF5 file with a model configuration and no weights, as a hostile file can be."""
    with h5py.File(path, "w") as file:
        file.attrs["model_config"] = json.dumps(config)
        file.attrs["keras_version"] = "2.21.0"
        file.attrs["backend"] = "tensorflow"
    return path


def _relu(name: str) -> dict:
    return {"class_name": "ReLU", "config": {"name": name}}


def _chain(count: int) -> dict:
    """A Sequential configuration of ``count`` ReLU layers."""
    inputs = {"class_name": "InputLayer", "config": {"batch_input_shape": [None, 4], "name": "in"}}
    layers = [inputs] + [_relu(f"relu{i}") for i in range(count)]
    return {"class_name": "Sequential", "config": {"name": "chain", "layers": layers}}


def _one_conv(input_shape: list[int], filters: int) -> dict:
    """A Sequential configuration: an input of ``input_shape``, one 3x3 QConv2D."""
    conv = {
        "class_name": "QConv2D",
        "config": {
            "name": "conv",
            "filters": filters,
            "kernel_size": [3, 3],
            "kernel_quantizer": "quantized_bits(4,0,1)",
        },
    }
    inputs = {"class_name": "InputLayer", "config": {"batch_input_shape": [None, *input_shape]}}
    return {"class_name": "Sequential", "config": {"name": "huge", "layers": [inputs, conv]}}


def _nested(depth: int) -> dict:
    """Sequential models nested ``depth`` deep around one ReLU."""
    config = _relu("relu")
    for level in range(depth):
        inputs = {
            "class_name": "InputLayer",
            "config": {"batch_input_shape": [None, 4], "name": f"input{level}"},
        }
        config = {
            "class_name": "Sequential",
            "config": {"name": f"level{level}", "layers": [inputs, config]},
        }
    return config


def _payload_lambda(marker: Path) -> keras.layers.Layer:
    """A Lambda layer whose stored bytecode creates ``marker`` when it runs."""
    return keras.layers.Lambda(
        lambda x, marker=str(marker): (open(marker, "w").close(), x)[1], name="payload"
    )


def _hostile_model(marker: Path) -> keras.Model:
    model = _dense_model(
        qkeras.QDense(3, kernel_quantizer="quantized_bits(4,0,1)", name="dense"),
        _payload_lambda(marker),
    )
    return model


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory, folded_models) -> Path:
    return _save(folded_models["sequential_conv"], tmp_path_factory.mktemp("valid") / "conv.h5")


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, valid_file, folded_models) -> dict[str, Path]:
    """One file per kind of bad input (built once; tests never change them)."""
    folder = tmp_path_factory.mktemp("bad")
    (folder / "folder.h5").mkdir()
    (folder / "empty.h5").touch()
    (folder / "text.h5").write_text("not a model\n")
    (folder / "truncated.h5").write_bytes(valid_file.read_bytes()[:20000])
    with h5py.File(folder / "data.h5", "w") as file:
        file["x"] = [1.0, 2.0]
    quantized_dense = qkeras.QDense(3, kernel_quantizer="quantized_bits(4,0,1)", name="dense")
    marker = folder / MARKER
    hostile = _hostile_model(marker)
    for path in (folder / "lambda.h5", folder / "lambda.keras", folder / "lambda_savedmodel"):
        hostile.save(path)
    keras_file = folder / "conv.keras"
    folded_models["sequential_conv"].save(keras_file)
    marker.unlink()  # building the model ran the payload once
    return {
        "missing": folder / "missing.h5",
        "directory": folder / "folder.h5",
        "empty": folder / "empty.h5",
        "not_hdf5": folder / "text.h5",
        "truncated": folder / "truncated.h5",
        "no_model": folder / "data.h5",
        "custom_layer": _save(
            _dense_model(Mystery(name="mystery"), quantized_dense), folder / "custom.h5"
        ),
        "ulaw": _save(
            _dense_model(
                qkeras.QDense(3, kernel_quantizer="quantized_bits(4,0,1)", name="dense"),
                qkeras.QActivation("quantized_ulaw(8,0)", name="ulaw"),
            ),
            folder / "ulaw.h5",
        ),
        "bernoulli": _save(
            _dense_model(qkeras.QDense(3, kernel_quantizer="bernoulli()", name="coin")),
            folder / "bernoulli.h5",
        ),
        "negative_variance": _set_weight(
            valid_file, folder / "variance.h5", "conv", "moving_variance", 1, -0.5
        ),
        "nan_kernel": _set_weight(valid_file, folder / "nan.h5", "dense", "kernel", 3, np.nan),
        "inf_gamma": _set_weight(valid_file, folder / "inf.h5", "dw", "gamma", 0, np.inf),
        "overflowing_fold": _set_weight(valid_file, folder / "huge.h5", "conv", "kernel", 3, 3e38),
        "kernel_quantizer_overflow": _set_weight(
            valid_file, folder / "large.h5", "dense", "kernel", 3, 1e38
        ),
        "unknown_spatial_dims": _save(
            keras.Sequential(
                [
                    keras.Input((None, None, 3)),
                    qkeras.QConv2DBatchnorm(
                        2, 3, kernel_quantizer="quantized_bits(4,0,1)", name="conv"
                    ),
                    keras.layers.GlobalMaxPooling2D(name="pool"),
                ]
            ),
            folder / "spatial.h5",
        ),
        "lambda_h5": folder / "lambda.h5",
        "lambda_keras": folder / "lambda.keras",
        "lambda_savedmodel": folder / "lambda_savedmodel",
        "module_import": _edit_config(
            keras_file,
            folder / "module.keras",
            _import_module(MARKER_MODULE),
        ),
        "unparseable_quantizer": _edit_config(
            valid_file,
            folder / "nested_call.h5",
            _set_field("relu", "activation", "quantized_relu(4,1,negative_slope=abs(-1))"),
        ),
        "unknown_quantizer": _edit_config(
            valid_file,
            folder / "unknown_quantizer.h5",
            _set_field("relu", "activation", "quantised_relu(4,1)"),
        ),
        "absurd_bits": _edit_config(
            valid_file,
            folder / "absurd_bits.h5",
            _set_field("relu", "activation", "quantized_relu(100000000,3)"),
        ),
        "absurd_integer": _edit_config(
            keras_file,
            folder / "absurd_integer.keras",
            _set_field(
                "conv",
                "kernel_quantizer",
                {"class_name": "quantized_bits", "config": {"bits": 4, "integer": 999999999999}},
            ),
        ),
        "byte_string_kernel": _replace_kernel(
            valid_file, folder / "bytes.h5", lambda shape: np.full(shape, b"0.5", dtype="S3")
        ),
        "wrong_kernel_shape": _replace_kernel(
            valid_file, folder / "shape.h5", lambda shape: np.zeros((shape[0] + 1, shape[1]))
        ),
        "long_chain": _model_only_file(folder / "chain.h5", _chain(2000)),
        "huge_input": _model_only_file(folder / "huge_input.h5", _one_conv([65536, 65536, 1], 2)),
        "huge_filters": _model_only_file(folder / "huge_filters.h5", _one_conv([8, 8, 3], 10**8)),
        "deep_nesting": _model_only_file(folder / "nesting.h5", _nested(200)),
    }


EXPECTED = {
    "missing": (ModelFileError, r"must exist.*missing.h5"),
    "directory": (ModelFileError, r"SavedModel.*folder.h5"),
    "empty": (ModelFileError, r"empty.h5' is empty"),
    "not_hdf5": (ModelFileError, r"HDF5 file or a .keras zip archive.*text.h5' is neither"),
    "truncated": (ModelFileError, r"truncated.h5' is truncated \(20000 of its \d+ bytes\)"),
    "no_model": (ModelFileError, r"whole Keras model.*data.h5' has no model config"),
    "custom_layer": (UnsafeModelError, r"custom.h5' with layer='mystery'.*class 'Mystery'"),
    "ulaw": (QuantizerError, r"quantized_ulaw has no fixed-point type.*layer='ulaw'"),
    "bernoulli": (QuantizerError, r"bernoulli has no fixed-point.*'coin'"),
    "negative_variance": (InvalidWeightsError, r"variance must not be negative.*'conv'"),
    "nan_kernel": (InvalidWeightsError, r"must be finite.*'dense'.*kernel"),
    "inf_gamma": (InvalidWeightsError, r"must be finite.*'dw'.*gamma"),
    "overflowing_fold": (InvalidWeightsError, r"must be finite.*'conv'.*folded kernel overflows"),
    "kernel_quantizer_overflow": (
        InvalidWeightsError,
        r"quantized kernel must be finite.*'dense'.*auto_po2.*NaN or inf",
    ),
    "unknown_spatial_dims": (
        UnsupportedShapeError,
        r"dimension but the batch to be known.*\(batch, None, None, 3\)",
    ),
    "lambda_h5": (UnsafeModelError, r"lambda.h5' with layer='payload', a Lambda layer"),
    "lambda_keras": (UnsafeModelError, r"lambda.keras' with layer='payload', a Lambda layer"),
    "lambda_savedmodel": (UnsafeModelError, r"savedmodel' with layer='payload', a Lambda layer"),
    "module_import": (
        UnsafeModelError,
        r"module.keras' with layer='sequential_conv', which makes Keras import module "
        r"'bnfold_payload'",
    ),
    "unparseable_quantizer": (
        QuantizerError,
        r"must be literals.*layer='relu'.*negative_slope=abs\(-1\).*nested_call.h5",
    ),
    "unknown_quantizer": (
        QuantizerError,
        r"'quantised_relu' is not one.*layer='relu'.*unknown_quantizer.h5",
    ),
    "absurd_bits": (
        QuantizerError,
        r"1 to 64 bits \(got 100000000\).*layer='relu'.*absurd_bits.h5",
    ),
    "absurd_integer": (
        QuantizerError,
        r"within float32.*integer=999999999999.*layer='conv'.*absurd_integer.keras",
    ),
    "byte_string_kernel": (
        ModelFileError,
        r"weights must be numbers.*bytes.h5' whose dataset '.*dense/kernel:0' holds \|S3",
    ),
    "wrong_kernel_shape": (
        ModelFileError,
        r"shape.h5.*dense/kernel:0.*Shape mismatch.*\(192, 5\).*\(193, 5\)",
    ),
    "long_chain": (ModelTooLargeError, r"at most 1000 layers.*MAX_LAYERS.*chain.h5"),
    "huge_input": (
        ModelTooLargeError,
        r"memory limit.*huge_input.h5' needing about [\d.]+ TB; its largest layer 'conv' has",
    ),
    "huge_filters": (
        ModelTooLargeError,
        r"memory limit.*huge_filters.h5' needing about .* 'conv' has 25.6 GB of weights",
    ),
    "deep_nesting": (
        ModelTooLargeError,
        r"nested at most 8 deep.*nesting.h5' whose model 'level190' is nested 9 deep",
    ),
}
# The cases that fail while the model loads, before any export stage.
LOAD_CASES = [case for case, (error, _) in EXPECTED.items() if issubclass(error, ModelFileError)]
LOAD_CASES += ["unparseable_quantizer", "unknown_quantizer", "absurd_bits", "absurd_integer"]


@pytest.fixture
def output(tmp_path) -> Path:
    """An output file from an earlier export, alone in its directory."""
    path = tmp_path / "out" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(PREVIOUS)
    return path


def _untouched(output: Path) -> bool:
    return output.read_bytes() == PREVIOUS and list(output.parent.iterdir()) == [output]


def _cli(capsys, *arguments: str) -> tuple[int, str, str]:
    code = main([str(argument) for argument in arguments])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(err: str) -> str:
    """The one error line; warning lines (an input without a quantizer) may come first."""
    lines = err.splitlines(keepends=True)
    while lines and lines[0].startswith("warning: "):
        lines.pop(0)
    err = "".join(lines)
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("case", list(EXPECTED))
def test_bad_input_raises_one_named_error_and_keeps_output(bad_inputs, output, case):
    error_class, pattern = EXPECTED[case]
    with pytest.raises(error_class, match=pattern) as raised:
        bnfold.export_onnx(bad_inputs[case], output, source_quantizers=builders.INPUT_QUANTIZER)
    assert "\n" not in str(raised.value)
    assert _untouched(output)
    assert not (bad_inputs[case].parent / MARKER).exists()


@pytest.mark.parametrize("case", list(EXPECTED))
def test_bad_input_on_the_command_line_is_one_line_exit_1(bad_inputs, output, capsys, case):
    code, out, err = _cli(capsys, bad_inputs[case], "-o", output)
    assert code == 1 and out == ""
    assert bad_inputs[case].name in _one_error_line(err)
    assert _untouched(output)
    assert not (bad_inputs[case].parent / MARKER).exists()


@pytest.mark.parametrize("case", LOAD_CASES)
def test_bad_input_to_unfold_is_one_line_exit_1(bad_inputs, tmp_path, capsys, case):
    output = tmp_path / "unfolded.h5"
    code = unfold_main(["unfold", str(bad_inputs[case]), "-o", str(output)])
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    assert bad_inputs[case].name in _one_error_line(captured.err)
    assert list(tmp_path.iterdir()) == []
    assert not (bad_inputs[case].parent / MARKER).exists()


def test_memory_limit_is_set_by_max_memory(valid_file, tmp_path, capsys):
    """The declared sizes of the issue's 10**7-filter file against an 8 GB limit; a real model
    against a tiny one."""
    path = _model_only_file(tmp_path / "filters.h5", _one_conv([8, 8, 3], 10**7))
    with pytest.raises(ModelTooLargeError, match=r"limit of 8.59 GB.*'conv' has 2.\d+ GB"):
        bnfold.load_model(path, max_memory=8 << 30)
    with pytest.raises(ModelTooLargeError, match=r"limit of 1.02 kB.*conv.h5"):
        bnfold.export_onnx(valid_file, max_memory=1 << 10)
    for command, main_function in ((["unfold"], unfold_main), ([], main)):
        code = main_function(
            [*command, str(valid_file), "-o", str(tmp_path / "x.onnx"), "--max-memory", "1K"]
        )
        assert code == 1 and "limit of 1.02 kB" in _one_error_line(capsys.readouterr().err)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["filters.h5"]


@pytest.mark.parametrize("size", ["lots", "-1G", "0"])
def test_unreadable_max_memory_is_a_usage_error(valid_file, capsys, size):
    with pytest.raises(SystemExit) as exit_info:
        main([str(valid_file), f"--max-memory={size}"])
    assert exit_info.value.code == 2
    assert "memory size" in capsys.readouterr().err


def test_unsafe_load_runs_the_code_of_a_file_the_user_trusts(bad_inputs, tmp_path):
    marker = bad_inputs["lambda_h5"].parent / MARKER
    try:
        model = bnfold.load_model(bad_inputs["lambda_h5"], safe=False)
        assert model.get_layer("payload").__class__.__name__ == "Lambda"
        assert marker.exists()
    finally:
        marker.unlink(missing_ok=True)


def test_module_in_the_working_directory_is_never_imported(bad_inputs, tmp_path):
    """``python -m`` puts the working directory on the import path; loading takes it off."""
    (tmp_path / f"{MARKER_MODULE}.py").write_text(f"open({MARKER!r}, 'w').close()\n")
    environment = dict(os.environ, PYTHONPATH=str(Path(bnfold.__file__).parent.parent))
    for extra in ([], ["--unsafe-load"]):
        done = subprocess.run(
            [sys.executable, "-m", "bnfold.export", str(bad_inputs["module_import"]), *extra],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=environment,
            timeout=300,
        )
        assert done.returncode == 1, done.stderr
        assert MARKER_MODULE in _one_error_line(done.stderr)
        assert sorted(path.name for path in tmp_path.iterdir()) == [f"{MARKER_MODULE}.py"]


def test_truncations_at_several_points_each_fail_cleanly(valid_file, output, capsys):
    data = valid_file.read_bytes()
    for size in (8, 512, len(data) // 3, len(data) - 1):
        path = output.parent.parent / f"cut{size}.h5"
        path.write_bytes(data[:size])
        with pytest.raises(ModelFileError, match=rf"cut{size}.h5.*(truncated|damaged)"):
            bnfold.export_onnx(path, output)
        code, _, err = _cli(capsys, path, "-o", output)
        assert code == 1 and f"cut{size}.h5" in _one_error_line(err)
        assert _untouched(output)


def test_current_directory_as_model_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = _cli(capsys, ".")
    assert code == 1 and "must be a SavedModel" in _one_error_line(err)
    assert list(tmp_path.iterdir()) == []


def test_dynamic_batch_still_needs_static_spatial_dims(bad_inputs):
    with pytest.raises(UnsupportedShapeError, match=r"input '\w+'"):
        bnfold.export_onnx(bad_inputs["unknown_spatial_dims"], batch_size=None)


# A model without QKeras layers: exported in float, with a warning.


@pytest.fixture(scope="module")
def float_file(tmp_path_factory) -> Path:
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(3, 3, activation="relu", name="conv"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(4, name="dense"),
        ],
        name="plain",
    )
    return _save(model, tmp_path_factory.mktemp("float") / "plain.h5")


def test_float_model_exports_without_quant_nodes_with_a_warning(float_file):
    with pytest.warns(
        FloatModelWarning, match=r"without QKeras layers.*'plain'.*plain.h5"
    ) as caught:
        exported = bnfold.export_onnx(float_file)
    assert caught[0].filename == __file__  # the warning points at the caller's line
    onnx.checker.check_model(exported, full_check=True)
    assert "Quant" not in {node.op_type for node in exported.graph.node}
    for node in exported.graph.node:
        keys = {entry.key for entry in node.metadata_props}
        assert "bnfold.layer" in keys and "bnfold.accumulator" not in keys
    metadata = {entry.key: entry.value for entry in exported.metadata_props}
    verification = json.loads(metadata["bnfold.verification"])
    assert (
        0 < verification["tolerance"]
        and verification["max_difference"] <= (verification["tolerance"])
    )


def test_float_model_with_input_quantizer_quantizes_the_input_only(float_file):
    with pytest.warns(FloatModelWarning):
        exported = bnfold.export_onnx(float_file, source_quantizers=builders.INPUT_QUANTIZER)
    roles = [
        entry.value
        for node in exported.graph.node
        for entry in node.metadata_props
        if entry.key == "bnfold.role"
    ]
    assert roles == ["input"]


def test_float_model_on_the_command_line_warns_in_one_line(float_file, tmp_path, capsys):
    code, out, err = _cli(capsys, float_file, "-o", tmp_path / "plain.onnx")
    assert code == 0
    assert err.count("\n") == 1 and err.startswith("warning: bnfold exports quantized models")
    assert "within" in out and "on float outputs" in out
    onnx.checker.check_model(onnx.load(tmp_path / "plain.onnx"))


# Output paths: refused before any work, naming the path; nothing written.


def _refuse_writes_in(directory: Path, monkeypatch) -> None:
    """Simulate a read-only directory (a read-only mount, say) for bnfold's file creation.

    Tests run as root, whom chmod does not stop, so the refusal is simulated at
    ``os.open``, the call that creates files, for that one directory.
    """
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if Path(path).parent == directory and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)


@pytest.mark.parametrize(
    ("where", "pattern"),
    [
        ("missing_directory", r"directory must exist.*'.*nowhere' does not exist"),
        # A file standing where a directory should be: as unwritable, even for root.
        ("parent_is_a_file", r"directory must exist.*'.*a_file' is not a directory"),
        ("read_only_directory", r"directory bnfold can write to.*Read-only file system"),
        ("a_directory", r"must name a file.*is a directory"),
        ("the_model_itself", r"must not replace the input model"),
    ],
)
def test_unwritable_output_fails_before_any_stage(
    valid_file, tmp_path, monkeypatch, capsys, where, pattern
):
    model = tmp_path / "model.h5"
    model.write_bytes(valid_file.read_bytes())
    (tmp_path / "a_file").write_text("")
    (tmp_path / "read_only").mkdir()
    output = {
        "missing_directory": tmp_path / "nowhere" / "out.onnx",
        "parent_is_a_file": tmp_path / "a_file" / "out.onnx",
        "read_only_directory": tmp_path / "read_only" / "out.onnx",
        "a_directory": tmp_path / "read_only",
        "the_model_itself": model,
    }[where]
    _refuse_writes_in(tmp_path / "read_only", monkeypatch)
    before = sorted(path.name for path in tmp_path.rglob("*"))
    stages = []
    with pytest.raises(OutputPathError, match=pattern):
        bnfold.export_onnx(model, output, on_stage=stages.append)
    assert stages == []
    code, _, err = _cli(capsys, model, "-o", output)
    assert code == 1 and str(output) in _one_error_line(err)
    assert sorted(path.name for path in tmp_path.rglob("*")) == before
    assert model.read_bytes() == valid_file.read_bytes()


@pytest.fixture
def full_disk(tmp_path):
    """A directory on a full tmpfs (needs root)."""
    directory = tmp_path / "full"
    directory.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(directory)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    with contextlib.suppress(OSError), (directory / "filler").open("wb") as filler:
        filler.write(b"\0" * (64 << 10))  # fills it: not one more block
    yield directory
    subprocess.run(["umount", str(directory)], check=True)


FULL_DISK = r"must be written in full.*No space left on device"
QUANTIZER = builders.INPUT_QUANTIZER


def test_full_disk_is_one_output_error_leaving_nothing(valid_file, full_disk, tmp_path, capsys):
    onnx_file = full_disk / "model.onnx"
    with pytest.raises(OutputPathError, match=rf"{FULL_DISK}"):
        bnfold.export_onnx(valid_file, onnx_file, source_quantizers=builders.INPUT_QUANTIZER)
    for arguments in (
        ["-o", onnx_file],
        ["-o", tmp_path / "model.onnx", "--report", full_disk / "report.json"],
        ["-o", tmp_path / "model.onnx", "--hls4ml-config", full_disk / "hls4ml.yml"],
    ):
        code, _, err = _cli(capsys, valid_file, *arguments, "--input-quantizer", QUANTIZER)
        assert code == 1 and re.search(FULL_DISK, _one_error_line(err)), err
    for name in ("unfolded.h5", "unfolded.keras"):
        code = unfold_main(["unfold", str(valid_file), "-o", str(full_disk / name)])
        assert code == 1 and re.search(FULL_DISK, _one_error_line(capsys.readouterr().err))
    assert [path.name for path in full_disk.iterdir()] == ["filler"]


def test_unwritable_report_path_fails_before_writing_the_onnx(valid_file, tmp_path, capsys):
    output = tmp_path / "model.onnx"
    code, _, err = _cli(capsys, valid_file, "-o", output, "--report", tmp_path / "no" / "r.json")
    assert code == 1 and "r.json" in _one_error_line(err)
    assert not output.exists()


# Failures at later stages, expected or not: one error naming the stage, output kept.


def _fail_with(error: Exception):
    def fail(*args, **kwargs):
        raise error

    return fail


@pytest.mark.parametrize(
    ("stage", "target", "error"),
    [
        ("unfold+strip", "strip", AttributeError("keras internals")),
        ("convert", "convert", KeyError("tf2onnx internals")),
        ("annotate", "annotate", ValueError("unexpected graph")),
        ("verify", "verify_outputs", RuntimeError("executor broke")),
        ("write", "onnx.save", ValueError("serializer broke")),
    ],
    ids=["unfold+strip", "convert", "annotate", "verify", "write"],
)
def test_unexpected_failure_names_its_stage_and_keeps_output(
    valid_file, output, monkeypatch, stage, target, error
):
    if target == "onnx.save":
        monkeypatch.setattr(onnx, "save", _fail_with(error))
    else:
        monkeypatch.setattr(bnfold.export.pipeline, target, _fail_with(error))
    pattern = (
        rf"^The {re.escape(stage)} stage of the export failed.*Received: {type(error).__name__}: "
    )
    with pytest.raises(ExportError, match=pattern) as raised:
        bnfold.export_onnx(valid_file, output, source_quantizers=builders.INPUT_QUANTIZER)
    assert raised.value.stage == stage and raised.value.__cause__ is error
    assert _untouched(output)


def test_unexpected_failure_on_the_command_line_is_one_line_traceback_with_debug(
    valid_file, output, monkeypatch, capsys
):
    monkeypatch.setattr(bnfold.export.pipeline, "convert", _fail_with(KeyError("boom")))
    code, _, err = _cli(capsys, valid_file, "-o", output)
    assert code == 1
    line = _one_error_line(err)
    assert "The convert stage of the export failed" in line and "KeyError: 'boom'" in line
    assert line.endswith("rerun with --debug for the traceback\n")
    code, _, err = _cli(capsys, valid_file, "-o", output, "--debug")
    assert code == 1 and "Traceback" in err and err.splitlines()[-1].startswith("error: ")
    assert _untouched(output)


def test_error_outside_the_pipeline_is_still_one_line(valid_file, output, monkeypatch, capsys):
    monkeypatch.setattr(bnfold.export.pipeline, "export_onnx", _fail_with(ZeroDivisionError("x")))
    code, _, err = _cli(capsys, valid_file, "-o", output)
    assert code == 1
    line = _one_error_line(err)
    assert "conv.h5: unexpected ZeroDivisionError: x; rerun with --debug" in line


def test_opset_out_of_range_fails_before_any_stage(valid_file, output, capsys):
    stages = []
    with pytest.raises(ExportError, match=r"opset must be between 9 and 18. Received: opset=5"):
        bnfold.export_onnx(valid_file, output, opset=5, on_stage=stages.append)
    assert stages == []
    code, _, err = _cli(capsys, valid_file, "-o", output, "--opset", "19")
    assert code == 1 and "opset=19" in _one_error_line(err)
    assert _untouched(output)


@pytest.mark.parametrize(
    "arguments", [[], ["model.h5", "--opset", "x"], ["model.h5", "--no-such-option"]]
)
def test_usage_errors_exit_2(arguments, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("python -m bnfold.export: error:")


def test_every_error_class_is_a_bnfold_error():
    classes = [
        value
        for value in vars(bnfold.errors).values()
        if isinstance(value, type) and issubclass(value, Exception)
    ]
    errors = [c for c in classes if not issubclass(c, Warning)]
    assert all(issubclass(c, BnfoldError) for c in errors)
    assert all(issubclass(c, BnfoldWarning) for c in classes if c not in errors)


# Numbers the types cannot hold: a warning naming the layer; the export goes on.


def test_folded_bias_beyond_its_quantizer_warns_and_exports_exactly(tmp_path, capsys):
    model = _dense_model(
        bnfold.layers.QDenseBatchnorm(
            3,
            kernel_quantizer="quantized_bits(4,0,1)",
            bias_quantizer="quantized_bits(4,1,1)",
            name="dense",
        ),
        shape=(4,),
    )
    builders.randomize_batchnorm(model)
    batchnorm = model.get_layer("dense").batchnorm
    weights = batchnorm.get_weights()  # gamma, beta, moving mean, moving variance
    weights[1] = np.array([10, -10, 0], np.float32)
    batchnorm.set_weights(weights)
    with pytest.warns(
        RangeWarning, match=r"bias quantizer's range.*layer='dense'.*\[-1.75, 1.75\]"
    ):
        exported = bnfold.export_onnx(model, source_quantizers=builders.INPUT_QUANTIZER)
    metadata = {entry.key: entry.value for entry in exported.metadata_props}
    assert json.loads(metadata["bnfold.verification"])["max_difference"] == 0.0
    path = _save(model, tmp_path / "clipped.h5")
    code, _, err = _cli(capsys, path, "--input-quantizer", builders.INPUT_QUANTIZER)
    assert code == 0
    assert err.count("\n") == 1 and err.startswith("warning: A folded bias") and "'dense'" in err


def test_plain_bias_beyond_its_quantizer_warns_without_saying_folded():
    model = _dense_model(
        qkeras.QDense(
            3,
            kernel_quantizer="quantized_bits(4,0,1,alpha=1)",
            bias_quantizer="quantized_bits(4,1,1)",
            name="plain",
        ),
        shape=(4,),
    )
    kernel, _ = model.get_layer("plain").get_weights()
    model.get_layer("plain").set_weights([kernel, np.array([10, -10, 0], np.float32)])
    with pytest.warns(RangeWarning) as warned:
        bnfold.export_onnx(model, source_quantizers=builders.INPUT_QUANTIZER)
    (message,) = [str(w.message) for w in warned if issubclass(w.category, RangeWarning)]
    assert message.startswith("A bias should lie within its bias quantizer's range")
    assert "folded" not in message and "layer='plain' with bias in [-10, 10]" in message


def test_accumulator_over_32_bits_warns_naming_the_layer():
    model = _dense_model(
        qkeras.QDense(
            2,
            kernel_quantizer="quantized_bits(16,1,1,alpha=1)",
            bias_quantizer="quantized_bits(16,8,1)",
            name="wide",
        ),
        shape=(1024,),
    )
    with pytest.warns(RangeWarning, match=r"32 bits.*layer='wide' needs ap_fixed<43,"):
        bnfold.export_onnx(model, source_quantizers="quantized_bits(16,4,1)", verify=False)


def test_quantized_models_raise_no_warning(folded_models):
    with warnings.catch_warnings():
        warnings.simplefilter("error", BnfoldWarning)
        bnfold.export_onnx(
            folded_models["sequential_conv"], source_quantizers=builders.INPUT_QUANTIZER
        )
