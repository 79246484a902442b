"""Shared fixtures: folded models are built once per session (TensorFlow is slow to start)."""

from __future__ import annotations

import pytest

import builders


@pytest.fixture(scope="session")
def folded_models():
    return {name: build() for name, build in builders.BUILDERS.items()}
