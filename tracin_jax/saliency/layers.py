"""Layers for the Grad-CAM family: a model's function split at one or more layers.

Grad-CAM needs a layer's activations A and dF/dA. Both come from one forward pass of

    forward(params, x, probes) -> (output, activations)

in which the layers' outputs have additive probes added (A_i + probe_i): A is recorded on
the way, and dF/dA_i is the gradient with respect to probe_i at probe_i = 0. `Layers` holds
such a function and the layers' names; it is built

* from a split of a pure function, `split_layer(features_fn, head_fn)`:
  `features_fn(params, x) -> A` and `head_fn(params, A) -> output` (any JAX model whose
  computation after the layer depends on A alone);
* from a Flax NNX model and submodule names, `NnxModel(model).layers("bottleneck", ...)`
  (or `.layer(name)`): the model is called with the named submodules temporarily wrapped,
  so that their outputs are recorded and probed in the model's own forward pass; skip
  connections, attention gates, anything, are handled without a split of the code.

How the NNX wrapping works: `nnx.intercept_methods` is not in flax 0.12.8 and
`nnx.capture`/`Module.perturb` need the model's code to call `perturb`. So each call merges
a fresh module from (graphdef, params, state) and changes the `__class__` of the named
submodules of that fresh copy to a subclass whose `__call__` calls the original and then a
hook (record A, add the probe). Nothing outside that throw-away copy is modified: the
user's model, its class and other instances are untouched, and under `jit` this happens
once per trace. A submodule called more than once per forward pass (a shared layer) is
refused.

Names are attribute paths: "bottleneck", "encoder[0]" (or "encoder.0"),
"last_hidden.conv2". `NnxModel.conv_blocks()` lists the model's top-level blocks that hold a
convolution (for the UNets: encoder[i], bottleneck, up[i], gates[i], decoder[i],
last_hidden, head); `Layers.call_order` gives the order in which a traced forward pass called
them.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import re
from typing import Any, Callable, Sequence

import jax
from flax import nnx

from tracin_jax.saliency import core
from tracin_jax.types import Array, Params

Forward = Callable[[Params, Array, Any], tuple[Any, tuple[Array, ...]]]


@dataclasses.dataclass(frozen=True, eq=False)
class Layers:
  """One or more layers of a model, as a probed forward function.

  Attributes:
    forward: forward(params, x, probes) -> (output, activations). `probes` is None (no
      probe) or a tuple with one array per layer, shaped as its activation; `activations`
      is a tuple of the layers' outputs A_i (before the probe is added), e.g.
      [N, h, w, K_i] for 2-D images or [N, d, h, w, K_i] for volumes; the output is the
      model's, computed with A_i + probe_i in place of A_i.
    names: one name per layer, in the order of `activations`.
    call_order: after a traced pass, the names in the order the model called them (None
      when not known; `split_layer` layers are in order by construction).

  Instances are compared and hashed by identity (they are static arguments of jitted
  methods): build them once and reuse them to avoid recompiling.
  """

  forward: Forward
  names: tuple[str, ...]
  _order: list = dataclasses.field(default_factory=list, repr=False)

  @property
  def call_order(self) -> tuple[str, ...] | None:
    return tuple(self._order) if self._order else None

  def activations(self, params: Params, x: Array) -> tuple[Array, ...]:
    """The layers' activations A_i at x (one forward pass)."""
    return self.forward(params, x, None)[1]

  def __len__(self) -> int:
    return len(self.names)


def split_layer(features_fn: Callable[[Params, Array], Array],
                head_fn: Callable[[Params, Array], Any], name: str = "layer") -> Layers:
  """A layer given as a split of the model: output = head_fn(params, features_fn(params, x)).

  Args:
    features_fn: (params, x [N, *spatial, C]) -> A [N, *spatial_l, K].
    head_fn: (params, A) -> output (what `apply_fn(params, x)` returns).
    name: the layer's name in results.
  """

  def forward(params, x, probes):
    activation = features_fn(params, x)
    probed = activation if probes is None else activation + probes[0]
    return head_fn(params, probed), (activation,)

  return Layers(forward=forward, names=(name,), _order=[name])


def as_layers(layer: Any) -> Layers:
  """A `Layers`, or a (features_fn, head_fn) pair made one with `split_layer`.

  Pairs are cached by identity of the two functions, so that passing the same pair again
  reuses the compiled method.
  """
  if isinstance(layer, Layers):
    return layer
  if isinstance(layer, tuple) and len(layer) == 2 and all(callable(f) for f in layer):
    return _split_cached(*layer)
  raise TypeError("layer must be a Layers (from split_layer or NnxModel.layer) or a "
                  f"(features_fn, head_fn) pair, got {layer!r}")


@functools.lru_cache(maxsize=128)
def _split_cached(features_fn, head_fn) -> Layers:
  return split_layer(features_fn, head_fn)


# ---------------------------------------------------------------------------------------------
# Flax NNX models.

_HOOKS: contextvars.ContextVar[dict[int, Callable[[Any], Any]]] = contextvars.ContextVar(
    "tracin_jax_saliency_hooks", default={})


@functools.lru_cache(maxsize=None)
def _hooked_class(cls: type) -> type:
  """A subclass of `cls` whose `__call__` passes the output through this call's hook."""

  def __call__(self, *args, **kwargs):
    out = cls.__call__(self, *args, **kwargs)
    hook = _HOOKS.get().get(id(self))
    return out if hook is None else hook(out)

  return type(f"Probed{cls.__name__}", (cls,),
              {"__call__": __call__, "__module__": cls.__module__,
               "__qualname__": f"Probed{cls.__qualname__}"})


def parse_name(name: str) -> tuple[str | int, ...]:
  """"encoder[0].conv1" or "encoder.0.conv1" -> ("encoder", 0, "conv1")."""
  parts: list[str | int] = []
  for token in re.findall(r"[^.\[\]]+", name):
    parts.append(int(token) if token.isdigit() else token)
  if not parts:
    raise ValueError(f"empty layer name {name!r}")
  return tuple(parts)


def format_name(path: Sequence[str | int]) -> str:
  """("encoder", 0, "conv1") -> "encoder[0].conv1"."""
  out = ""
  for part in path:
    out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
  return out


def _submodule(model: Any, path: tuple[str | int, ...], name: str) -> nnx.Module:
  node = model
  for part in path:
    try:
      node = node[part] if isinstance(part, int) else getattr(node, part)
    except (AttributeError, IndexError, KeyError, TypeError) as err:
      raise ValueError(f"model has no submodule {name!r} ({part!r} not found)") from err
  if not isinstance(node, nnx.Module):
    raise ValueError(f"{name!r} is a {type(node).__name__}, not an nnx.Module")
  return node


@contextlib.contextmanager
def _hooked(modules: Sequence[nnx.Module], hooks: Sequence[Callable[[Any], Any]]):
  """Within the block, calls of `modules[i]` pass their output through `hooks[i]`."""
  originals = [type(m) for m in modules]
  table = dict(_HOOKS.get())
  for module, hook in zip(modules, hooks):
    table[id(module)] = hook
  token = _HOOKS.set(table)
  try:
    for module, cls in zip(modules, originals):
      object.__setattr__(module, "__class__", _hooked_class(cls))
    yield
  finally:
    for module, cls in zip(modules, originals):
      object.__setattr__(module, "__class__", cls)
    _HOOKS.reset(token)


def _has_conv(module: nnx.Module) -> bool:
  """Whether a module is or holds a convolution (nnx.Conv/ConvTranspose, or a parameter
  of rank >= 3 such as an explicit [Cin, kh, kw, Cout] kernel)."""
  for _, sub in nnx.iter_modules(module):
    if isinstance(sub, (nnx.Conv, nnx.ConvTranspose)):
      return True
  for _, leaf in nnx.iter_graph(module):
    if isinstance(leaf, nnx.Param) and getattr(leaf, "ndim", 0) >= 3:
      return True
  return False


class NnxModel:
  """A Flax NNX model seen as `(apply_fn, params)` plus named layers for Grad-CAM.

      m = NnxModel(model)
      maps = vanilla_gradient(m.apply_fn, m.params, x, target)
      cam = grad_cam(m.apply_fn, m.params, x, target, layer=m.layer("bottleneck"))
      flow = information_flow(m.apply_fn, m.params, x, target, layers=m.layers())

  The model is split once, in evaluation mode (`nnx.view(..., use_running_average=True,
  deterministic=True)`), into graphdef, parameters (`nnx.Param`, the `params` pytree that
  methods differentiate or randomise) and the rest of the state; later updates of `model`
  are not seen. `apply_fn(params, x)` is `model(x)` with those parameters.

  Attributes:
    apply_fn: (params, x) -> output.
    params: an `nnx.State` of the parameter arrays.
  """

  def __init__(self, model: nnx.Module, **call_kwargs: Any):
    """Args:
      model: an nnx.Module whose `__call__(x, **call_kwargs)` returns the output.
      **call_kwargs: static keyword arguments of every call (e.g. none for the UNets).
    """
    view = nnx.view(model, use_running_average=True, deterministic=True,
                    raise_if_not_found=False)
    self.graphdef, self.params, self.state = nnx.split(view, nnx.Param, ...)
    self._call_kwargs = dict(call_kwargs)
    self._layers: dict[tuple[str, ...], Layers] = {}
    graphdef, state, kwargs = self.graphdef, self.state, self._call_kwargs

    def apply_fn(params: Params, x: Array):
      return nnx.merge(graphdef, params, state)(x, **kwargs)

    self.apply_fn = apply_fn

  def module(self, params: Params | None = None) -> nnx.Module:
    """A fresh module merged from the split (with `params` if given)."""
    return nnx.merge(self.graphdef, self.params if params is None else params, self.state)

  def conv_blocks(self) -> tuple[str, ...]:
    """Names of the top-level blocks that hold a convolution (list items expanded), in the
    order of the model's attributes; `information_flow` reorders them by call order."""
    model = self.module()
    names = []
    for path, sub in nnx.iter_modules(model):
      top = len(path) == 1 or (len(path) == 2 and isinstance(path[1], int))
      if not path or not top or isinstance(sub, nnx.List):
        continue
      if _has_conv(sub):
        names.append(format_name(path))
    return tuple(names)

  def layer(self, name: str) -> Layers:
    """The named submodule as a one-layer `Layers` (cached: the same object per name)."""
    return self.layers(name)

  def layers(self, *names: str) -> Layers:
    """The named submodules (all `conv_blocks()` when none is named) as one `Layers`,
    probed together in one forward pass. Cached per tuple of names.

    Raises:
      ValueError: for a name that is not a submodule.
    """
    names = tuple(names) if names else self.conv_blocks()
    if names in self._layers:
      return self._layers[names]
    paths = [parse_name(n) for n in names]
    model = self.module()
    for path, name in zip(paths, names):
      _submodule(model, path, name)  # fail early on a bad name
    graphdef, state, kwargs = self.graphdef, self.state, self._call_kwargs
    order: list[str] = []

    def forward(params, x, probes):
      module = nnx.merge(graphdef, params, state)
      subs = [_submodule(module, p, n) for p, n in zip(paths, names)]
      recorded: list[Any] = [None] * len(names)
      called: list[str] = []

      def make_hook(i):
        def hook(out):
          if recorded[i] is not None:
            raise ValueError(f"layer {names[i]!r} is called more than once in a forward "
                             "pass; a shared layer cannot be probed")
          recorded[i] = out
          called.append(names[i])
          return out if probes is None else out + probes[i]
        return hook

      with _hooked(subs, [make_hook(i) for i in range(len(names))]):
        output = module(x, **kwargs)
      missing = [n for n, a in zip(names, recorded) if a is None]
      if missing:
        raise ValueError(f"layers {missing} were not called in the forward pass")
      order[:] = called
      return output, tuple(recorded)

    layers = Layers(forward=forward, names=names, _order=order)
    self._layers[names] = layers
    return layers

  def param_groups_in_call_order(self, x: Array) -> tuple[str, ...]:
    """Top-level parameter groups ("encoder[0]", ..., "head") in the order the forward pass
    at x's shape calls them: the input-to-output layer order for `parameter_randomisation`
    (which cascades from the last). Groups never called are put last."""
    blocks = [n for n in self.conv_blocks()]
    groups = list(core.param_group_names(self.params))
    layers = self.layers(*[g for g in groups if g in blocks] or blocks)
    jax.eval_shape(lambda p, xx: layers.forward(p, xx, None), self.params,
                   jax.ShapeDtypeStruct(x.shape, x.dtype))
    order = list(layers.call_order or layers.names)
    return tuple(order + [g for g in groups if g not in order])

