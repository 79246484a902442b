"""The single door to TensorFlow, tf_keras and QKeras.

QKeras is written for Keras 2. TensorFlow 2.16 and later resolve ``tf.keras``
to Keras 3 unless ``TF_USE_LEGACY_KERAS=1`` is set when ``tf.keras`` is first
touched, so this module sets it before importing TensorFlow. Every other bnfold
module takes TensorFlow, Keras and QKeras from here.
"""

from __future__ import annotations

import os

# The one environment change bnfold makes; see the module docstring.
os.environ["TF_USE_LEGACY_KERAS"] = "1"

import tensorflow as tf

if not tf.keras.__name__.startswith("tf_keras"):
    raise ImportError(
        "bnfold needs TensorFlow's legacy Keras 2 (tf_keras) behind tf.keras, because QKeras "
        "does not work with Keras 3. TensorFlow was imported and tf.keras resolved to "
        f"{tf.keras.__name__!r} before bnfold was imported. Import bnfold first, or set "
        "TF_USE_LEGACY_KERAS=1 in the environment before starting Python."
    )

import qkeras
import tf_keras as keras
from qkeras import quantizers

# Not in tf_keras's public API, but what bnfold needs to check a model file
# before loading it: Keras's safe mode (refuses Lambda bytecode in every format,
# not only in .keras files) and the schema of a SavedModel's keras_metadata.pb.
from tf_keras.protobuf import saved_metadata_pb2
from tf_keras.src.saving.serialization_lib import SafeModeScope

__all__ = ["SafeModeScope", "keras", "qkeras", "quantizers", "saved_metadata_pb2", "tf"]
