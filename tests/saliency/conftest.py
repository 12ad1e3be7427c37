"""Fixtures for the saliency tests (the tiny models live in saliency_models.py)."""

import jax
import pytest


@pytest.fixture
def x64():
  """Float64 on CPU for tight comparisons."""
  with jax.enable_x64(True):
    yield
