"""TRAK against closed forms: linear least squares, exact leave-one-out, the LDS."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracin_jax.checks import lds as lds_lib
from tracin_jax.influence import core
from tracin_jax.influence import projection as projection_lib
from tracin_jax.influence import trak as trak_lib


# ---------------------------------------------------------------- linear least squares, K = 1
def output(params, example):
  """The linear model's output f = x . w (its gradient is x)."""
  return jnp.dot(example["x"], params["w"])


def squared_loss(params, example):
  """0.5 (x . w - y)^2."""
  return 0.5 * (output(params, example) - example["y"]) ** 2


def minus_output(params, example):
  """1 - f: the loss of a soft-Dice-like output f (its gradient is -x)."""
  return 1.0 - output(params, example)


def minus_residual(params, example):
  """TRAK's Q for f = x . w under the squared loss: -dL/df = -(x . w - y)."""
  return -(output(params, example) - example["y"])


N, D, N_TEST = 40, 6, 12  # one shape for every test here: compiled code is shared


def least_squares(seed, n=N, d=D, n_test=N_TEST):
  """An anisotropic regression, its least-squares fit and test points (float64 numpy)."""
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(d, d)) @ np.diag(np.geomspace(4, 0.1, d))
  x = rng.normal(size=(n, d)) @ mix
  y = x @ rng.normal(size=d) + rng.normal(size=n)
  w = np.linalg.lstsq(x, y, rcond=None)[0]
  x_test = rng.normal(size=(n_test, d)) @ mix
  return x, y, w, x_test


def as_data(x, y):
  return {"x": x, "y": y}


@jax.jit
def _exact_hessian_removal(x, y, w):
  data = as_data(x, y)
  total = lambda w_: jnp.sum(jax.vmap(lambda ex: squared_loss({"w": w_}, ex))(data))
  hessian = jax.hessian(total)(w)
  grads = jax.vmap(jax.grad(lambda w_, ex: squared_loss({"w": w_}, ex)), (None, 0))(w, data)
  return jnp.linalg.solve(hessian, grads.T).T


def exact_hessian_removal(x, y, w):
  """The influence function with the exact Hessian: the first-order change of the fitted
  weights when example i is removed, H^-1 grad loss_i, H = jax.hessian of the total loss;
  [n, d]."""
  return np.asarray(_exact_hessian_removal(jnp.asarray(x), jnp.asarray(y), jnp.asarray(w)))


def closed_form_removal(x, y, w):
  """(X^T X)^-1 x_i r_i, [n, d]."""
  return np.linalg.solve(x.T @ x, x.T).T * (x @ w - y)[:, None]


def test_the_exact_hessian_influence_is_the_closed_form_and_tracks_leave_one_out(x64):
  x, y, w, _ = least_squares(0)
  np.testing.assert_allclose(exact_hessian_removal(x, y, w), closed_form_removal(x, y, w),
                             rtol=1e-9, atol=1e-12)
  errors = []
  for n in (10, 40, 160):
    x, y, w, _ = least_squares(0, n)
    influence = closed_form_removal(x, y, w)
    leverage = np.einsum("nd,nd->n", x, np.linalg.solve(x.T @ x, x.T).T)
    loo = np.stack([np.linalg.lstsq(np.delete(x, i, 0), np.delete(y, i), rcond=None)[0] - w
                    for i in range(n)])
    # Exact leave-one-out divides the first-order change by 1 - h_ii.
    np.testing.assert_allclose(influence, loo * (1 - leverage)[:, None], rtol=1e-8, atol=1e-12)
    errors.append(np.max(np.linalg.norm(influence - loo, axis=1) / np.linalg.norm(loo, axis=1)))
    np.testing.assert_allclose(errors[-1], leverage.max(), rtol=1e-6)
  assert errors[0] > errors[1] > errors[2]  # leverage falls with n, and the error with it


def test_trak_with_one_model_and_no_projection_is_the_exact_hessian_influence(x64):
  x, y, w, x_test = least_squares(1)
  scores = trak_lib.trak_influence(output, [[{"w": jnp.asarray(w)}]], as_data(x, y),
                                   as_data(x_test, np.zeros(N_TEST)), damping=0.0,
                                   q_fn=minus_residual, vectorize="vmap")
  assert scores.shape == (N_TEST, 1, N, 1)
  # Including train example b changes the test output by minus its removal's change.
  removal = x_test @ exact_hessian_removal(x, y, w).T  # [n_test, n]
  np.testing.assert_allclose(scores[:, 0, :, 0], -removal, rtol=1e-8, atol=1e-12)


def test_the_two_forms_agree_and_solve_the_regularised_system(x64):
  x, y, w, x_test = least_squares(2)
  plain = x_test @ np.linalg.inv(x.T @ x + 0.5 * np.eye(D)) @ x.T
  by_form = [trak_lib.trak_influence(output, [[{"w": jnp.asarray(w)}]], as_data(x, y),
                                     as_data(x_test, np.zeros(N_TEST)), damping=0.5,
                                     form=form, vectorize="vmap")
             for form in ("features", "kernel", "auto")]
  np.testing.assert_allclose(by_form[0][:, 0, :, 0], plain, rtol=1e-9, atol=1e-12)
  assert np.abs(by_form[0]).max() > 1e-3
  np.testing.assert_allclose(by_form[1], by_form[0], rtol=1e-8, atol=1e-12)
  np.testing.assert_array_equal(by_form[2], by_form[0])  # d < n: the d x d system
  # More features than rows (the kernel form's case): both forms still agree.
  few = x[:4]
  plain = x_test @ np.linalg.inv(few.T @ few + 0.5 * np.eye(D)) @ few.T
  for form in ("kernel", "features"):
    np.testing.assert_allclose(trak_lib.kernel_scores(jnp.asarray(x_test), jnp.asarray(few),
                                                      0.5, form), plain, rtol=1e-9)


def test_a_loss_of_the_output_gives_the_outputs_scores(x64):
  """Features of loss = 1 - f are minus those of f on both sides: the signs cancel (the
  region losses' scores are the Dice's)."""
  x, y, w, x_test = least_squares(2)
  args = ([[{"w": jnp.asarray(w)}]], as_data(x, y), as_data(x_test, np.zeros(N_TEST)))
  np.testing.assert_allclose(
      trak_lib.trak_influence(minus_output, *args, damping=0.5, vectorize="vmap"),
      trak_lib.trak_influence(output, *args, damping=0.5, vectorize="vmap"), rtol=1e-12)


def test_seeded_ensembles_and_projections_are_reproducible_and_averaged(x64):
  x, y, w, x_test = least_squares(3)
  train, test = as_data(x, y), as_data(x_test, np.zeros(N_TEST))
  p0, p1, p2 = ({"w": jnp.asarray(w + shift)} for shift in (0.0, 0.1, -0.2))
  proj = projection_lib.Projection(4, "countsketch", seed=5)
  # Features x whatever w (compiled once for every test here); Q = -residual depends on w.
  run = lambda models, projection: trak_lib.trak_influence(
      output, models, train, test, q_fn=minus_residual, damping=0.1, projection=projection,
      vectorize="vmap")
  scores = run([[p0, p1], [p2]], proj)
  assert np.isfinite(scores).all() and np.abs(scores).max() > 1e-3
  np.testing.assert_array_equal(scores, run([[p0, p1], [p2]], proj))
  assert not np.allclose(scores, run([[p0, p1], [p2]], projection_lib.Projection(
      4, "countsketch", seed=6)))
  # Entry e (over models and their checkpoints) is projected with seed + 10000 e; a
  # model's checkpoints are averaged, then the models.
  single = [run([[p]], projection_lib.Projection(
      4, "countsketch", seed=5 + trak_lib.PROJECTION_SEED_STRIDE * e))
            for e, p in enumerate((p0, p1, p2))]
  np.testing.assert_allclose(scores, ((single[0] + single[1]) / 2 + single[2]) / 2, rtol=1e-10)


def test_exact_influence_beats_tracin_beats_random_by_the_lds(x64):
  x, y, w, x_test = least_squares(4)
  train, test = as_data(x, y), as_data(x_test, np.zeros(N_TEST))
  params = [[{"w": jnp.asarray(w)}]]
  exact = trak_lib.trak_influence(output, params, train, test, q_fn=minus_residual,
                                  vectorize="vmap")
  q = -(x @ w - y)
  tracin = core.influence(output, [(params[0][0], 1.0)], train, test, vectorize="vmap") * q[
      None, None, :, None]
  rand = np.random.default_rng(0).normal(size=exact.shape)
  masks = lds_lib.sample_subsets(len(x), 50, 0.5, seed=1)
  measured = np.stack([x_test @ np.linalg.lstsq(x[m], y[m], rcond=None)[0] for m in masks], 1)
  predicted = {name: lds_lib.predicted_outputs(s[:, 0, :, 0], masks)
               for name, s in (("exact", exact), ("tracin", tracin), ("random", rand))}
  score = {name: lds_lib.lds(p, measured, num_bootstrap=0)["mean"]
           for name, p in predicted.items()}
  assert score["exact"] > 0.8, score
  for better, worse in (("exact", "tracin"), ("tracin", "random")):
    diff = lds_lib.lds_difference(predicted[better], predicted[worse], measured,
                                  num_bootstrap=200)
    assert diff["low"] > 0, (better, worse, score, diff)


def test_choose_damping_takes_the_best_of_the_grid():
  best, table = trak_lib.choose_damping(lambda l: -(np.log10(l) + 2) ** 2, (1e-4, 1e-2, 1.0))
  assert best == 1e-2 and set(table) == {1e-4, 1e-2, 1.0} and table[1e-2] == 0.0
  with pytest.raises(ValueError, match="evaluate"):
    trak_lib.choose_damping(lambda l: float("nan"), (1.0,))
  with pytest.raises(ValueError, match="grid"):
    trak_lib.choose_damping(lambda l: 1.0, ())


@pytest.mark.parametrize("kwargs, match", [
    (dict(models=[{"w": np.zeros(D)}]), r"models\[0\]"),
    (dict(models=[]), "models"),
    (dict(damping=-1.0), "damping"),
    (dict(form="dense"), "form"),
    (dict(projection=projection_lib.Projection(4, "logra")), "projection"),
    (dict(q_fn=lambda p, ex: jnp.ones(2)), "q_fn"),
])
def test_bad_arguments_are_named(x64, kwargs, match):
  x, y, w, x_test = least_squares(5)
  args = dict(models=[[{"w": jnp.asarray(w)}]], vectorize="vmap")
  args.update(kwargs)
  with pytest.raises((ValueError, TypeError), match=match):
    trak_lib.trak_influence(output, train=as_data(x, y), test=as_data(x_test, np.zeros(N_TEST)),
                            **args)
