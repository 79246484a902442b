"""What bnfold's command-line tools share: a quiet TensorFlow start."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator


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
