"""EK-FAC against the exact Hessian, explicit Kronecker matrices and plain per-patch loops."""

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tracin_jax.influence import ekfac
from tracin_jax.influence import grads


def split(module):
  graphdef, params = nnx.split(module, nnx.Param)
  return graphdef, jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), params)


# ---------------------------------------------------------------- a dense layer, 2 outputs
N, D, M = 30, 4, 2
_DENSE, _ = nnx.split(nnx.Linear(D, M, rngs=nnx.Rngs(0)), nnx.Param)


def dense_output(params, example, key=None):
  """f = x W + b [M], an nnx.Linear; as a Fisher function its gradients give the
  Gauss-Newton matrix, here the exact Hessian of the squared loss."""
  del key
  return nnx.merge(_DENSE, params)(example["x"])


def dense_loss(params, example):
  return 0.5 * jnp.sum((dense_output(params, example) - example["y"]) ** 2)


@pytest.fixture(scope="module")
def regression():
  """An anisotropic multi-output regression and its least-squares fit, float64."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)) @ np.diag([3.0, 1.0, 0.5, 0.2])
    y = x @ rng.normal(size=(D, M)) + rng.normal(size=(N, M))
    fit = np.linalg.lstsq(np.c_[x, np.ones(N)], y, rcond=None)[0]
    _, params = split(nnx.Linear(D, M, rngs=nnx.Rngs(0)))
    params = jax.tree_util.tree_map_with_path(
        lambda path, _: jnp.asarray(fit[:D] if "kernel" in jax.tree_util.keystr(path)
                                    else fit[D]), params)
    yield {"x": x, "y": y}, params


def test_exact_kronecker_structure_gives_the_exact_hessian_influence(x64, regression):
  data, params = regression
  # Test examples other than the training ones (the same shapes): the sides cannot swap.
  rng = np.random.default_rng(5)
  test = {"x": rng.normal(size=data["x"].shape), "y": rng.normal(size=data["y"].shape)}
  scores = ekfac.ekfac_influence(dense_loss, [(params, 1.0)], data, test, fisher=dense_output,
                                 damping=0.0, vectorize="vmap")
  # The exact Hessian of the summed loss, N x the mean Fisher, in closed form: parameters
  # raveled bias first, then the kernel row-major, i.e. phi = [1, x] (x) I_M.
  phi = np.c_[np.ones(N), data["x"]]
  hessian = np.kron(phi.T @ phi, np.eye(M))

  def loss_gradients(d):  # per-example loss gradients, [N, (1 + D) M]
    residual = np.asarray(jax.vmap(dense_output, (None, 0))(params, d)) - d["y"]
    return np.einsum("na,nm->nam", np.c_[np.ones(len(d["x"])), d["x"]], residual).reshape(
        len(d["x"]), -1)

  exact = N * loss_gradients(test) @ np.linalg.solve(hessian, loss_gradients(data).T)
  assert scores.shape == (N, 1, N, 1)
  np.testing.assert_allclose(scores[:, 0, :, 0], exact, rtol=1e-8, atol=1e-8 * np.abs(exact).max())
  damped = ekfac.ekfac_influence(dense_loss, [(params, 1.0)], data, test, fisher=dense_output,
                                 vectorize="vmap")
  assert not np.allclose(damped, scores, rtol=1e-2)  # the default damping: 0.1 x the mean


# ---------------------------------------------------------------- two layers, explicit matrices
class Mlp(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(3, 4, rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.tanh(self.hidden(x)))


_MLP, _ = nnx.split(Mlp(nnx.Rngs(0)), nnx.Param)


def mlp_loss(params, example):
  """K = 2: each output's squared error."""
  return (nnx.merge(_MLP, params)(example["x"]) - example["y"]) ** 2


def explicit_preconditioned(lf, damping):
  """The layer's damped EK-FAC Fisher as an explicit matrix on vec([in + 1, out])
  (row-major), inverted."""
  basis = np.kron(lf.q_a, lf.q_s)
  fisher = basis @ np.diag(lf.eigenvalues.reshape(-1)) @ basis.T
  return np.linalg.inv(fisher + damping * np.eye(len(fisher)))


def layer_gradient(params, g, name):
  """A layer's plain gradient [in + 1, out] from a raveled gradient, by the parameters'
  own layout (`ravel_pytree`'s: the leaves in order)."""
  parts, start = {}, 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    parts[jax.tree_util.keystr(path)] = g[start:start + leaf.size].reshape(leaf.shape)
    start += leaf.size
  return np.concatenate([parts[f"['{name}']['kernel'].value"],
                         parts[f"['{name}']['bias'].value"][None]])


def test_scores_are_the_layers_explicit_inverse_fishers_summed(x64):
  _, p0 = split(Mlp(nnx.Rngs(1)))
  p1 = jax.tree.map(lambda v: 0.9 * v, p0)
  rng = np.random.default_rng(1)
  train = {"x": rng.normal(size=(5, 3)), "y": rng.normal(size=(5, 2))}
  # Other examples of the same shapes (compiled once): test and train sides cannot swap.
  test = {"x": rng.normal(size=(5, 3)), "y": rng.normal(size=(5, 2))}
  checkpoints = [(p0, 0.5), (p1, 0.25)]
  scores = ekfac.ekfac_influence(mlp_loss, checkpoints, train, test, damping=1e-3,
                                 vectorize="vmap")
  expected = 0.0
  for params, learning_rate in checkpoints:
    factors = ekfac.ekfac_factors(mlp_loss, params, train)  # "auto": "loop" on CPU
    if learning_rate == 0.5:  # the vectorised path gives the same factors
      for lf, lf_vmap in zip(factors.layers,
                             ekfac.ekfac_factors(mlp_loss, params, train,
                                                 vectorize="vmap").layers):
        for field in ("a", "s", "eigenvalues"):
          np.testing.assert_allclose(getattr(lf_vmap, field), getattr(lf, field), rtol=1e-10,
                                     atol=1e-14)
    assert [lf.name for lf in factors.layers] == ["['head']['kernel'].value",
                                                  "['hidden']['kernel'].value"]
    assert factors.left_out == () and factors.fisher == "empirical"
    # The per-example gradients TracIn uses (tested against jax.grad in grads_test).
    g_train = np.asarray(grads.per_example_grads(mlp_loss, params, train, "vmap"))
    g_test = np.asarray(grads.per_example_grads(mlp_loss, params, test, "vmap"))
    part = np.zeros((5, 2, 5, 2))
    for lf, name in zip(factors.layers, ("head", "hidden")):
      g_tr = np.array([[layer_gradient(params, g, name) for g in ex] for ex in g_train])
      g_te = np.array([[layer_gradient(params, g, name) for g in ex] for ex in g_test])
      # The corrected eigenvalues: the mean over examples of the sum over outputs.
      rotated = np.einsum("ia,nkij,jb->nkab", lf.q_a, g_tr, lf.q_s)
      np.testing.assert_allclose(lf.eigenvalues, np.mean(np.sum(rotated ** 2, 1), 0),
                                 rtol=1e-9)
      inverse = explicit_preconditioned(lf, 1e-3)
      part += np.einsum("aip,pq,bjq->aibj", g_te.reshape(5, 2, -1), inverse,
                        g_tr.reshape(5, 2, -1))
    expected = expected + learning_rate * part
  assert np.isfinite(scores).all() and np.abs(scores).max() > 1e-3
  np.testing.assert_allclose(scores, expected, rtol=1e-7, atol=1e-10)


# ---------------------------------------------------------------- convolutions: a plain loop
CONVS = {  # rank: (input shape, kernel, strides, padding, in, out)
    1: ((5, 2), (3,), (1,), "SAME", 2, 3),
    2: ((5, 5, 2), (3, 3), (2, 2), "SAME", 2, 2),
    3: ((3, 3, 3, 1), (2, 2, 2), (1, 1, 1), "VALID", 1, 2),
}
_CONV_DEFS = {rank: nnx.split(nnx.Conv(c_in, c_out, kernel, strides=strides, padding=padding,
                                       rngs=nnx.Rngs(0)), nnx.Param)[0]
              for rank, (_, kernel, strides, padding, c_in, c_out) in CONVS.items()}


def conv_head(rank):
  """loss(y) for the conv's output y [*spatial, out]: K = 2."""
  def head(y, target):
    return jnp.stack([jnp.sum(jnp.tanh(y) * target), 0.1 * jnp.sum(y ** 2)])
  return head


_CONV_LOSSES = {}


def conv_loss(rank):
  if rank not in _CONV_LOSSES:
    def loss(params, example):
      y = nnx.merge(_CONV_DEFS[rank], params)(example["image"][None])[0]
      return conv_head(rank)(y, example["target"])
    _CONV_LOSSES[rank] = loss
  return _CONV_LOSSES[rank]


@functools.partial(jax.jit, static_argnums=0)
def _conv_output_grads(rank, params, images, targets):
  """d loss_k / d y at the conv's outputs y, per example: [n, K, *out_shape]."""
  outputs = nnx.merge(_CONV_DEFS[rank], params)(images)
  return jax.vmap(jax.jacrev(conv_head(rank)))(outputs, targets)


def plain_patches(x, kernel, strides, padding):
  """Every output position's patch, (spatial..., c_in) order, by slicing a padded copy."""
  pads = jax.lax.padtype_to_pads(x.shape[:-1], kernel, strides, padding)
  x = np.pad(x, [*pads, (0, 0)])
  sizes = [(x.shape[d] - kernel[d]) // strides[d] + 1 for d in range(len(kernel))]
  out = []
  for pos in np.ndindex(*sizes):
    window = tuple(slice(p * s, p * s + k) for p, s, k in zip(pos, strides, kernel))
    out.append(x[window].reshape(-1))
  return np.array(out)


@pytest.mark.parametrize("rank", [pytest.param(1, marks=pytest.mark.slow), 2,
                                  pytest.param(3, marks=pytest.mark.slow)])
def test_conv_factors_are_the_plain_per_patch_loop(x64, rank):
  shape, kernel, strides, padding, c_in, c_out = CONVS[rank]
  _, params = split(nnx.Conv(c_in, c_out, kernel, strides=strides, padding=padding,
                             rngs=nnx.Rngs(rank)))
  loss = conv_loss(rank)
  rng = np.random.default_rng(rank)
  n = 3
  images = rng.normal(size=(n, *shape))
  out_shape = jax.eval_shape(nnx.merge(_CONV_DEFS[rank], params), images[:1]).shape[1:]
  data = {"image": images, "target": rng.normal(size=(n, *out_shape))}
  factors = ekfac.ekfac_factors(loss, params, data)
  (lf,) = factors.layers
  assert lf.bias == "['bias'].value"
  output_grads = _conv_output_grads(rank, params, jnp.asarray(images), jnp.asarray(
      data["target"]))  # [n, K, *out_shape]
  a_sum, s_sum, count = 0.0, 0.0, 0
  gradients = []
  for b in range(n):
    patches = plain_patches(images[b], kernel, strides, padding)
    patches = np.c_[patches, np.ones(len(patches))]
    a_sum = a_sum + patches.T @ patches
    for k in range(2):
      dy = np.asarray(output_grads[b, k]).reshape(-1, c_out)
      s_sum = s_sum + dy.T @ dy
      gradients.append(patches.T @ dy)  # the layer's gradient [in + 1, out]
    count += len(patches)
  np.testing.assert_allclose(lf.a, a_sum / count, rtol=1e-10)
  np.testing.assert_allclose(lf.s, s_sum / (2 * count), rtol=1e-10)
  rotated = np.einsum("ia,nij,jb->nab", lf.q_a, np.array(gradients), lf.q_s)
  np.testing.assert_allclose(lf.eigenvalues, np.sum(rotated ** 2, 0) / n, rtol=1e-9)


# ---------------------------------------------------------------- the true Fisher, segmentation
class Seg(nnx.Module):
  """Logits [N, H, W, 3]: a convolution, then a GroupNorm (not a dense or conv layer)."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(2, 3, (3, 3), rngs=rngs)
    self.norm = nnx.GroupNorm(3, num_groups=1, rngs=rngs)

  def __call__(self, x):
    return self.norm(self.conv(x))


_SEG, _ = nnx.split(Seg(nnx.Rngs(0)), nnx.Param)


def seg_apply(params, images):
  return nnx.merge(_SEG, params)(images)


SEG_FISHER = ekfac.sampled_cross_entropy(seg_apply, mask_key="mask")


def test_the_true_fisher_is_seeded_masked_and_leaves_out_the_norms(x64):
  _, params = split(Seg(nnx.Rngs(2)))
  rng = np.random.default_rng(3)
  data = {"image": rng.normal(size=(3, 4, 4, 2)), "mask": np.ones((3, 4, 4))}
  fit = lambda **kw: ekfac.ekfac_factors(None, params, data, fisher=SEG_FISHER, **kw)
  factors = fit(seed=0, batch_size=3)
  assert factors.left_out == ("['norm']['bias'].value", "['norm']['scale'].value")
  assert [lf.bias for lf in factors.layers] == ["['conv']['bias'].value"]
  again, other = fit(seed=0, batch_size=3), fit(seed=1, batch_size=3)
  for lf, lf_again, lf_other in zip(factors.layers, again.layers, other.layers):
    np.testing.assert_array_equal(lf_again.eigenvalues, lf.eigenvalues)
    assert not np.allclose(lf_other.eigenvalues, lf.eigenvalues, rtol=1e-3)
    assert np.all(lf.eigenvalues >= 0) and np.mean(lf.eigenvalues) > 0
  # Example i's key is fold_in(PRNGKey(seed), i) whatever block it is in.
  np.testing.assert_array_equal(ekfac._keys(0, 1, 2), ekfac._keys(0, 0, 3)[1:])
  masked = ekfac.ekfac_factors(None, params, dict(data, mask=np.zeros((3, 4, 4))),
                               fisher=SEG_FISHER, batch_size=3)
  assert all(np.all(lf.eigenvalues == 0) and np.all(lf.s == 0) for lf in masked.layers)


def pixel_logits(params, images):
  """A per-pixel linear classifier: logits [N, H, W, 3]."""
  return images @ params["w"]


PIXEL_FISHER = ekfac.sampled_cross_entropy(pixel_logits)


@functools.partial(jax.jit, static_argnums=2)
def _sampled_losses(params, example, num_keys):
  keys = jax.random.split(jax.random.PRNGKey(0), num_keys)
  return jax.vmap(lambda key: PIXEL_FISHER(params, example, key))(keys)


def test_labels_are_sampled_from_the_models_softmax(x64):
  """One pixel, 3 classes: the loss -log p(y) tells which label was drawn; their
  frequencies over 2000 keys match softmax(logits) (binomial tolerance)."""
  params = {"w": jnp.asarray([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])}
  example = {"image": jnp.asarray([[[0.8, -0.4]]])}
  losses = np.asarray(_sampled_losses(params, example, 2000))
  logits = np.asarray(example["image"][0, 0]) @ np.asarray(params["w"])
  probs = np.exp(logits) / np.exp(logits).sum()
  drawn = np.argmin(np.abs(losses[:, None] + np.log(probs)[None]), axis=1)
  np.testing.assert_allclose(losses, -np.log(probs)[drawn], rtol=1e-12)
  frequencies = np.bincount(drawn, minlength=3) / len(drawn)
  assert np.all(np.abs(frequencies - probs) < 4 * np.sqrt(probs * (1 - probs) / len(drawn)))


# ---------------------------------------------------------------- what is left out, bad input
def late_bias_loss(params, example):
  """The "bias" is added after the nonlinearity: not a layer's bias."""
  return jnp.sum(jnp.tanh(example["x"] @ params["dense"]["kernel"]) + params["dense"]["bias"])


def no_layer_loss(params, example):
  return jnp.sum(params["scale"] * example["x"])


def test_a_bias_not_added_to_the_outputs_is_left_out_with_a_warning(x64):
  params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
  data = {"x": np.random.default_rng(0).normal(size=(4, 3))}
  with pytest.warns(RuntimeWarning, match="bias is not added"):
    factors = ekfac.ekfac_factors(late_bias_loss, params, data)
  assert factors.left_out == ("['dense']['bias']",) and factors.layers[0].bias is None
  assert factors.layers[0].eigenvalues.shape == (3, 2)


@pytest.mark.parametrize("case, match", [
    ("fisher", "fisher"), ("damping", "damping"), ("seed", "seed"), ("state", "checkpoints"),
    ("empty", "checkpoints"), ("no layer", "no dense or convolution layer"),
    ("factors", "factors"),
])
def test_bad_arguments_are_named(x64, regression, case, match):
  data, params = regression
  args = dict(loss_fn=dense_loss, checkpoints=[(params, 1.0)], vectorize="vmap")
  args.update({"fisher": dict(fisher="true"), "damping": dict(damping=-1.0),
               "seed": dict(seed=1.5), "state": dict(checkpoints=[(params, 1.0, jnp.ones(1))]),
               "empty": dict(checkpoints=[]), "factors": dict(factors=[]),
               "no layer": dict(loss_fn=no_layer_loss,
                                checkpoints=[({"scale": jnp.ones(D)}, 1.0)])}[case])
  with pytest.raises((ValueError, TypeError), match=match):
    ekfac.ekfac_influence(train=data, test=data, **args)
