"""The ONNX exporter; the pipeline is ``bnfold.export.pipeline.export_onnx``.

Names load on first use, so that ``python -m bnfold.export --help`` answers
without starting TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["STAGES", "export_onnx"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("bnfold.export.pipeline"), name)
    raise AttributeError(f"module 'bnfold.export' has no attribute {name!r}")
