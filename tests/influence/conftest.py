"""Fixtures for the influence tests (the tiny models live in tiny_models.py)."""

import jax
import pytest


@pytest.fixture
def x64():
  """Float64 on CPU for tight comparisons with the plain loop."""
  with jax.enable_x64(True):
    yield
