"""Shared fixtures: folded models are built once per session (TensorFlow is slow to start)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The golden files' records are shared with scripts/make_golden.py.
sys.path.append(str(Path(__file__).resolve().parent.parent / "scripts"))

import builders


@pytest.fixture(scope="session")
def folded_models():
    return {name: build() for name, build in builders.BUILDERS.items()}
