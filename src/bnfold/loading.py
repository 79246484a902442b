"""Reading Keras models that hold QKeras and bnfold layers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bnfold.errors import ModelFileError
from bnfold.keras import keras, qkeras
from bnfold.layers import QDenseBatchnorm

_SUFFIXES = (".h5", ".hdf5", ".keras")


def custom_objects() -> dict[str, Any]:
    """Every class a QKeras or bnfold model file may name."""
    objects: dict[str, Any] = {}
    qkeras.utils._add_supported_quantized_objects(objects)
    objects["QDenseBatchnorm"] = QDenseBatchnorm
    return objects


def load_model(path: str | os.PathLike[str]) -> keras.Model:
    """Load a Keras model saved as .h5, .keras or a SavedModel directory.

    Args:
        path: the model file, or a SavedModel directory.

    Returns:
        The model, uncompiled, with QKeras layers and bnfold's QDenseBatchnorm known.

    Raises:
        ModelFileError: the path is missing, or is not a model Keras can read; the
            message names the file and says why.
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
    try:
        model = keras.models.load_model(path, custom_objects=custom_objects(), compile=False)
    except Exception as error:  # Keras and h5py raise many types for unreadable files.
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelFileError(f"Cannot read {str(path)!r} as a Keras model: {reason}") from error
    if not isinstance(model, keras.Model):
        raise ModelFileError(
            f"The file must hold a Keras model. Received: {str(path)!r} holds "
            f"{type(model).__name__}"
        )
    return model
