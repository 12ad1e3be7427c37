"""Renormalised TracIn (`influence(..., normalize=True)`) and the representation baseline do
not reward gradient or feature norm."""

import jax.numpy as jnp
import numpy as np
import pytest

import tracin_jax
from tracin_jax.interpret import features


def _data(weights):
  rng = np.random.default_rng(0)
  train = {"x": rng.normal(size=(8, 5)).astype(np.float32),
           "y": rng.normal(size=8).astype(np.float32),
           "weight": np.asarray(weights, np.float32)}
  test = {"x": rng.normal(size=(3, 5)).astype(np.float32),
          "y": rng.normal(size=3).astype(np.float32), "weight": np.ones(3, np.float32)}
  return train, test


def _loss(params, example):  # a weighted squared error of a linear model, K = 1
  pred = jnp.dot(params["w"], example["x"]) + params["b"]
  return example["weight"] * (pred - example["y"]) ** 2


CHECKPOINTS = [({"w": jnp.linspace(-1, 1, 5), "b": jnp.float32(0.3)}, 0.1),
               ({"w": jnp.linspace(0.5, -0.5, 5), "b": jnp.float32(-0.2)}, 0.05)]


def test_renormalised_scores_do_not_change_when_a_training_loss_is_scaled():
  scaled = np.ones(8)
  scaled[3] = 25.0
  plain = {}
  for name, w in (("one", np.ones(8)), ("scaled", scaled)):
    train, test = _data(w)
    plain[name] = tracin_jax.influence(_loss, CHECKPOINTS, train, test)
    renormalised = tracin_jax.influence(_loss, CHECKPOINTS, train, test, normalize=True)
    if name == "one":
      reference = renormalised
  # Plain TracIn scales example 3's column by 25 (so it becomes everyone's top proponent or
  # opponent); renormalised TracIn does not see the scale.
  np.testing.assert_allclose(plain["scaled"][:, :, 3], 25 * plain["one"][:, :, 3], rtol=1e-4)
  np.testing.assert_allclose(renormalised, reference, rtol=1e-5, atol=1e-7)
  # With one checkpoint a renormalised score is eta times a cosine.
  train, test = _data(scaled)
  one = tracin_jax.influence(_loss, CHECKPOINTS[:1], train, test, normalize=True)
  assert np.all(np.abs(one) <= 0.1 + 1e-6)


def test_region_cosine_is_scale_free_and_nan_where_absent():
  rng = np.random.default_rng(0)
  f_test, f_train = rng.normal(size=(2, 3, 4)), rng.normal(size=(5, 3, 4))
  f_train[1, 2] = np.nan  # an empty region
  f_train[4, 0] = 0.0  # a region whose features are all 0
  cos = features.region_cosine(f_test, f_train)
  assert cos.shape == (2, 3, 5, 3)
  a, i, b, j = 1, 2, 3, 1
  expected = f_test[a, i] @ f_train[b, j] / (np.linalg.norm(f_test[a, i])
                                              * np.linalg.norm(f_train[b, j]))
  assert cos[a, i, b, j] == pytest.approx(expected)
  assert np.all(np.isnan(cos[:, :, 1, 2])) and np.all(cos[:, :, 4, 0] == 0)
  scaled = f_train.copy()
  scaled[3] *= 40.0
  np.testing.assert_allclose(features.region_cosine(f_test, scaled), cos, equal_nan=True)
