"""Writing output files so that a failure never leaves a partial or damaged file.

``check_output_path`` runs before any expensive work, so that a typo in an
output path costs nothing; ``atomic_output`` writes beside the target and
renames only a complete file over it; ``save_keras_model`` writes a model that
way. A write that fails (a full disk, say) is an ``OutputPathError`` naming
the file.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bnfold.errors import BnfoldError, OutputPathError


def _create_beside(path: Path) -> Path:
    """Create an empty hidden file next to ``path``, with ``path``'s suffix.

    The suffix is kept because writers such as ``onnx.save`` choose the format
    from it. Unlike ``tempfile.mkstemp`` (mode 0600), the file gets the mode the
    user's umask gives any new file, so the renamed output is readable as usual.
    """
    while True:
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(4)}{path.suffix}")
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return candidate


def _unwritable(path: Path, error: OSError, *, writing: bool = False) -> OutputPathError:
    reason = error.strerror or str(error) or type(error).__name__
    if writing:
        return OutputPathError(
            "An output file must be written in full (nothing was written). Received: "
            f"{str(path)!r}, where writing fails: {reason}"
        )
    return OutputPathError(
        "An output file must be in a directory bnfold can write to. Received: "
        f"{str(path)!r}, where creating a file fails: {reason}"
    )


def check_output_path(
    path: str | os.PathLike[str], *, source: str | os.PathLike[str] | None = None
) -> Path:
    """Fail now, naming the path, if ``path`` cannot be written later.

    Creates and removes an empty file beside ``path`` (the only test that also
    catches read-only file systems and access rules). An existing file at
    ``path`` is not touched.

    Args:
        path: the output file.
        source: the input model, which the output must not replace.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        OutputPathError: ``path`` is a directory or the input model, or its
            directory is missing, not a directory, or not writable.
    """
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise OutputPathError(
            f"An output path must name a file. Received: {str(path)!r} is a directory"
        )
    if source is not None and path.exists() and Path(source).exists() and path.samefile(source):
        raise OutputPathError(
            f"The output must not replace the input model. Received: {str(path)!r} is the model"
        )
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise OutputPathError(
            f"An output file's directory must exist. Received: {str(path)!r}, whose directory "
            f"{str(parent)!r} {what}"
        )
    try:
        _create_beside(path).unlink()
    except OSError as error:
        raise _unwritable(path, error) from error
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only if the block succeeds.

    An existing file at ``path`` is untouched until the new one is complete, and
    no temporary file outlives a failure.

    Raises:
        OutputPathError: the temporary file cannot be created, written (an
            ``OSError`` in the block, such as a full disk) or renamed to ``path``.
    """
    path = Path(path)
    try:
        temporary = _create_beside(path)
    except OSError as error:
        raise _unwritable(path, error) from error
    try:
        try:
            yield temporary
        except OSError as error:
            if isinstance(error, BnfoldError):
                raise
            raise _unwritable(path, error, writing=True) from error
        try:
            os.replace(temporary, path)
        except OSError as error:
            raise _unwritable(path, error) from error
    finally:
        temporary.unlink(missing_ok=True)


def save_keras_model(model: Any, path: str | os.PathLike[str]) -> None:
    """Save a Keras model atomically: .keras format for a .keras path, HDF5 otherwise.

    The HDF5 file is built in memory and written in one piece: h5py writing to a
    disk that fills up crashes the interpreter (measured with h5py 3.14:
    segmentation fault while closing the file), where a plain write raises.

    Raises:
        OutputPathError: as ``atomic_output``.
    """
    import h5py

    path = Path(path)
    with atomic_output(path) as temporary:
        if path.suffix.lower() == ".keras":
            model.save(temporary, save_format="keras")
        else:
            buffer = io.BytesIO()
            with h5py.File(buffer, "w") as file:
                model.save(file, save_format="h5")
            temporary.write_bytes(buffer.getvalue())
