"""Bad input, end to end: through ``export_onnx`` and through ``python -m bnfold.export``.

Every failure is one ``BnfoldError`` naming the file or layer at fault; the
command line prints it as one line and exits 1 (2 for a usage error); an
existing output file stays as it was, and no other file appears.
"""

from __future__ import annotations

import errno
import json
import os
import warnings
from pathlib import Path

import h5py
import numpy as np
import onnx
import pytest

import bnfold
import bnfold.errors
import bnfold.export.pipeline
import builders
from bnfold.errors import (
    BnfoldError,
    BnfoldWarning,
    ExportError,
    FloatModelWarning,
    InvalidWeightsError,
    ModelFileError,
    OutputPathError,
    QuantizerError,
    RangeWarning,
    UnsupportedShapeError,
)
from bnfold.export.__main__ import main
from bnfold.keras import keras, qkeras

PREVIOUS = b"the previous export"


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


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory, folded_models) -> Path:
    return _save(folded_models["sequential_conv"], tmp_path_factory.mktemp("valid") / "conv.h5")


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, valid_file) -> dict[str, Path]:
    """One file per kind of bad input (built once; tests never change them)."""
    folder = tmp_path_factory.mktemp("bad")
    (folder / "folder.h5").mkdir()
    (folder / "empty.h5").touch()
    (folder / "text.h5").write_text("not a model\n")
    (folder / "truncated.h5").write_bytes(valid_file.read_bytes()[:20000])
    with h5py.File(folder / "data.h5", "w") as file:
        file["x"] = [1.0, 2.0]
    quantized_dense = qkeras.QDense(3, kernel_quantizer="quantized_bits(4,0,1)", name="dense")
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
        "stochastic_binary": _save(
            _dense_model(qkeras.QDense(3, kernel_quantizer="stochastic_binary()", name="coin")),
            folder / "stochastic.h5",
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
    }


EXPECTED = {
    "missing": (ModelFileError, r"must exist.*missing.h5"),
    "directory": (ModelFileError, r"SavedModel.*folder.h5"),
    "empty": (ModelFileError, r"empty.h5' is empty"),
    "not_hdf5": (ModelFileError, r"HDF5 file or a .keras zip archive.*text.h5' is neither"),
    "truncated": (ModelFileError, r"truncated.h5' is truncated \(20000 of its \d+ bytes\)"),
    "no_model": (ModelFileError, r"whole Keras model.*data.h5' has no model config"),
    "custom_layer": (ModelFileError, r"custom.h5' uses unknown layer class 'Mystery'"),
    "ulaw": (QuantizerError, r"quantized_bits .*quantized_relu.*layer='ulaw'.*quantized_ulaw"),
    "stochastic_binary": (QuantizerError, r"stochastic_binary has no fixed-point.*'coin'"),
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
}


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


@pytest.mark.parametrize("case", list(EXPECTED))
def test_bad_input_on_the_command_line_is_one_line_exit_1(bad_inputs, output, capsys, case):
    code, out, err = _cli(capsys, bad_inputs[case], "-o", output)
    assert code == 1 and out == ""
    assert bad_inputs[case].name in _one_error_line(err)
    assert _untouched(output)


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
        ("convert", "convert", KeyError("tf2onnx internals")),
        ("annotate", "annotate", ValueError("unexpected graph")),
        ("verify", "verify_outputs", RuntimeError("executor broke")),
        ("write", "onnx.save", OSError(errno.ENOSPC, "No space left on device")),
    ],
    ids=["convert", "annotate", "verify", "write"],
)
def test_unexpected_failure_names_its_stage_and_keeps_output(
    valid_file, output, monkeypatch, stage, target, error
):
    if target == "onnx.save":
        monkeypatch.setattr(onnx, "save", _fail_with(error))
    else:
        monkeypatch.setattr(bnfold.export.pipeline, target, _fail_with(error))
    pattern = rf"^The {stage} stage of the export failed.*Received: {type(error).__name__}: "
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
