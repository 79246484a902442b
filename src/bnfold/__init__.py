"""bnfold: unfold QKeras batchnorm-folded layers and export them for hardware flows.

The first three functions keep the names and signatures of
``qkeras.bn_folding_utils``, so existing code switches by changing one import.

Names are loaded on first use, so that ``import bnfold`` and command-line
``--help`` stay fast; TensorFlow is imported, through ``bnfold.keras``, by the
first name that needs it.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# The one environment change bnfold makes. QKeras needs Keras 2, and TensorFlow 2.16
# and later put Keras 3 behind tf.keras unless this is set when tf.keras is first
# touched. Set on import, not with the first name: scripts write `import bnfold` and
# then `import qkeras` (which touches tf.keras) before they use any bnfold name.
os.environ["TF_USE_LEGACY_KERAS"] = "1"

__version__ = "0.1.0"

_PUBLIC = {
    "convert_folded_layer_to_unfolded": "bnfold.folding",
    "populate_bias_quantizer_from_accumulator": "bnfold.accumulator",
    "unfold_model": "bnfold.unfold",
    "accumulator_types": "bnfold.accumulator",
    "load_model": "bnfold.loading",
    "FixedPoint": "bnfold.fixedpoint",
    "export_onnx": "bnfold.export.pipeline",
    "hls4ml_config": "bnfold.hls4ml",
    "use_in_qkeras": "bnfold.drop_in",
}
_SUBMODULES = ("layers",)

__all__ = ["__version__", *_PUBLIC, *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"bnfold.{name}")
    raise AttributeError(f"module 'bnfold' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
