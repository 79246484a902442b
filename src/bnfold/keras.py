"""The single door to TensorFlow, Keras 2 and QKeras.

QKeras is written for Keras 2. TensorFlow 2.16 and later resolve ``tf.keras``
to Keras 3 unless ``TF_USE_LEGACY_KERAS=1`` is set when ``tf.keras`` is first
touched; ``bnfold/__init__.py``, which runs before this module, sets it. Every
other bnfold module takes TensorFlow, Keras and QKeras from here.

Whether that worked is decided by ``tf.keras``'s classes, never by its module
name: once QKeras has imported ``tensorflow.keras``, ``tf.keras.__name__`` reads
``tensorflow.keras`` whichever Keras is behind it. Any import order works as long
as TensorFlow was not imported before the variable was set.

TensorFlow 2.15 and earlier have Keras 2 built in, and there bnfold's ``keras``
is ``tf.keras`` itself, whichever Keras 2 that is: TensorFlow 2.15 reads the
variable too, and with it (QKeras's tensorflow-model-optimization 0.8 installs
tf_keras and sets it on import) ``tf.keras`` is tf_keras 2.15, without it the
built-in keras 2.15; QKeras uses the same.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import sys
from collections.abc import Iterator
from typing import Any

import tensorflow as tf

# TensorFlow resolves tf.keras twice: the attribute when it is first touched, and
# `import tensorflow.keras` (QKeras's way in) from a path fixed when TensorFlow itself was
# imported. From 2.16 on both must give tf_keras's classes.
if tuple(int(part) for part in tf.__version__.split(".")[:2]) < (2, 16):
    keras = tf.keras  # Keras 2 built in: see the module docstring.
elif not all(
    keras_module.Model.__module__.startswith("tf_keras.")
    for keras_module in (tf.keras, importlib.import_module("tensorflow.keras"))
):
    raise ImportError(
        "bnfold needs TensorFlow's legacy Keras 2 (tf_keras) behind tf.keras, because QKeras "
        "does not work with Keras 3. TensorFlow was imported without TF_USE_LEGACY_KERAS=1 "
        "before bnfold, so tf.keras is Keras 3 (its Model class comes from "
        f"{importlib.import_module('tensorflow.keras').Model.__module__!r}). Set "
        "TF_USE_LEGACY_KERAS=1 in the environment before starting Python (QKeras needs it "
        "too), or import bnfold before TensorFlow and QKeras."
    )
else:
    import tf_keras as keras


# Not in tf_keras's public API, but what bnfold needs to check a model file
# before loading it: Keras's safe mode (refuses Lambda bytecode in every format,
# not only in .keras files) and the schema of a SavedModel's keras_metadata.pb.
from tf_keras.protobuf import saved_metadata_pb2
from tf_keras.src.saving.serialization_lib import SafeModeScope


class _Keras3Refused:
    """An import finder that refuses the ``keras`` package (Keras 3) and its modules."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "keras" or name.startswith("keras."):
            raise ImportError(f"bnfold: {name} is not imported while QKeras starts")


def _installed_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return ""


@contextlib.contextmanager
def _without_keras3() -> Iterator[None]:
    """Refuse ``import keras`` while QKeras is imported, unless Keras 3 is already loaded.

    QKeras imports tensorflow-model-optimization, whose prune registry tries
    ``from keras.src.engine import base_layer``: Keras 3 has no such module, so the
    attempt always ends in the ImportError it catches, but only after importing
    Keras 3, scikit-learn and IPython (measured: 1.5 to 1.8 s of a 6.6 s start).
    Refused at once, it ends the same way. Nothing else changes: afterwards
    ``import keras`` works as usual. Where ``keras`` is Keras 2 (TensorFlow 2.15)
    the import succeeds, so it is left alone.
    """
    if "keras" in sys.modules or not _installed_version("keras").startswith("3."):
        yield
        return
    refusal = _Keras3Refused()
    sys.meta_path.insert(0, refusal)
    try:
        yield
    finally:
        sys.meta_path.remove(refusal)


with _without_keras3():
    import qkeras
    from qkeras import quantizers

__all__ = ["SafeModeScope", "keras", "qkeras", "quantizers", "saved_metadata_pb2", "tf"]
