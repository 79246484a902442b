from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

import bnfold
import builders
from bnfold.export.__main__ import main


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, folded_models):
    path = tmp_path_factory.mktemp("cli") / "conv.h5"
    folded_models["sequential_conv"].save(path)
    return path


def test_writes_onnx_table_and_report(model_file, tmp_path, capsys):
    output, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code = main(
        [
            str(model_file),
            "-o",
            str(output),
            "--report",
            str(report),
            "--input-quantizer",
            builders.INPUT_QUANTIZER,
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    onnx.checker.check_model(onnx.load(output), full_check=True)
    assert any(line.split()[:2] == ["dense", "QDenseBatchnorm"] for line in printed.splitlines())
    assert "verified: QONNX equals QKeras on 8 samples (max difference 0.0)" in printed
    written = json.loads(report.read_text())
    assert written["verification"]["max_difference"] == 0.0
    conv = next(row for row in written["layers"] if row["layer"] == "conv")
    assert conv["accumulator_hls"].startswith("ap_fixed<")


def test_hls4ml_input_type_exports_as_its_quantized_bits_and_prints_both(
    model_file, tmp_path, capsys
):
    reports = {}
    for quantizer in ("ap_fixed<8,4>", "quantized_bits(8,3,0,1,alpha=1)"):
        reports[quantizer] = tmp_path / f"{len(reports)}.json"
        output = tmp_path / f"{len(reports)}.onnx"
        arguments = [str(model_file), "-o", str(output), "--report", str(reports[quantizer])]
        assert main([*arguments, "--input-quantizer", quantizer]) == 0
    printed = capsys.readouterr().out
    layers = [json.loads(report.read_text())["layers"] for report in reports.values()]
    assert layers[0] == layers[1]
    assert layers[0][0]["activation"] == "quantized_bits(8,3,0,alpha=1)"
    input_rows = [line.split()[1:] for line in printed.splitlines() if "InputLayer" in line]
    both_forms = ["quantized_bits(8,3,0,alpha=1)", "(ap_fixed<8,4>)"]
    assert input_rows == [["InputLayer", "-", "-", *both_forms, "-"]] * 2


def test_channels_first_gives_an_nchw_input(model_file, tmp_path, capsys):
    output = tmp_path / "nchw.onnx"
    code = main(
        [
            str(model_file),
            "-o",
            str(output),
            "--channels-first",
            "--input-quantizer",
            builders.INPUT_QUANTIZER,
        ]
    )
    assert code == 0
    assert "verified: QONNX equals QKeras" in capsys.readouterr().out
    graph_input = onnx.load(output).graph.input[0]
    assert [d.dim_value for d in graph_input.type.tensor_type.shape.dim] == [1, 3, 10, 10]


def test_default_output_is_model_with_onnx_suffix(model_file, capsys):
    assert main([str(model_file), "--no-verify"]) == 0
    assert model_file.with_suffix(".onnx").is_file()
    assert "not verified" in capsys.readouterr().out


def test_failure_is_one_line_exit_1_and_leaves_existing_output(tmp_path, capsys):
    output = tmp_path / "out.onnx"
    output.write_bytes(b"previous")
    code = main([str(tmp_path / "missing.h5"), "-o", str(output)])
    error = capsys.readouterr().err
    assert code == 1
    assert error.count("\n") == 1 and error.startswith("error: ") and "missing.h5" in error
    assert output.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_failed_export_leaves_no_partial_file(model_file, tmp_path, capsys):
    output = tmp_path / "out.onnx"
    assert (
        main([str(model_file), "-o", str(output), "--input-quantizer", "quantized_ulaw(8,0)"]) == 1
    )
    assert "quantized_ulaw" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_usage_error_exits_2():
    with pytest.raises(SystemExit) as exit_info:
        main(["--opset"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    "quantizer",
    [
        "quantized_bits(8,",
        "fancy_bits(8,0,1)",
        "quantized_bits(100000000,3,1)",
        "quantized_relu(8,999)",
    ],
)
def test_unreadable_input_quantizer_is_a_usage_error(model_file, tmp_path, capsys, quantizer):
    output = tmp_path / "out.onnx"
    with pytest.raises(SystemExit) as exit_info:
        main([str(model_file), "-o", str(output), "--input-quantizer", quantizer])
    assert exit_info.value.code == 2
    assert "argument --input-quantizer:" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_help_answers_without_importing_tensorflow():
    code = (
        "import sys\n"
        "from bnfold.export.__main__ import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--input-quantizer" in result.stdout


def test_table_names_what_activation_and_normalization_layers_compute(tmp_path, capsys):
    """Float activation layers and batch normalizations name their function in the
    activation column, settings that differ from Keras's defaults included."""
    from bnfold.keras import keras, qkeras

    inputs = keras.Input((8,), name="features")
    x = qkeras.QDense(6, kernel_quantizer=builders.KERNEL, bias_quantizer=builders.BIAS)(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.LeakyReLU(0.25, name="leaky")(x)
    x = qkeras.QBatchNormalization(name="qbn")(x)
    x = keras.layers.ReLU(max_value=2.0, name="capped")(x)
    x = keras.layers.Activation("softmax", name="probabilities")(x)
    model_file, report = tmp_path / "float_parts.h5", tmp_path / "report.json"
    builders._randomized(keras.Model(inputs, x)).save(model_file)
    arguments = [str(model_file), "-o", str(tmp_path / "out.onnx"), "--report", str(report)]
    assert main([*arguments, "--input-quantizer", builders.INPUT_QUANTIZER, "--no-verify"]) == 0
    printed = capsys.readouterr().out
    activations = {
        row["layer"]: row["activation"] for row in json.loads(report.read_text())["layers"]
    }
    assert activations["bn"] == "batchnorm"
    assert activations["leaky"] == "leaky_relu(alpha=0.25)"
    assert activations["qbn"].startswith(
        "batchnorm, quantized gamma=quantized_relu_po2(6,2048), beta="
    )
    assert activations["capped"] == "relu(max_value=2)"
    assert activations["probabilities"] == "softmax"
    rows = {line.split()[0]: line.split()[1:] for line in printed.splitlines() if line.strip()}
    assert rows["probabilities"] == ["Activation", "-", "-", "softmax", "-"]
    assert rows["bn"] == ["BatchNormalization", "-", "-", "batchnorm", "-"]


GOLDEN = Path(__file__).resolve().parent.parent / "golden"
GOLDEN_INPUT = "quantized_bits(8,3,1,alpha=1)"  # the golden MLPs' source quantizer


def _run_cli(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m bnfold.export ...`` in a fresh interpreter, as users run it."""
    environment = dict(os.environ, PYTHONPATH=str(Path(bnfold.__file__).parent.parent))
    return subprocess.run(
        [sys.executable, "-m", "bnfold.export", *arguments],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=environment,
        timeout=900,
    )


def _copy_golden(directory: Path, *names: str) -> list[Path]:
    directory.mkdir()
    copies = [directory / f"{name}.h5" for name in names]
    for copy in copies:
        shutil.copyfile(GOLDEN / copy.name, copy)
    return copies


def test_several_models_one_line_each_go_on_past_a_failure(tmp_path):
    mlp, po2, two_inputs = _copy_golden(
        tmp_path / "models", "jet_tagging_mlp", "po2_no_bias", "two_in_two_out"
    )
    arguments = [str(mlp), str(two_inputs), str(tmp_path / "missing.h5"), str(po2)]
    done = _run_cli(*arguments, "-o", "out", "--input-quantizer", GOLDEN_INPUT, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines[:4]] == ["ok", "failed", "failed", "ok"]
    assert lines[0].startswith(f"ok      {mlp} -> out/jet_tagging_mlp.onnx: 8 layers, verified")
    assert "two_in_two_out.h5" in lines[1] and "one quantizer per model input" in lines[1]
    # Each line leads with its file, even when the error names it too.
    assert lines[2].startswith(f"failed  {tmp_path / 'missing.h5'}: The model file must exist.")
    assert lines[4].startswith("exported 2 of 4 models, 2 failed (")
    assert len(lines) == 5
    # The failed files leave nothing, not even a partial file.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "jet_tagging_mlp.onnx",
        "po2_no_bias.onnx",
    ]
    for name in ("jet_tagging_mlp", "po2_no_bias"):
        written = onnx.load(tmp_path / "out" / f"{name}.onnx")
        onnx.checker.check_model(written, full_check=True)
        metadata = {entry.key: entry.value for entry in written.metadata_props}
        assert json.loads(metadata["bnfold.verification"])["max_difference"] == 0.0


def test_pattern_with_worker_processes_writes_each_beside_its_model(tmp_path):
    copies = _copy_golden(tmp_path / "models", "kws_dscnn", "po2_no_bias")
    done = _run_cli("models/*.h5", "--jobs", "2", "--no-verify", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    names = [str(copy.relative_to(tmp_path)) for copy in copies]
    assert sorted(line.split()[1] for line in lines[:2]) == names
    assert all(line.startswith("ok") and "not verified" in line for line in lines[:2])
    assert lines[2].startswith("exported 2 of 2 models (")
    for copy in copies:
        onnx.checker.check_model(onnx.load(copy.with_suffix(".onnx")), full_check=True)
    # Each worker's warnings name their file.
    warned = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
    assert {line.split()[1] for line in warned} == {f"{name}:" for name in names}


@pytest.mark.parametrize(
    ("second", "option", "message"),
    [
        ("b/n.h5", "--report", "argument --report: names one file"),
        ("b/n.h5", "--hls4ml-config", "argument --hls4ml-config: names one file"),
        ("b/m.h5", "-o", "each model needs its own output file"),
    ],
)
def test_several_models_usage_errors_before_any_work(tmp_path, capsys, second, option, message):
    models = [str(tmp_path / "a/m.h5"), str(tmp_path / second)]
    with pytest.raises(SystemExit) as exit_info:
        main([*models, option, str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_pattern_matching_nothing_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "*.h5")])
    assert exit_info.value.code == 2
    assert "no file matches the pattern" in capsys.readouterr().err
