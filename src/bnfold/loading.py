"""Reading Keras models that hold QKeras and bnfold layers, from files that may be damaged.

A damaged HDF5 file can make the HDF5 library loop forever or crash the
interpreter (measured with h5py 3.14: a zeroed block inside a weights group
makes reading its ``weight_names`` attribute spin). Such a failure cannot be
caught in-process, so before Keras opens an HDF5 file (or the weights inside a
.keras archive) a child process reads every attribute and dataset of it, under
a time limit. What the child survives, Keras survives: the reads are the same.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from bnfold.errors import ModelFileError
from bnfold.keras import keras, qkeras
from bnfold.layers import QDenseBatchnorm

_SUFFIXES = (".h5", ".hdf5", ".keras")
# Keras quotes whole layer configs in its errors; an error line stays readable.
_MAX_REASON = 300
# The time the probe may take on a sound file: interpreter start, then reading at
# well over 50 MB/s.
PROBE_SECONDS = 20.0
_PROBE_BYTES_PER_SECOND = 50e6

# Run with ``python -c``: it needs only h5py, and prints one JSON line.
_PROBE = """
import io, json, sys, zipfile
try:
    import h5py
except ImportError as error:
    print(json.dumps({"unavailable": str(error)}))
    sys.exit()

def read_everything(file):
    def read(name, item):
        for key in item.attrs:
            item.attrs[key]
        if isinstance(item, h5py.Dataset):
            item[()]
    read("/", file)
    file.visititems(read)
    return "model_config" in file.attrs

try:
    path = sys.argv[1]
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith(".h5"):
                    with h5py.File(io.BytesIO(archive.read(name)), "r") as file:
                        read_everything(file)
        result = {"model_config": None}
    else:
        with h5py.File(path, "r") as file:
            result = {"model_config": read_everything(file)}
except Exception as error:
    result = {"error": str(error) or type(error).__name__}
print(json.dumps(result))
"""


def custom_objects() -> dict[str, Any]:
    """Every class a QKeras or bnfold model file may name."""
    objects: dict[str, Any] = {}
    qkeras.utils._add_supported_quantized_objects(objects)
    objects["QDenseBatchnorm"] = QDenseBatchnorm
    return objects


def _first_line(text: str) -> str:
    """The first non-blank line of ``text``, cut to ``_MAX_REASON`` characters."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= _MAX_REASON else f"{line[: _MAX_REASON - 3]}..."


def _probe_failure(path: Path, reason: str) -> ModelFileError:
    return ModelFileError(
        "A model file must be readable by the HDF5 library. Received: "
        f"{str(path)!r}, which {reason}; the file is probably damaged"
    )


def _probe(path: Path) -> bool | None:
    """Read all of the HDF5 data in ``path`` in a child process; say if it holds a model config.

    Returns:
        Whether an HDF5 file has a ``model_config``; None for a .keras archive,
        or when no child interpreter is available to probe with.

    Raises:
        ModelFileError: h5py refused the file, or crashed or hung reading it.
    """
    if not sys.executable:
        return None
    timeout = PROBE_SECONDS + path.stat().st_size / _PROBE_BYTES_PER_SECOND
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, str(path)],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as error:
        raise _probe_failure(path, f"made it hang (no result within {timeout:.0f} s)") from error
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = str(-done.returncode)
        raise _probe_failure(path, f"made it crash ({name})")
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        reason = _first_line(done.stderr) or f"exit status {done.returncode}"
        raise _probe_failure(path, f"made the reading process fail ({reason})") from None
    if "unavailable" in result:
        return None
    if "error" in result:
        raise _h5py_error(path, _first_line(result["error"]))
    return result["model_config"]


def _h5py_error(path: Path, message: str) -> ModelFileError:
    """A clear error from h5py's message for a file it refused to open."""
    truncated = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", message)
    if truncated:
        return ModelFileError(
            f"A model file must be complete. Received: {str(path)!r} is truncated "
            f"({truncated[1]} of its {truncated[2]} bytes)"
        )
    if "file signature not found" in message:
        return ModelFileError(
            "A model file must be an HDF5 file or a .keras zip archive. Received: "
            f"{str(path)!r} is neither, or is too damaged to tell"
        )
    return ModelFileError(
        f"A model file must be readable by the HDF5 library. Received: {str(path)!r}: {message}; "
        "the file is probably damaged or truncated"
    )


def _keras_error(path: Path, error: Exception) -> ModelFileError:
    """A clear error from what Keras raised while rebuilding the model."""
    message = _first_line(str(error))
    unknown = re.match(r"Unknown (\w+): '?([\w.]+)'?", message)
    if unknown:
        return ModelFileError(
            "A model file may use only Keras, QKeras and bnfold classes (for a model with "
            "custom layers, load it with their code and pass the model itself). Received: "
            f"{str(path)!r} uses unknown {unknown[1]} class {unknown[2]!r}"
        )
    return ModelFileError(
        f"A model file must hold a Keras model that Keras can rebuild. Received: {str(path)!r}: "
        f"{type(error).__name__}: {message}"
    )


def load_model(path: str | os.PathLike[str]) -> keras.Model:
    """Load a Keras model saved as .h5, .keras or a SavedModel directory.

    Args:
        path: the model file, or a SavedModel directory.

    Returns:
        The model, uncompiled, with QKeras layers and bnfold's QDenseBatchnorm known.

    Raises:
        ModelFileError: the path is missing, or is not a model Keras can read; the
            message names the file and says why. A file that makes the HDF5
            library crash or hang gives this error too (see the module docstring).
    """
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"The model file must exist. Received: {str(path)!r} does not exist")
    if path.is_dir() and not (path / "saved_model.pb").is_file():
        raise ModelFileError(
            "A model directory must be a SavedModel (holding saved_model.pb). "
            f"Received: directory {str(path)!r}"
        )
    if path.is_file() and path.suffix.lower() not in _SUFFIXES:
        raise ModelFileError(
            f"A model file must end in {', '.join(_SUFFIXES)}, or be a SavedModel directory. "
            f"Received: {str(path)!r}"
        )
    if path.is_file() and path.stat().st_size == 0:
        raise ModelFileError(f"The model file must not be empty. Received: {str(path)!r} is empty")
    if path.is_file() and _probe(path) is False:
        raise ModelFileError(
            "An HDF5 model file must hold a whole Keras model (saved with model.save). "
            f"Received: {str(path)!r} has no model config (weights only, or other data)"
        )
    try:
        model = keras.models.load_model(path, custom_objects=custom_objects(), compile=False)
    except Exception as error:  # Keras and h5py raise many types for unreadable files.
        raise _keras_error(path, error) from error
    if not isinstance(model, keras.Model):
        raise ModelFileError(
            f"The file must hold a Keras model. Received: {str(path)!r} holds "
            f"{type(model).__name__}"
        )
    return model
