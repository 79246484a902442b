"""The README's table of supported versions, and whether this environment is one of its rows.

Usage:
    python scripts/supported_versions.py ROW    exit 1, naming each package, unless the
                                                running Python and the installed packages
                                                are the versions the README lists for ROW

``scripts/matrix.sh`` runs it in each row's venv after installing, so the table
says what the matrix ran; ``tests/test_repository.py`` keeps the table's pinned
rows in step with the constraints files.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
_ROW = re.compile(r"^\| (py3\.\d+-[\w.-]+) \|(.*)\|$", re.MULTILINE)
_HEADER = re.compile(r"^\| row \|(.*)\|$", re.MULTILINE)
# Columns that name no package.
_PYTHON, _TESTS = "Python", "tests"


def table(readme: str | None = None) -> dict[str, dict[str, str]]:
    """Row name -> {column: version} for each row of the table, ``Python`` included."""
    text = README.read_text() if readme is None else readme
    header = _HEADER.search(text)
    if header is None:
        raise ValueError(f"{README} has no table of supported versions (a '| row |' header)")
    columns = [cell.strip() for cell in header.group(1).split("|")]
    rows = {}
    for name, cells in _ROW.findall(text):
        values = [cell.strip() for cell in cells.split("|")]
        rows[name] = {c: v for c, v in zip(columns, values, strict=True) if c != _TESTS}
    return rows


def mismatches(row: dict[str, str]) -> list[str]:
    """Each column of ``row`` that the running interpreter or its packages do not match."""
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    found = [] if row[_PYTHON] == running else [f"Python: README {row[_PYTHON]}, running {running}"]
    for package, listed in row.items():
        if package == _PYTHON:
            continue
        try:
            installed = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            installed = "not installed"
        if installed != listed:
            found.append(f"{package}: README {listed}, installed {installed}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("row", help="a row of the README's table, e.g. py3.11-reference")
    args = parser.parse_args(argv)
    rows = table()
    if args.row not in rows:
        parser.error(f"the README's table has no row {args.row!r}; rows: {', '.join(rows)}")
    found = mismatches(rows[args.row])
    for line in found:
        print(f"{args.row}: {line}")
    if not found:
        print(f"{args.row}: Python and packages are the versions the README lists")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
