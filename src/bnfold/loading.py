"""Reading Keras models that hold QKeras and bnfold layers, from damaged or hostile files.

Nothing a model file carries runs: bnfold reads the configuration itself (the
HDF5 ``model_config`` attribute, a .keras archive's config.json, a SavedModel's
keras_metadata.pb) and checks it (``bnfold.config_check``) before Keras builds
anything, and Keras then loads in its safe mode with the working directory off
the import path.

A damaged HDF5 file can make the HDF5 library loop forever or crash the
interpreter (measured with h5py 3.14: a zeroed block inside a weights group
makes reading its ``weight_names`` attribute spin). Such a failure cannot be
caught in-process, so before Keras opens an HDF5 file (or the weights inside a
.keras archive) a child process reads every attribute and dataset of it, under
a time limit. What the child survives, Keras survives: the reads are the same.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bnfold.config_check import check_model_config
from bnfold.errors import ModelFileError
from bnfold.keras import SafeModeScope, keras, qkeras, saved_metadata_pb2
from bnfold.layers import QDenseBatchnorm

_SUFFIXES = (".h5", ".hdf5", ".keras")
# tf_keras 2.21 has InputLayer(optional=...) and saves it; 2.16 and TensorFlow 2.15's Keras do not.
INPUT_LAYER_HAS_OPTIONAL = "optional" in inspect.signature(keras.layers.InputLayer).parameters
# Keras quotes whole layer configs in its errors; an error line stays readable.
_MAX_REASON = 300
# The time the probe may take on a sound file: interpreter start, then reading at
# well over 50 MB/s.
PROBE_SECONDS = 20.0
_PROBE_BYTES_PER_SECOND = 50e6
_ARCHIVE_CONFIG = "config.json"
_SAVED_MODEL_METADATA = "keras_metadata.pb"
# Far above any real model's configuration (a few hundred kB for 1000 layers).
_MAX_CONFIG_BYTES = 64 << 20

# Run with ``python -c``: it needs only h5py, and prints one JSON line.
_PROBE = """
import io, json, sys, zipfile
try:
    import h5py
except ImportError as error:
    print(json.dumps({"unavailable": str(error)}))
    sys.exit()

def read_everything(file, non_numeric):
    def read(name, item):
        for key in item.attrs:
            item.attrs[key]
        if isinstance(item, h5py.Dataset):
            item[()]
            if item.dtype.kind not in "fiu":
                non_numeric.append([name, str(item.dtype)])
    read("/", file)
    file.visititems(read)
    config = file.attrs.get("model_config")
    return config.decode() if isinstance(config, bytes) else config

try:
    path = sys.argv[1]
    result = {"model_config": None, "non_numeric": []}
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith(".h5"):
                    with h5py.File(io.BytesIO(archive.read(name)), "r") as file:
                        read_everything(file, result["non_numeric"])
    else:
        with h5py.File(path, "r") as file:
            result["model_config"] = read_everything(file, result["non_numeric"])
except Exception as error:
    result = {"error": str(error) or type(error).__name__}
print(json.dumps(result))
"""


class InputLayer(keras.layers.InputLayer):
    """An InputLayer that reads the ``optional=False`` newer tf_keras writes into every file.

    Newer tf_keras releases save ``optional`` in each InputLayer's config; older
    ones (TensorFlow 2.15's Keras among them) have no such argument and refuse
    such a file.
    False is what every Keras 2 input is; True is left for Keras to refuse. The
    class keeps Keras's name, so a model saved again names ``InputLayer``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("optional", None) is False:
            del kwargs["optional"]
        super().__init__(*args, **kwargs)


def custom_objects() -> dict[str, Any]:
    """Every class a QKeras or bnfold model file may name."""
    objects: dict[str, Any] = {}
    qkeras.utils._add_supported_quantized_objects(objects)
    objects["QDenseBatchnorm"] = QDenseBatchnorm
    if not INPUT_LAYER_HAS_OPTIONAL:
        objects["InputLayer"] = InputLayer
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


def _probe(path: Path) -> dict[str, Any] | None:
    """Read all of the HDF5 data in ``path`` in a child process.

    Returns:
        ``model_config``: the HDF5 file's model configuration (JSON text), None for
        a .keras archive or a file without one; ``non_numeric``: ``[dataset,
        dtype]`` pairs of datasets that hold no numbers. None when no child
        interpreter is available to probe with.

    Raises:
        ModelFileError: h5py refused the file, or crashed or hung reading it.
    """
    if not sys.executable:
        return None
    timeout = PROBE_SECONDS + path.stat().st_size / _PROBE_BYTES_PER_SECOND
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-c", _PROBE, str(path)],
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
    return result


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


def _parse_json(text: str | bytes, path: Path, what: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:
        raise ModelFileError(
            f"A model file's {what} must be JSON that Python can read. Received: "
            f"{str(path)!r}: {_first_line(str(error)) or type(error).__name__}"
        ) from None


def _archive_config(path: Path) -> Any:
    """The configuration of a .keras archive (its config.json), read without Keras."""
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(_ARCHIVE_CONFIG)
            if info.file_size > _MAX_CONFIG_BYTES:
                raise ModelFileError(
                    f"A model configuration must be at most {_MAX_CONFIG_BYTES} bytes. Received: "
                    f"{str(path)!r} whose {_ARCHIVE_CONFIG} has {info.file_size}"
                )
            text = archive.read(info)
    except KeyError:
        raise ModelFileError(
            f"A .keras archive must hold {_ARCHIVE_CONFIG}. Received: {str(path)!r} without it"
        ) from None
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise ModelFileError(
            f"A .keras file must be a readable zip archive. Received: {str(path)!r}: {error}"
        ) from None
    return _parse_json(text, path, "configuration")


def _saved_model_configs(path: Path) -> list[Any]:
    """The layer configurations in a SavedModel's keras_metadata.pb, read without loading it."""
    metadata_file = path / _SAVED_MODEL_METADATA
    if not metadata_file.is_file():
        raise ModelFileError(
            f"A SavedModel must hold the {_SAVED_MODEL_METADATA} that Keras writes, so that bnfold "
            "can check its layers before loading (if you trust the directory, load it with "
            f"safe=False or --unsafe-load). Received: {str(path)!r} without it"
        )
    metadata = saved_metadata_pb2.SavedMetadata()
    try:
        metadata.ParseFromString(metadata_file.read_bytes())
    except Exception as error:  # protobuf's DecodeError, or OSError
        raise ModelFileError(
            f"A SavedModel's {_SAVED_MODEL_METADATA} must be readable. Received: {str(path)!r}: "
            f"{_first_line(str(error)) or type(error).__name__}"
        ) from None
    configs = []
    for node in metadata.nodes:
        if node.identifier != "_tf_keras_metric":
            config = _parse_json(node.metadata, path, f"{_SAVED_MODEL_METADATA} entry")
            # A model's entry repeats its whole configuration under "model_config".
            whole = config.pop("model_config", None) if isinstance(config, dict) else None
            configs += [config] + ([whole] if whole is not None else [])
    return configs


def _check_before_loading(path: Path, *, safe: bool, max_memory: int | None) -> None:
    """Read the file's configuration and weights' types, and refuse what must not load."""
    configs: list[Any]
    probed = _probe(path) if path.is_file() else None
    if path.is_dir():
        # Unsafe loading accepts a SavedModel without Keras metadata, unchecked.
        checkable = safe or (path / _SAVED_MODEL_METADATA).is_file()
        configs = _saved_model_configs(path) if checkable else []
    elif zipfile.is_zipfile(path):
        configs = [_archive_config(path)]
    else:
        if probed is None:
            import h5py  # no child interpreter: read the configuration here

            with h5py.File(path, "r") as file:
                probed = {"model_config": file.attrs.get("model_config"), "non_numeric": []}
        if probed["model_config"] is None:
            raise ModelFileError(
                "An HDF5 model file must hold a whole Keras model (saved with model.save). "
                f"Received: {str(path)!r} has no model config (weights only, or other data)"
            )
        configs = [_parse_json(probed["model_config"], path, "model_config")]
    for dataset, dtype in (probed or {}).get("non_numeric", []):
        raise ModelFileError(
            "A model file's weights must be numbers. Received: "
            f"{str(path)!r} whose dataset {dataset!r} holds {dtype}"
        )
    for config in configs:
        check_model_config(config, path, safe=safe, max_memory=max_memory)


@contextlib.contextmanager
def _without_working_directory_on_import_path() -> Iterator[None]:
    """Keep modules in the working directory from being imported while a file loads.

    ``python -m`` and ``python -c`` put the working directory first on
    ``sys.path``; a module name in a model file would then import a file there.
    """
    saved = list(sys.path)
    here = os.getcwd()
    sys.path[:] = [entry for entry in sys.path if entry not in ("", ".", here)]
    try:
        yield
    finally:
        sys.path[:] = saved


def load_model(
    path: str | os.PathLike[str], *, safe: bool = True, max_memory: int | None = None
) -> keras.Model:
    """Load a Keras model saved as .h5, .keras or a SavedModel directory.

    By default no code stored in the file runs: before Keras reads anything,
    bnfold reads the configuration itself and refuses Lambda layers, functions,
    modules outside Keras, tf_keras, QKeras and bnfold, and unknown classes;
    then Keras loads in its safe mode, with the working directory off the
    import path.

    Args:
        path: the model file, or a SavedModel directory.
        safe: False loads a file you trust even if it holds code (Lambda layers
            run their stored bytecode). Quantizers and limits are checked either way.
        max_memory: the bytes an export of the model may need, estimated from the
            declared shapes before anything is built; None: the machine's memory.

    Returns:
        The model, uncompiled, with QKeras layers and bnfold's QDenseBatchnorm known.

    Raises:
        UnsafeModelError: the file holds code, and ``safe`` is True.
        ModelTooLargeError: too many layers, nested too deep, or over ``max_memory``.
        QuantizerError: a quantizer in the file that bnfold's parser refuses.
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
    _check_before_loading(path, safe=safe, max_memory=max_memory)
    try:
        with _without_working_directory_on_import_path(), SafeModeScope(safe):
            model = keras.models.load_model(
                path, custom_objects=custom_objects(), compile=False, safe_mode=safe
            )
    except Exception as error:  # Keras and h5py raise many types for unreadable files.
        raise _keras_error(path, error) from error
    if not isinstance(model, keras.Model):
        raise ModelFileError(
            f"The file must hold a Keras model. Received: {str(path)!r} holds "
            f"{type(model).__name__}"
        )
    return model
