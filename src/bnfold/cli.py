"""What bnfold's command-line tools share: a quiet TensorFlow start, one-line errors and warnings.

A failed command prints one line, ``error: ...``, naming what is wrong and with
which file or layer, whatever the exception; the traceback only with
``--debug``. bnfold's warnings print as ``warning: ...`` lines. Nothing here
imports TensorFlow.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from bnfold.errors import BnfoldError, BnfoldWarning, OutputPathError

EXIT_FAILED = 1


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null, for C++ logs that no setting turns off."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def import_tensorflow_quietly(debug: bool = False) -> None:
    """Import TensorFlow (through bnfold.keras) without its start-up chatter on the terminal.

    TensorFlow 2.21 logs through absl before its log level is read, so the only
    way to keep a command's output readable is to hide stderr while it starts.
    With ``debug`` nothing is hidden.
    """
    if debug:
        import bnfold.keras  # noqa: F401

        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore", message=".*(HDF5 file|constraints.serialize|legacy).*")
    with _stderr_silenced():
        from bnfold.keras import tf
    tf.get_logger().setLevel("ERROR")
    # tf2onnx warns through logging (about opsets, say), which would add lines to an error.
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def memory_size(text: str) -> int:
    """A byte count from ``--max-memory``: ``4G``, ``512M``, ``4GB`` or plain bytes."""
    number = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = number[-1:] if number[-1:] in _SIZE_UNITS else ""
    try:
        value = float(number.removesuffix(unit)) * _SIZE_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a memory size must be a number of bytes, optionally with K, M, G or T. "
            f"Received: {text!r}"
        ) from None
    if not 0 < value < float(1 << 62):
        raise argparse.ArgumentTypeError(f"a memory size must be positive. Received: {text!r}")
    return int(value)


def add_loading_options(parser: argparse.ArgumentParser) -> None:
    """The options that decide which model files a command loads (both commands have them)."""
    parser.add_argument(
        "--unsafe-load",
        action="store_true",
        help="load a model file you trust even if it holds code (Lambda layers, custom "
        "modules): that code runs. Without it, such a file is refused",
    )
    parser.add_argument(
        "--max-memory",
        type=memory_size,
        metavar="SIZE",
        help="refuse a model whose declared shapes need more memory, e.g. 4G (default: "
        "the machine's physical memory)",
    )


def one_line(text: str) -> str:
    """``text`` with its lines joined, for messages that must stay on one terminal line."""
    return " ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())


def failure_message(error: BaseException, *, model: Path | None = None, debug: bool = False) -> str:
    """``error`` as one line, led by the model path unless the message names it.

    The path is left out of an error about an output path (which the message
    names). An error that is neither a ``BnfoldError`` nor an ``OSError`` is a
    bug, and an ``ExportError`` with a ``stage`` an unforeseen failure inside a
    stage: for those the line also says how to see the traceback.
    """
    message = one_line(str(error)) or type(error).__name__
    if not isinstance(error, BnfoldError | OSError):
        message = f"unexpected {type(error).__name__}: {message}"
    unforeseen = not isinstance(error, BnfoldError | OSError) or getattr(error, "stage", None)
    if unforeseen and not debug:
        message += "; rerun with --debug for the traceback"
    if model is not None and str(model) not in message and not isinstance(error, OutputPathError):
        message = f"{model}: {message}"
    return message


def report_failure(error: BaseException, *, model: Path | None = None, debug: bool = False) -> int:
    """Print ``error`` as one ``error: ...`` line on stderr (after its traceback with ``debug``).

    Returns:
        The exit status of a failed command.
    """
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    print(f"error: {failure_message(error, model=model, debug=debug)}", file=sys.stderr, flush=True)
    return EXIT_FAILED


def _show_bnfold_warnings_as_lines(original: Any) -> Any:
    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        if issubclass(category, BnfoldWarning):
            print(f"warning: {one_line(str(message))}", file=file or sys.stderr, flush=True)
        else:
            original(message, category, filename, lineno, file, line)

    return show


@contextlib.contextmanager
def warnings_as_lines() -> Iterator[None]:
    """Print each bnfold warning as one ``warning: ...`` line on stderr, every time it occurs.

    Other warnings keep Python's format and filters. Usable as a decorator.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("always", BnfoldWarning)
        warnings.showwarning = _show_bnfold_warnings_as_lines(warnings.showwarning)
        yield
