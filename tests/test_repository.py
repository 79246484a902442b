"""Checks that keep the repository's documents and settings in step with the code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import supported_versions
from bnfold.folding import FOLDED_LAYER_TYPES
from bnfold.layer_table import ACTIVATION_FUNCTIONS, LAYERS
from bnfold.quantizer_table import QUANTIZERS

ROOT = Path(__file__).resolve().parent.parent
# The rows the README's table lists with their constraints file: the table's version of each
# package that file pins must be the pinned one.
PINNED_ROWS = {
    "py3.10-tf2.15": "tf2.15.txt",
    "py3.11-reference": "reference.txt",
    "py3.12-tf2.21": "reference.txt",
    "py3.13-tf2.21": "reference.txt",
}


def test_readme_layer_table_matches_folded_layer_types():
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| (Q\w+Batchnorm) \| (\w+) \| (\w+) \|$", readme, re.MULTILINE)
    expected = [
        (e.folded, e.plain.__name__, e.kernel_quantizer) for e in FOLDED_LAYER_TYPES.values()
    ]
    assert rows == expected


def _support_table(first_column: str, entries) -> list[str]:
    """One README support table: a row per table entry, in the tables' shared columns."""
    return [
        f"| {first_column} | exported as | exact or float | read by hls4ml | read by FINN |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {e.name} | {e.onnx} | {e.exact} | {e.hls4ml} | {e.finn} |" for e in entries),
    ]


def supported_layers_tables() -> str:
    """The README's tables of supported layers and activation functions, from the layer table."""
    lines = [
        *_support_table("layer", LAYERS.values()),
        "",
        *_support_table("activation function", ACTIVATION_FUNCTIONS.values()),
    ]
    return "\n".join(lines) + "\n"


def supported_quantizers_table() -> str:
    """The README's table of QKeras quantizers, from the quantizer table."""
    return "\n".join(_support_table("quantizer", QUANTIZERS.values())) + "\n"


@pytest.mark.parametrize(
    "expected",
    [supported_layers_tables, supported_quantizers_table],
    ids=["layers", "quantizers"],
)
def test_readme_support_tables_match_the_tables(expected):
    table = expected()
    assert table in (ROOT / "README.md").read_text(), "README should read:\n" + table


def test_ci_runs_the_matrix_then_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```sh\n(.+?)\n```", readme, re.DOTALL)
    assert len(commands) >= 2
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/matrix.sh" in ci
    assert ci.index("scripts/matrix.sh") < ci.index(commands[1])


def _pins(constraints: str) -> dict[str, str]:
    lines = (ROOT / "constraints" / constraints).read_text().splitlines()
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


def test_readme_table_of_supported_versions_lists_the_matrix_rows_and_their_pins():
    rows = supported_versions.table()
    matrix = (ROOT / "scripts" / "matrix.sh").read_text()
    listed = re.search(r"^ALL_ROWS=\((.*)\)$", matrix, re.MULTILINE).group(1).split()
    assert list(rows) == listed == list(PINNED_ROWS)
    for row, constraints in PINNED_ROWS.items():
        pins = _pins(constraints)
        table = {package: version for package, version in rows[row].items() if package in pins}
        assert table == {package: pins[package] for package in table}, row
        assert "tensorflow" in table, row


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_is_clean(command):
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "src", "tests", "scripts"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
