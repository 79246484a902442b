from __future__ import annotations

import subprocess
import sys

import bnfold
import builders
from bnfold.__main__ import main


def test_unfold_command_writes_plain_model_and_lists_layers(tmp_path, folded_models, capsys):
    source = tmp_path / "model.h5"
    folded_models["sequential_conv"].save(source)
    assert main(["unfold", str(source)]) == 0
    printed = capsys.readouterr().out
    assert "dense: QDenseBatchnorm -> QDense" in printed
    assert "dw: QDepthwiseConv2DBatchnorm -> QDepthwiseConv2D" in printed
    unfolded = bnfold.load_model(tmp_path / "model_unfolded.h5")
    inputs = builders.grid_inputs(unfolded)
    assert (
        unfolded.predict(inputs, verbose=0)
        == folded_models["sequential_conv"].predict(inputs, verbose=0)
    ).all()


def test_unfold_command_failure_is_one_line_and_writes_nothing(tmp_path, capsys):
    output = tmp_path / "out.h5"
    assert main(["unfold", str(tmp_path / "missing.h5"), "-o", str(output)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "missing.h5" in error
    assert list(tmp_path.iterdir()) == []


def test_help_does_not_import_tensorflow():
    code = (
        "import sys; from bnfold.__main__ import main\n"
        "try: main(['--help'])\nexcept SystemExit: pass\n"
        "assert 'tensorflow' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_unfold_command_refuses_an_unwritable_output_before_loading(tmp_path, capsys):
    output = tmp_path / "missing" / "out.h5"
    assert main(["unfold", str(tmp_path / "whatever.h5"), "-o", str(output)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "missing" in error
