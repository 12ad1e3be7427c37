"""Guided ReLU for any JAX function, without editing the model's code.

`guided(fn)` returns a function with the same values as `fn` whose ReLUs have the guided
backward pass of Springenberg et al. (2015):

    forward  y = max(x, 0)
    backward dx = 1[upstream > 0] * 1[x > 0] * upstream

Mechanism: `fn` is traced to a jaxpr (`jax.make_jaxpr`, at the call's shapes) and the jaxpr
is evaluated again by a small interpreter that binds every primitive as it is, except
`max(x, 0)`, which it replaces by `guided_relu(x)` (a `jax.custom_vjp`). A zero operand is
recognised when it is a literal 0, a constant array of zeros, or a broadcast, reshape or
type conversion of one; either operand order counts. The interpreter descends into the
nested jaxprs where ReLUs hide: `jit` (pjit), `closed_call`/`core_call`, `checkpoint`
(remat) and `custom_jvp_call` (so `jax.nn.relu` and `flax.nnx.relu`, custom_jvp functions
around a jitted `max(x, 0)`, are caught) and `custom_vjp_call`. Descending into a
custom_jvp/custom_vjp call drops that function's custom derivative rule for the plain
derivative of its body (the same function); calls whose body has no ReLU are bound
unchanged, rule included. ReLUs inside `scan`, `while` or `cond` bodies are left unguided
and logged as a warning; so are ReLUs not written as a max with zero (for example
`jnp.where(x > 0, x, 0)`).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

logger = logging.getLogger(__name__)
Array = jax.Array

# Parameter names under which call-like primitives keep the jaxpr they evaluate.
_CALL_JAXPR_PARAMS: dict[str, str] = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "call": "call_jaxpr",
    "checkpoint": "jaxpr",
    "remat": "jaxpr",
    "remat2": "jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
}
# Primitives whose outputs are zero when their (first) input is.
_ZERO_PRESERVING = frozenset({"broadcast_in_dim", "convert_element_type", "reshape", "copy",
                              "copy_p", "squeeze", "expand_dims", "transpose"})


@jax.custom_vjp
def guided_relu(x: Array) -> Array:
  """max(x, 0) with the guided backward pass 1[g > 0] * 1[x > 0] * g."""
  return jnp.maximum(x, jnp.zeros((), x.dtype))


def _guided_relu_fwd(x):
  return guided_relu(x), x


def _guided_relu_bwd(x, g):
  return (jnp.where((g > 0) & (x > 0), g, jnp.zeros((), g.dtype)),)


guided_relu.defvjp(_guided_relu_fwd, _guided_relu_bwd)


def _is_literal(var: Any) -> bool:
  return isinstance(var, jex_core.Literal)


def _is_zero_constant(value: Any) -> bool:
  if isinstance(value, jax.core.Tracer):
    return False
  try:
    array = np.asarray(value)
  except Exception:  # pylint: disable=broad-except
    return False
  return array.dtype != object and array.size > 0 and not np.any(array)


def _open(jaxpr: Any) -> Any:
  """The open jaxpr of a Jaxpr or ClosedJaxpr."""
  return getattr(jaxpr, "jaxpr", jaxpr)


def _sub_jaxprs(eqn) -> list:
  subs = []
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(_open(item), "eqns"):
        subs.append(item)
  return subs


def _max_with_zero(eqn, zero_vars: set) -> int | None:
  """Index of the non-zero operand of `max(a, b)` when the other is a known zero."""
  if eqn.primitive.name != "max":
    return None
  for i in (0, 1):
    var = eqn.invars[1 - i]
    if _is_literal(var):
      if _is_zero_constant(var.val):
        return i
    elif var in zero_vars:
      return i
  return None


def _zero_vars_of(jaxpr, const_values=None) -> set:
  """The vars of an open jaxpr statically known to be zero (without evaluating it)."""
  zeros = set()
  if const_values is not None:
    for var, value in zip(jaxpr.constvars, const_values):
      if _is_zero_constant(value):
        zeros.add(var)
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in _ZERO_PRESERVING and eqn.invars:
      src = eqn.invars[0]
      if (_is_literal(src) and _is_zero_constant(src.val)) or src in zeros:
        zeros.update(eqn.outvars)
  return zeros


def _contains_relu(jaxpr) -> bool:
  """Whether an open or closed jaxpr (or one it nests) has a max(x, 0)."""
  consts = getattr(jaxpr, "consts", None)
  jaxpr = _open(jaxpr)
  zeros = _zero_vars_of(jaxpr, consts)
  for eqn in jaxpr.eqns:
    if _max_with_zero(eqn, zeros) is not None:
      return True
    for sub in _sub_jaxprs(eqn):
      if _contains_relu(sub):
        return True
  return False


def _bind(eqn, invals: list) -> list:
  """Binds an equation's primitive as `jax.core.eval_jaxpr` does."""
  bind_params = eqn.primitive.get_bind_params(eqn.params)
  subfuns = []
  if isinstance(bind_params, tuple):  # JAX < 0.7: (subfuns, params)
    subfuns, bind_params = bind_params
  with eqn.ctx.manager:
    outs = eqn.primitive.bind(*subfuns, *invals, **bind_params)
  return list(outs) if eqn.primitive.multiple_results else [outs]


def _eval_jaxpr(jaxpr, consts, args) -> list:
  """Evaluates an open jaxpr, swapping max(x, 0) for `guided_relu(x)`."""
  env: dict = {}
  zero_vars: set = set()

  def read(var):
    return var.val if _is_literal(var) else env[var]

  def write(var, value):
    if not isinstance(var, jex_core.DropVar):
      env[var] = value

  for var, value in zip(jaxpr.constvars, consts):
    write(var, value)
    if _is_zero_constant(value):
      zero_vars.add(var)
  for var, value in zip(jaxpr.invars, args):
    write(var, value)

  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    keep = _max_with_zero(eqn, zero_vars)
    if keep is not None:
      out_aval = eqn.outvars[0].aval
      value = jnp.broadcast_to(invals[keep], out_aval.shape).astype(out_aval.dtype)
      outs = [guided_relu(value)]
    elif name in _CALL_JAXPR_PARAMS and _CALL_JAXPR_PARAMS[name] in eqn.params and (
        _contains_relu(eqn.params[_CALL_JAXPR_PARAMS[name]])):
      inner = eqn.params[_CALL_JAXPR_PARAMS[name]]
      # The inner jaxpr's inputs are the call's last operands (a custom_vjp call may
      # carry extra leading ones).
      invals = invals[len(invals) - len(_open(inner).invars):]
      outs = _eval_jaxpr(_open(inner), getattr(inner, "consts", ()), invals)
    else:
      if _sub_jaxprs(eqn) and any(_contains_relu(s) for s in _sub_jaxprs(eqn)):
        logger.warning("guided backprop: ReLUs inside a %r primitive are left unguided", name)
      outs = _bind(eqn, invals)
    if name in _ZERO_PRESERVING and eqn.invars:
      src = eqn.invars[0]
      if (_is_literal(src) and _is_zero_constant(src.val)) or src in zero_vars:
        zero_vars.update(eqn.outvars)
    for var, value in zip(eqn.outvars, outs):
      write(var, value)
  return [read(v) for v in jaxpr.outvars]


def guided(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`fn` with every ReLU (max with zero) replaced by `guided_relu`; same values.

  Args:
    fn: any JAX-traceable function of arrays/pytrees (e.g. `apply_fn`), returning a pytree.

  Returns:
    A function with `fn`'s signature and outputs. It retraces `fn` to a jaxpr at each
    call (inside a jitted caller that happens once per compilation).
  """

  @functools.wraps(fn)
  def wrapped(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    flat_args = jax.tree.leaves(args)
    outs = _eval_jaxpr(closed.jaxpr, closed.consts, flat_args)
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return wrapped


def count_relus(fn: Callable[..., Any], *args: Any) -> int:
  """How many max(x, 0) the guided interpreter finds in `fn(*args)` (nested jaxprs
  included, each occurrence counted once); 0 means guided backprop = the plain gradient."""

  def count(jaxpr, consts) -> int:
    zeros = _zero_vars_of(jaxpr, consts)
    total = 0
    for eqn in jaxpr.eqns:
      if _max_with_zero(eqn, zeros) is not None:
        total += 1
      elif eqn.primitive.name in _CALL_JAXPR_PARAMS or not _sub_jaxprs(eqn):
        for sub in _sub_jaxprs(eqn):
          total += count(_open(sub), getattr(sub, "consts", None))
    return total

  closed = jax.make_jaxpr(fn)(*args)
  return count(closed.jaxpr, closed.consts)
