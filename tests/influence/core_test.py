"""influence / self_influence against the plain loop, closed forms, and their contracts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracin_jax.influence import core
from tracin_jax.influence import grads as grads_lib
from tracin_jax.influence import influence, self_influence
import tiny_models as tm

N_TRAIN, N_TEST = 7, 4
P_MLP = 5 * 6 + 6 + 6 * 3
BYTES = 3 * P_MLP * 8  # one example's gradients, K = 3, float64


def mlp_checkpoints(dtype=jnp.float32):
  return [(tm.mlp_params(0, dtype), 0.1), (tm.mlp_params(1, dtype), 0.03)]


@functools.lru_cache(maxsize=None)
def reference():
  """The plain loop's scores in float64: (test-train, train-train)."""
  with jax.enable_x64(True):
    checkpoints = mlp_checkpoints(jnp.float64)
    train, test = tm.mlp_data(10, N_TRAIN, np.float64), tm.mlp_data(11, N_TEST, np.float64)
    return (tm.loop_influence(tm.mlp_loss, checkpoints, train, test),
            tm.loop_influence(tm.mlp_loss, checkpoints, train))


def data64():
  return tm.mlp_data(10, N_TRAIN, np.float64), tm.mlp_data(11, N_TEST, np.float64)


@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
@pytest.mark.parametrize("batch_size,budget_examples", [
    (None, 10**6),  # all at once: one block per side
    (3, 10**6),     # blocks of 3 (does not divide 7 nor 4), every side fits
    (3, 6),         # room for two blocks: one held, one streamed, recomputation
    (2, 8),         # groups of three blocks
    (1, 2),
])
def test_blocked_budgeted_equals_plain_loop(x64, batch_size, budget_examples, vectorize):
  train, test = data64()
  expect_test, expect_train = reference()
  kwargs = dict(batch_size=batch_size, memory_budget_bytes=budget_examples * BYTES,
                vectorize=vectorize)
  scores = influence(tm.mlp_loss, mlp_checkpoints(jnp.float64), train, test, **kwargs)
  assert scores.shape == (N_TEST, 3, N_TRAIN, 3) and scores.dtype == np.float64
  np.testing.assert_allclose(scores, expect_test, rtol=1e-10, atol=1e-12)
  scores = influence(tm.mlp_loss, mlp_checkpoints(jnp.float64), train, **kwargs)
  np.testing.assert_allclose(scores, expect_train, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
@pytest.mark.parametrize("iterable", [False, True])
def test_no_gradient_is_computed_for_padding(monkeypatch, vectorize, iterable):
  # 7 train and 4 test examples in blocks of 3: ragged last blocks of 1 and 1 example.
  sizes = []
  block_grads = core.grads_lib.block_grads

  def spy(loss_fn, k, params, batch, *args, **kwargs):
    sizes.append(jax.tree.leaves(batch)[0].shape[0])
    return block_grads(loss_fn, k, params, batch, *args, **kwargs)

  monkeypatch.setattr(core.grads_lib, "block_grads", spy)
  train, test = tm.mlp_data(10, N_TRAIN), tm.mlp_data(11, N_TEST)
  if iterable:
    train = Batches(train, [2, 4, 1])
  scores = influence(tm.mlp_loss, mlp_checkpoints(), train, test, batch_size=3,
                     vectorize=vectorize)
  assert sizes == 2 * [3, 1, 3, 3, 1]  # per checkpoint: test 3 + 1, train 3 + 3 + 1
  expect = reference()[0]
  np.testing.assert_allclose(scores, expect, rtol=1e-4, atol=1e-4 * np.abs(expect).max())


def test_float32_matches_loop_within_float32_tolerance():
  train, test = tm.mlp_data(10, N_TRAIN), tm.mlp_data(11, N_TEST)
  scores = influence(tm.mlp_loss, mlp_checkpoints(), train, test, batch_size=3)
  assert scores.dtype == np.float32
  expect = reference()[0]
  np.testing.assert_allclose(scores, expect, rtol=1e-4, atol=1e-4 * np.abs(expect).max())


def test_linear_model_closed_form(x64):
  # loss_j = x . W[:, j] + b_j: grad loss_j = (e_j x^T, e_j), so
  # T[a, i, b, j] = sum_t eta_t (x_a . x_b + 1) [i == j], whatever the parameters.
  rng = np.random.default_rng(0)
  train, test = {"x": rng.normal(size=(5, 4))}, {"x": rng.normal(size=(3, 4))}
  checkpoints = [({"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}, 0.5),
                 ({"w": jnp.ones((4, 3)), "b": jnp.ones(3)}, 0.25)]
  scores = influence(tm.linear_loss, checkpoints, train, test, batch_size=2)
  expect = 0.75 * np.einsum("ad,bd->ab", test["x"], train["x"]) + 0.75
  np.testing.assert_allclose(scores, np.einsum("ab,ij->aibj", expect, np.eye(3)), rtol=1e-12)


def test_squared_error_closed_form_scalar_loss(x64):
  # loss = (w . x - y)^2, a scalar (K = 1): grad = 2 r x with r = w . x - y.
  rng = np.random.default_rng(1)
  train = {"x": rng.normal(size=(6, 3)), "y": rng.normal(size=6)}
  w = rng.normal(size=3)
  scores = influence(tm.squared_error, [({"w": jnp.asarray(w)}, 0.2)], train)
  g = 2 * (train["x"] @ w - train["y"])[:, None] * train["x"]
  assert scores.shape == (6, 1, 6, 1)
  np.testing.assert_allclose(scores[:, 0, :, 0], 0.2 * g @ g.T, rtol=1e-12)


@pytest.mark.parametrize("batch_size", [None, 3])
def test_train_influence_is_exactly_symmetric(batch_size):
  scores = influence(tm.mlp_loss, mlp_checkpoints(), tm.mlp_data(10, N_TRAIN),
                     batch_size=batch_size, memory_budget_bytes=6 * 3 * P_MLP * 4)
  np.testing.assert_array_equal(scores, scores.transpose(2, 3, 0, 1))


def test_learning_rate_weighting_over_checkpoints(x64):
  train, test = data64()
  (p1, _), (p2, _) = mlp_checkpoints(jnp.float64)
  t1 = influence(tm.mlp_loss, [(p1, 1.0)], train, test)
  t2 = influence(tm.mlp_loss, [(p2, 1.0)], train, test)
  both = influence(tm.mlp_loss, [(p1, 0.3), (p2, -0.7)], train, test)
  np.testing.assert_allclose(both, 0.3 * t1 - 0.7 * t2, rtol=1e-12, atol=1e-14)
  assert not np.allclose(t1, t2)


def test_self_influence_is_the_diagonal(x64):
  train, _ = data64()
  expect = np.einsum("aiai->ai", reference()[1])
  for batch_size, budget in [(None, 10**6), (3, 3), (1, 1)]:
    scores = self_influence(tm.mlp_loss, mlp_checkpoints(jnp.float64), train,
                            batch_size=batch_size, memory_budget_bytes=budget * BYTES)
    assert scores.shape == (N_TRAIN, 3)
    np.testing.assert_allclose(scores, expect, rtol=1e-10)
  full = influence(tm.mlp_loss, mlp_checkpoints(jnp.float64), train, batch_size=3)
  np.testing.assert_allclose(scores, np.einsum("aiai->ai", full), rtol=1e-10)


class Batches:
  """A re-iterable of batches of uneven sizes (like a dataset object)."""

  def __init__(self, data, sizes):
    self.data, self.sizes = data, sizes

  def __iter__(self):
    start = 0
    for size in self.sizes:
      yield jax.tree.map(lambda x: x[start:start + size], self.data)
      start += size


def test_iterable_batches_equal_arrays():
  train, test = tm.mlp_data(10, N_TRAIN), tm.mlp_data(11, N_TEST)
  expect = influence(tm.mlp_loss, mlp_checkpoints(), train, test, batch_size=3)
  batches = list(Batches(train, [2, 4, 1]))
  for budget in (10**6, 6):  # everything held; then recomputation (several passes)
    scores = influence(tm.mlp_loss, mlp_checkpoints(), lambda: iter(batches),
                       Batches(test, [3, 1]), batch_size=3,
                       memory_budget_bytes=budget * 3 * P_MLP * 4)
    np.testing.assert_allclose(scores, expect, rtol=1e-6, atol=1e-6)
  scores = influence(tm.mlp_loss, mlp_checkpoints(), Batches(train, [5, 2]), batch_size=3,
                     memory_budget_bytes=6 * 3 * P_MLP * 4)
  np.testing.assert_allclose(
      scores, influence(tm.mlp_loss, mlp_checkpoints(), train, batch_size=3), rtol=1e-6,
      atol=1e-6)
  si = self_influence(tm.mlp_loss, mlp_checkpoints(), Batches(train, [1, 6]), batch_size=3)
  np.testing.assert_allclose(si, self_influence(tm.mlp_loss, mlp_checkpoints(), train),
                             rtol=1e-5)


def test_iterables_that_cannot_be_reread_are_refused():
  train = tm.mlp_data(10, N_TRAIN)
  with pytest.raises(TypeError, match="one-shot iterator"):
    influence(tm.mlp_loss, mlp_checkpoints(), iter(Batches(train, [3, 4])))
  with pytest.raises(TypeError, match="must return an iterator"):
    influence(tm.mlp_loss, mlp_checkpoints(), lambda: [train])
  passes = iter([[train]] + [[train, train]] * 3)  # later passes yield more examples
  with pytest.raises(ValueError, match="same examples every time"):
    influence(tm.mlp_loss, mlp_checkpoints(), lambda: iter(next(passes)))


def test_same_inputs_same_scores():
  train, test = tm.mlp_data(10, N_TRAIN), tm.mlp_data(11, N_TEST)
  a = influence(tm.mlp_loss, mlp_checkpoints(), train, test, batch_size=3)
  b = influence(tm.mlp_loss, mlp_checkpoints(), tm.mlp_data(10, N_TRAIN),
                tm.mlp_data(11, N_TEST), batch_size=3)
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("vectorize", ["auto", "vmap", "loop", "threads"])
def test_conv_net_matches_plain_loop(x64, vectorize):
  checkpoints = [(tm.conv_params(0, jnp.float64), 0.1), (tm.conv_params(1, jnp.float64), 0.2)]
  train, test = tm.conv_data(0, 3, dtype=np.float64), tm.conv_data(1, 2, dtype=np.float64)
  scores = influence(tm.conv_loss, checkpoints, train, test, batch_size=2,
                     vectorize=vectorize)
  expect = tm.loop_influence(tm.conv_loss, checkpoints, train, test)
  np.testing.assert_allclose(scores, expect, rtol=1e-10, atol=1e-13)


# ------------------------------------------------------------------------- bad arguments


def test_bad_checkpoints():
  train = tm.mlp_data(10, N_TRAIN)
  params = tm.mlp_params(0)
  with pytest.raises(ValueError, match="checkpoints is empty"):
    influence(tm.mlp_loss, [], train)
  for bad in (float("nan"), float("inf"), "0.1", None, True, np.ones(2)):
    with pytest.raises(ValueError, match="checkpoint 1: learning_rate"):
      influence(tm.mlp_loss, [(params, 0.1), (params, bad)], train)
  with pytest.raises(ValueError, match="pair"):
    influence(tm.mlp_loss, [params], train)
  other = dict(params, w2=jnp.ones((6, 4)))  # a head with K = 4 outputs
  with pytest.raises(ValueError, match="checkpoint 1: params differ"):
    influence(tm.mlp_loss, [(params, 0.1), (other, 0.1)], train)
  # Learning rates given as numpy or jax scalars are fine.
  influence(tm.mlp_loss, [(params, np.float32(0.1)), (params, jnp.asarray(0.2))], train)


def test_bad_data():
  params = [(tm.mlp_params(0), 0.1)]
  train = tm.mlp_data(10, N_TRAIN)
  with pytest.raises(ValueError, match=r"leading \(example\) size: \['x'\]: 7, \['y'\]: 6"):
    influence(tm.mlp_loss, params, {"x": train["x"], "y": train["y"][:6]})
  with pytest.raises(ValueError, match=r"test: leaf \['x'\] is float32\[4\] per example, "
                                       r"train has float32\[5\]"):
    influence(tm.mlp_loss, params, train, {"x": train["x"][:, :4], "y": train["y"]})
  with pytest.raises(ValueError, match=r"test: leaf \['y'\] is float64"):
    influence(tm.mlp_loss, params, train, {"x": train["x"], "y": train["y"].astype(float)})
  with pytest.raises(ValueError, match="example structure differs"):
    influence(tm.mlp_loss, params, train, {"x": train["x"], "z": train["y"]})
  with pytest.raises(ValueError, match=r"leaf \['y'\] is a scalar"):
    influence(tm.mlp_loss, params, {"x": train["x"], "y": np.float32(1.0)})
  with pytest.raises(TypeError, match="lambda: iter"):
    influence(tm.mlp_loss, params, [train, train][:1] + ["x"])
  with pytest.raises(TypeError) as error:  # a tuple of batches is one pytree
    influence(tm.mlp_loss, params, (train, train))
  assert "lambda: iter(batches)" in "".join(error.value.__notes__)
  halves = [{k: v[:5] for k, v in train.items()}, {k: v[5:] for k, v in train.items()}]
  np.testing.assert_allclose(  # a list of batches is read as batches
      influence(tm.mlp_loss, params, halves, progress=False),
      influence(tm.mlp_loss, params, train, progress=False), rtol=1e-6)
  batches = [train, {"x": train["x"][:, :4], "y": train["y"]}]
  with pytest.raises(ValueError, match=r"train batch 1: leaf \['x'\]"):
    influence(tm.mlp_loss, params, lambda: iter(batches))


def test_bad_loss_shapes():
  params = [(tm.mlp_params(0), 0.1)]
  train = tm.mlp_data(10, N_TRAIN)
  with pytest.raises(ValueError, match=r"scalar or a vector \[K\].*\(2, 3\)"):
    influence(lambda p, e: jnp.ones((2, 3)) * jnp.sum(p["b1"]), params, train)
  with pytest.raises(ValueError, match="floating"):
    influence(lambda p, e: jnp.ones(3, jnp.int32), params, train)


def test_budget_too_small():
  with pytest.raises(ValueError, match="cannot hold the gradients of two examples"):
    influence(tm.mlp_loss, mlp_checkpoints(), tm.mlp_data(10, N_TRAIN),
              memory_budget_bytes=3 * P_MLP * 4)
  with pytest.raises(ValueError, match="cannot hold one example"):
    self_influence(tm.mlp_loss, mlp_checkpoints(), tm.mlp_data(10, N_TRAIN),
                   memory_budget_bytes=10)


def test_nonfinite_gradients_warn():
  def loss_fn(params, example):
    return jnp.sqrt(example["x"] @ params["w"])

  train = {"x": np.array([[1.0, 2.0], [-1.0, -2.0], [2.0, 1.0]], np.float32)}
  message = r"non-finite gradients for 1 train examples \(first \[1\]\)"
  with pytest.warns(RuntimeWarning, match=message):
    scores = influence(loss_fn, [({"w": jnp.ones(2)}, 0.1)], train, batch_size=2)
  assert np.isfinite(scores[0, 0, 0, 0]) and np.isnan(scores[1, 0, 1, 0])
  with pytest.warns(RuntimeWarning, match="non-finite"):
    self_influence(loss_fn, [({"w": jnp.ones(2)}, 0.1)], train)


def test_progress_callback_and_text(capsys):
  seen = []
  influence(tm.mlp_loss, mlp_checkpoints(), tm.mlp_data(10, N_TRAIN), batch_size=3,
            progress=seen.append)
  assert all(isinstance(p, core.Progress) for p in seen)
  # 2 checkpoints x 7 examples (blocks of 3, 3 and 1: no padding counted, none computed).
  assert seen[-1].examples_done == seen[-1].examples_total == 2 * N_TRAIN
  assert seen[-1].checkpoint == seen[-1].num_checkpoints == 2
  assert {p.vectorize for p in seen} <= set(grads_lib.PATHS)  # "auto" says what it chose
  assert [p.examples_done for p in seen] == sorted(p.examples_done for p in seen)
  self_influence(tm.mlp_loss, mlp_checkpoints(), tm.mlp_data(10, N_TRAIN), progress=True)
  err = capsys.readouterr().err
  last = err.strip().splitlines()[-1]
  assert last.startswith("tracin example gradients") and "checkpoint=2/2" in last
  assert any(f"vectorize={path}" in last for path in grads_lib.PATHS)
  assert err.endswith("\n")


def test_progress_counts_each_checkpoints_examples():
  seen = []
  influence(tm.mlp_loss, mlp_checkpoints(), tm.mlp_data(10, N_TRAIN), batch_size=3,
            progress=seen.append)
  # Blocks of 3, 3 and 1 at each checkpoint; the count starts again at each.
  assert [(p.checkpoint, p.checkpoint_examples_done) for p in seen] == [
      (1, 3), (1, 6), (1, 7), (2, 3), (2, 6), (2, 7)]
  assert {p.checkpoint_examples_total for p in seen} == {N_TRAIN}
  seen.clear()
  self_influence(tm.mlp_loss, mlp_checkpoints(), tm.mlp_data(10, N_TRAIN), batch_size=4,
                 progress=seen.append)
  assert [(p.checkpoint, p.checkpoint_examples_done, p.checkpoint_examples_total)
          for p in seen] == [(1, 4, 7), (1, 7, 7), (2, 4, 7), (2, 7, 7)]


@pytest.mark.parametrize("with_test,kwargs", [
    (True, {}),
    (False, {}),
    (True, {"memory_budget_bytes": 4 * 3 * P_MLP * 4, "vectorize": "loop"}),  # held groups
    (False, {"memory_budget_bytes": 4 * 3 * P_MLP * 4, "vectorize": "vmap"}),
    (False, {"normalize": True, "params_filter": "w2"}),
    (True, {"projection": core.projection_lib.Projection(16, "countsketch", seed=2)}),
])
def test_per_checkpoint_terms_are_influence_of_each_checkpoint_bit_for_bit(with_test, kwargs):
  ckpts = mlp_checkpoints() + [(tm.mlp_params(2), 0.01)]
  train = tm.mlp_data(10, N_TRAIN)
  test = tm.mlp_data(11, N_TEST) if with_test else None
  terms = list(core.influence_per_checkpoint(tm.mlp_loss, ckpts, train, test, batch_size=3,
                                             **kwargs))
  assert len(terms) == len(ckpts)
  for term, ckpt in zip(terms, ckpts):
    alone = influence(tm.mlp_loss, [ckpt], train, test, batch_size=3, **kwargs)
    assert term.dtype == alone.dtype and term.shape == alone.shape
    np.testing.assert_array_equal(term, alone)
  assert not np.shares_memory(terms[0], terms[1])  # a fresh array each
  total = None
  for term in terms:  # as the influence stage sums its saved parts, in checkpoint order
    total = term if total is None else total + term
  np.testing.assert_allclose(
      total, influence(tm.mlp_loss, ckpts, train, test, batch_size=3, **kwargs),
      rtol=1e-6, atol=1e-6)


def test_per_checkpoint_terms_are_checked_at_once_and_computed_when_asked_for():
  with pytest.raises(ValueError, match="checkpoints is empty"):
    core.influence_per_checkpoint(tm.mlp_loss, [], tm.mlp_data(10, N_TRAIN))  # no next()
  seen = []
  terms = core.influence_per_checkpoint(tm.mlp_loss, mlp_checkpoints(),
                                        tm.mlp_data(10, N_TRAIN), batch_size=3,
                                        progress=seen.append)
  assert not seen
  next(terms)
  assert {p.checkpoint for p in seen} == {1}
  assert seen[-1].checkpoint_examples_done == seen[-1].checkpoint_examples_total == N_TRAIN
  next(terms)
  assert seen[-1].checkpoint == seen[-1].num_checkpoints == 2
  assert seen[-1].examples_done == seen[-1].examples_total == 2 * N_TRAIN
  with pytest.raises(StopIteration):
    next(terms)


def _masked_plain(loss, ckpts, train, test, keep):
  """The plain loop on the kept leaves only: sum_t eta_t g_keep(test) . g_keep(train)."""
  total = 0.0
  for params, lr in ckpts:
    def rows(data):
      out = []
      for e in range(len(data["x"])):
        ex = jax.tree.map(lambda x: x[e], data)
        jac = jax.jacrev(loss)(params, ex)  # {name: [K, ...]}
        out.append(np.concatenate([np.reshape(jac[n], (3, -1)) for n in keep], axis=1))
      return np.stack(out)
    total = total + lr * np.einsum("aip,bjp->aibj", rows(test), rows(train))
  return total


@pytest.mark.parametrize("params_filter, keep", [
    ("w2", ["w2"]),
    (["b1", "w1"], ["b1", "w1"]),
    (lambda path: not path.startswith("w2"), ["b1", "w1"]),
])
def test_params_filter_restricts_the_gradients_to_the_kept_parameters(x64, params_filter, keep):
  ckpts = [(tm.mlp_params(0, jnp.float64), 0.5), (tm.mlp_params(1, jnp.float64), 0.25)]
  train, test = tm.mlp_data(2, 9, np.float64), tm.mlp_data(3, 4, np.float64)
  scores = influence(tm.mlp_loss, ckpts, train, test, params_filter=params_filter,
                     batch_size=4)
  np.testing.assert_allclose(scores, _masked_plain(tm.mlp_loss, ckpts, train, test, keep),
                             rtol=1e-10, atol=1e-12)
  full = influence(tm.mlp_loss, ckpts, train, test, batch_size=4)
  assert not np.allclose(scores, full)
  diag = self_influence(tm.mlp_loss, ckpts, train, params_filter=params_filter)
  own = influence(tm.mlp_loss, ckpts, train, params_filter=params_filter)
  np.testing.assert_allclose(diag, np.einsum("aiai->ai", own), rtol=1e-10)


def test_params_filter_that_keeps_nothing_is_an_error():
  with pytest.raises(ValueError, match="selects no parameter"):
    influence(tm.mlp_loss, [(tm.mlp_params(0), 0.1)], tm.mlp_data(0, 3),
              params_filter="decoder")


def _plain_rows(checkpoint, data):
  """[n, K, P] per-example gradients from the plain loop, float64."""
  params, _ = checkpoint
  grad_fn = jax.jacrev(tm.mlp_loss)
  rows = []
  for i in range(len(data["x"])):
    example = jax.tree.map(lambda x: x[i], data)
    jac = grad_fn(params, example)  # leaves [K, ...]
    rows.append(np.concatenate([np.reshape(np.asarray(jac[name]), (3, -1))
                                for name in sorted(jac)], axis=1))
  return np.stack(rows)


def _plain_transformed(normalize, projection, x64_ckpts, train, test):
  out = 0
  for params, lr in x64_ckpts:
    a, b = _plain_rows((params, lr), test), _plain_rows((params, lr), train)
    if normalize:
      a = a / np.linalg.norm(a, axis=-1, keepdims=True)
      b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    if projection is not None:
      a = np.asarray(projection(a.reshape(-1, a.shape[-1]))).reshape(*a.shape[:2], -1)
      b = np.asarray(projection(b.reshape(-1, b.shape[-1]))).reshape(*b.shape[:2], -1)
    out = out + lr * np.einsum("aip,bjp->aibj", a, b)
  return out


@pytest.mark.parametrize("normalize,kind", [(True, None), (False, "countsketch"),
                                            (True, "srht"), (False, "dense")])
def test_normalized_and_projected_scores_equal_the_plain_computation(x64, normalize, kind):
  train, test = data64()
  ckpts = mlp_checkpoints(jnp.float64)
  projection = None if kind is None else core.projection_lib.Projection(16, kind, seed=2,
                                                                        chunk_columns=20)
  expect = _plain_transformed(normalize, projection, ckpts, train, test)
  scores = influence(tm.mlp_loss, ckpts, train, test, batch_size=3, normalize=normalize,
                     projection=projection)
  np.testing.assert_allclose(scores, expect, rtol=1e-9, atol=1e-10)
  self_scores = self_influence(tm.mlp_loss, ckpts, train, batch_size=3, normalize=normalize,
                               projection=projection)
  diagonal = influence(tm.mlp_loss, ckpts, train, normalize=normalize, projection=projection)
  np.testing.assert_allclose(self_scores, np.einsum("aiai->ai", diagonal), rtol=1e-9)


def test_normalized_scores_are_cosines_summed_over_checkpoints(x64):
  train, test = data64()
  ckpts = mlp_checkpoints(jnp.float64)
  scores = influence(tm.mlp_loss, ckpts, train, test, normalize=True)
  # |cosine| <= 1 per checkpoint, so |score| <= sum of the learning rates.
  assert np.abs(scores).max() <= sum(lr for _, lr in ckpts) + 1e-12
  np.testing.assert_allclose(self_influence(tm.mlp_loss, ckpts, train, normalize=True),
                             sum(lr for _, lr in ckpts), rtol=1e-12)


def test_transform_arguments_are_checked():
  train, test = data64()
  with pytest.raises(TypeError, match="normalize"):
    influence(tm.mlp_loss, mlp_checkpoints(), train, test, normalize="yes")
  with pytest.raises(TypeError, match="projection"):
    influence(tm.mlp_loss, mlp_checkpoints(), train, test, projection=16)


def test_plan_states_the_passes_a_budget_forces():
  p = 1000
  per_example = 3 * p * 4
  roomy = core.plan_influence(100, None, 3, p, 5, memory_budget_bytes=200 * per_example,
                              batch_size=10, seconds_per_example=2.0)
  assert roomy.gradient_passes == 1.0 and roomy.gradient_examples == 500
  assert roomy.seconds == pytest.approx(1000.0)
  tight = core.plan_influence(100, None, 3, p, 5, memory_budget_bytes=30 * per_example,
                              batch_size=10)
  assert tight.gradient_passes > 1.0 and tight.groups == 5 and tight.seconds is None
  # The plan is the one influence() follows: its progress counts the same example gradients.
  train = tm.mlp_data(10, 7)
  seen = []
  influence(tm.mlp_loss, mlp_checkpoints(), train, memory_budget_bytes=4 * 3 * P_MLP * 4,
            batch_size=2, progress=seen.append)
  planned = core.plan_influence(7, None, 3, P_MLP, 2, memory_budget_bytes=4 * 3 * P_MLP * 4,
                                batch_size=2)
  assert seen[-1].examples_total == planned.gradient_examples
  projected = core.plan_influence(100, 4, 3, 10**8, 1, memory_budget_bytes=1 << 30,
                                  projection=core.projection_lib.Projection(1024))
  assert projected.gradient_passes == 1.0
