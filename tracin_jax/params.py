"""Parameter pytrees by name: top-level groups (layers), and restricting to a subset.

A parameter's group is the first key of its path, with the next one when that is a list
index: "encoder[0]", "bottleneck", "head" for the UNets' `nnx.State`; "layers[1]" for
{"layers": [w0, w1]}; "" for a bare array. Its path is the keys joined by "/"
("head/kernel"). Saliency randomisation and TracIn's cascading randomisation replace whole
groups; `influence(..., params_filter=...)` keeps the parameters a filter selects.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax

from tracin_jax.types import PyTree

ParamsFilter = Callable[[str], bool] | str | Sequence[str]


def _key_part(key: Any) -> str | int:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return str(key)


def group_of(path: tuple) -> str:
  """The group of a leaf's key path (see the module docstring)."""
  if not path:
    return ""
  parts = [_key_part(k) for k in path]
  group = [parts[0]]
  if len(parts) > 1 and isinstance(parts[1], int):
    group.append(parts[1])
  return "".join(f"[{p}]" if isinstance(p, int) else str(p) for p in group)


def path_name(path: tuple) -> str:
  """A leaf's key path as "a/b/c" (list indices as numbers)."""
  return "/".join(str(_key_part(k)) for k in path)


def group_names(params: PyTree) -> tuple[str, ...]:
  """Top-level groups of a params pytree, in its flattening order.

  The flattening order of a dict or an `nnx.State` is its sorted keys, not the network's
  order (for NNX models, `saliency.NnxModel.param_groups_in_call_order` gives that)."""
  names: list[str] = []
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = group_of(path)
    if name not in names:
      names.append(name)
  return tuple(names)


def group_mask(params: PyTree, group: str) -> PyTree:
  """A pytree of bools like `params`: True for the leaves of a top-level group."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  return jax.tree.unflatten(treedef, [group_of(path) == group for path, _ in flat])


def replace_groups(params: PyTree, other: PyTree, groups: Sequence[str]) -> PyTree:
  """`params` with the leaves of `groups` taken from `other` (same structure).

  Raises:
    ValueError: `other` has another structure, or a group is not in `params`.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  other_leaves, other_def = jax.tree.flatten(other)
  if other_def != treedef:
    raise ValueError("replace_groups: the two parameter pytrees differ in structure.")
  unknown = set(groups) - set(group_names(params))
  if unknown:
    raise ValueError(f"replace_groups: no group {sorted(unknown)}; the groups are "
                     f"{group_names(params)}.")
  names = set(groups)
  # The taken leaves are placed as the ones they replace: jit's cache tells committed arrays
  # (restored from a checkpoint) from uncommitted ones (fresh from an initialiser), and a
  # mix of placements would compile every mixture anew.
  return jax.tree.unflatten(treedef, [
      _placed_like(o, leaf) if group_of(path) in names else leaf
      for (path, leaf), o in zip(flat, other_leaves)])


def _placed_like(x, like):
  if isinstance(like, jax.Array) and getattr(like, "committed", False):
    return jax.device_put(x, like.sharding)
  return x


def as_predicate(params_filter: ParamsFilter) -> Callable[[str], bool]:
  """A filter as `predicate(path) -> bool`: a callable is kept; a string or a sequence of
  strings selects the paths that equal one or start with one followed by "/" or "[" (so
  "head" selects "head/kernel" and "head/bias", "encoder" every encoder level)."""
  if callable(params_filter):
    return params_filter
  prefixes = (params_filter,) if isinstance(params_filter, str) else tuple(params_filter)
  if not prefixes or not all(isinstance(p, str) for p in prefixes):
    raise ValueError(f"params_filter must be a callable, a path prefix or a sequence of "
                     f"them, got {params_filter!r}.")

  def predicate(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") or path.startswith(p + "[")
               for p in prefixes)

  return predicate


def selection(params: PyTree, params_filter: ParamsFilter) -> tuple[bool, ...]:
  """Which leaves of `params` (in flattening order) the filter keeps.

  Raises:
    ValueError: the filter keeps no parameter.
  """
  predicate = as_predicate(params_filter)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  mask = tuple(bool(predicate(path_name(path))) for path, _ in flat)
  if not any(mask):
    raise ValueError("params_filter selects no parameter; the paths are "
                     f"{[path_name(p) for p, _ in flat][:8]}...")
  return mask


def split(params: PyTree, mask: Sequence[bool]) -> tuple[list, list]:
  """(kept leaves, other leaves), each a list in flattening order."""
  leaves = jax.tree.leaves(params)
  return ([x for x, m in zip(leaves, mask) if m], [x for x, m in zip(leaves, mask) if not m])


def merge(treedef, mask: Sequence[bool], kept: Sequence, others: Sequence) -> PyTree:
  """Inverse of `split`: the full pytree from its kept and other leaves."""
  kept, others = iter(kept), iter(others)
  return jax.tree.unflatten(treedef, [next(kept) if m else next(others) for m in mask])
