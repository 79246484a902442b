from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest

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
