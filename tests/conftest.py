"""Shared fixtures: the real default model (pulled once) and tiny random HF models."""
from __future__ import annotations

from pathlib import Path

import pytest

from ember.loading.registry import pull

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """Path to SmolLM2-135M-Instruct's GGUF, fetched into the ember cache on first use."""
    return pull(progress=False)
