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

import importlib

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

import qkeras
from qkeras import quantizers

# Not in tf_keras's public API, but what bnfold needs to check a model file
# before loading it: Keras's safe mode (refuses Lambda bytecode in every format,
# not only in .keras files) and the schema of a SavedModel's keras_metadata.pb.
from tf_keras.protobuf import saved_metadata_pb2
from tf_keras.src.saving.serialization_lib import SafeModeScope

__all__ = ["SafeModeScope", "keras", "qkeras", "quantizers", "saved_metadata_pb2", "tf"]
