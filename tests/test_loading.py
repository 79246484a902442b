from __future__ import annotations

import h5py
import pytest

import bnfold
from bnfold.errors import ModelFileError


def test_missing_path(tmp_path):
    with pytest.raises(ModelFileError, match=r"must exist.*nothing.h5"):
        bnfold.load_model(tmp_path / "nothing.h5")


def test_directory_that_is_not_a_savedmodel(tmp_path):
    with pytest.raises(ModelFileError, match=r"SavedModel.*directory"):
        bnfold.load_model(tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.h5"
    path.touch()
    with pytest.raises(ModelFileError, match=r"empty.h5.*is empty"):
        bnfold.load_model(path)


def test_unknown_suffix(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\0" * 8)
    with pytest.raises(ModelFileError, match=r"\.h5.*model\.onnx"):
        bnfold.load_model(path)


def test_file_that_is_not_hdf5(tmp_path):
    path = tmp_path / "text.h5"
    path.write_text("not a model")
    with pytest.raises(ModelFileError, match=r"Cannot read .*text.h5"):
        bnfold.load_model(path)


def test_hdf5_file_without_a_model(tmp_path):
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as file:
        file["x"] = [1, 2, 3]
    with pytest.raises(ModelFileError, match=r"Cannot read .*data.h5"):
        bnfold.load_model(path)
