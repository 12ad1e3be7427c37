"""UNet variants for multiclass segmentation, in 2D or 3D, registered by name.

    model = get_model("unet", base_width=16, depth=4)        # nnx.Module
    logits = model(images)                                   # [N, H, W, 4] -> [N, H, W, 4]
    logits, hidden = model(images, return_hidden=True)       # hidden: [N, H, W, base_width]
    apply_fn, params, state = functional(model)              # pure function of the params
    volumes = get_model("unet", spatial_dims=3)     # [N, D, H, W, 4] -> [N, D, H, W, 4]

The four variants ("unet", "resunet", "attention_unet", "deepseg") are one class, `UNet`,
whose subclasses only change three class constants: residual blocks, attention gates on the
skip connections, and how the decoder upsamples. All blocks come from `layers.py`.

Spatial rank. `spatial_dims=2` (the default, the paper's) takes axial slices [N, H, W, C];
`spatial_dims=3` takes whole volumes [N, D, H, W, C] (D the axial slices), with the same
architecture by rank: 3x3x3 kernels, 2x2x2 pooling and upsampling, 1x1x1 heads and gates.
A 3D 3x3x3 kernel has 3 times the 2D one's parameters, a 2x2x2 up-convolution 2 times, a
1x1x1 kernel as many. On a volume whose slices are all the same image, a 3D model whose
3x3x3 kernels hold the 2D kernels in their centre depth plane (the 2x2x2 ones in both
planes) computes the 2D model's output on every slice (`tests/models/models_volume_test.py`).
`conv3d="stacked"` computes the 3x3x3 convolutions as 2D ones over depth-stacked channels
(`layers.DepthStackedConv`): the same model and parameters, several times faster on CPU.

Architecture. `depth` down-sampling levels; level i has width base_width * 2**i and the
bottleneck base_width * 2**depth. Each encoder level is a `ConvBlock` (two 3x3 conv + norm +
ReLU) followed by 2x2 max pooling; each decoder level upsamples (to the level's width),
concatenates the skip connection (skip first, then the upsampled features) and applies a
`ConvBlock`. The finest decoder block is the last hidden layer, the submodule named
`LAST_HIDDEN` ("last_hidden"), with `last_hidden_channels = base_width` feature maps; a 1x1
convolution (`head`) maps it to the class logits. The paper's configuration (64 feature
maps in the last hidden layer) is base_width=64.

Normalisation. The default is GroupNorm: it normalises each example on its own, so the
model is the same function in training and evaluation, the prediction for one example does
not depend on the others in its batch, and the per-example gradients that influence (TracIn)
needs are well defined. BatchNorm ("batch") is offered for comparison; `functional` puts it in
evaluation mode (running statistics), which makes it per-example too. "none" uses no norm
(the convolutions then have biases).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tracin_jax import draws
from tracin_jax.models import layers
from tracin_jax.models.layers import (NORMS, AttentionGate, ConvBlock, Upsample,
                                     check_spatial_dims, max_pool2)
from tracin_jax.types import Array, Params, State

LAST_HIDDEN = "last_hidden"

ModuleT = TypeVar("ModuleT", bound=nnx.Module)

_MODELS: dict[str, type["UNet"]] = {}


def register_model(name: str) -> Callable[[type["UNet"]], type["UNet"]]:
  """Class decorator that registers a model class under `name` (scenic's model registry).

  Raises:
    ValueError: if `name` is already registered.
  """

  def register(cls: type[UNet]) -> type[UNet]:
    if name in _MODELS:
      raise ValueError(f"model {name!r} is already registered to {_MODELS[name].__name__}")
    _MODELS[name] = cls
    return cls

  return register


def list_models() -> list[str]:
  """Names of the registered models, sorted."""
  return sorted(_MODELS)


def get_model_cls(name: str) -> type["UNet"]:
  """The model class registered under `name`.

  Raises:
    ValueError: for an unknown name; the message lists the known ones.
  """
  if name not in _MODELS:
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
  return _MODELS[name]


def apply_channel_mask(hidden: Array, channel_mask: Array) -> Array:
  """Multiplies feature maps by a per-channel mask.

  Args:
    hidden: [N, *spatial, C] feature maps ([N, H, W, C] or [N, D, H, W, C]).
    channel_mask: [C] (the same mask for every example) or [N, C] (one per example).

  Returns:
    [N, *spatial, C]: hidden * mask, broadcast over the spatial axes.

  Raises:
    ValueError: if the mask's shape is neither [C] nor [N, C].
  """
  mask = jnp.asarray(channel_mask, hidden.dtype)
  n, *spatial, c = hidden.shape
  if mask.shape == (c,):
    return hidden * mask
  if mask.shape == (n, c):
    return hidden * mask[(slice(None), *(None for _ in spatial), slice(None))]
  raise ValueError(
      f"channel_mask has shape {mask.shape}; expected [C]=({c},) or [N, C]=({n}, {c})")


@register_model("unet")
class UNet(nnx.Module):
  """The standard UNet (Ronneberger et al., 2015) that the paper uses, in 2D (the paper's)
  or in 3D, the same network by spatial rank (as Cicek et al.'s 3D U-Net, 2016, extends it).

  Plain `ConvBlock`s, 2x2 (2x2x2) transposed convolutions to upsample, skips concatenated
  as they are.

  Attributes:
    LAST_HIDDEN: "last_hidden", the attribute name of the last hidden layer (a `ConvBlock`);
      `getattr(model, model.LAST_HIDDEN)` is that submodule and its parameters sit under
      that key of `nnx.state(model)`.
    last_hidden_channels: C, the number of feature maps of the last hidden layer
      (= base_width).
    depth, base_width, norm, num_classes, in_channels, spatial_dims, conv3d: the
      constructor's arguments.
  """

  LAST_HIDDEN: ClassVar[str] = LAST_HIDDEN
  # What the variants change; nothing else differs between them.
  residual: ClassVar[bool] = False
  attention: ClassVar[bool] = False
  upsample: ClassVar[str] = "transpose"

  def __init__(self, *, base_width: int = 16, depth: int = 4, norm: str = "group",
               num_classes: int = 4, in_channels: int = 4, norm_groups: int = 8,
               background_bias: float = 0.0, spatial_dims: int = 2, conv3d: str = "direct",
               rngs: nnx.Rngs):
    """Builds the model.

    Args:
      base_width: width of the first level and of the last hidden layer; it doubles at each
        level down.
      depth: number of 2x2 (2x2x2) down-sampling levels (>= 1); H and W (and D) must be
        divisible by 2**depth.
      norm: "group" (default, per-example), "batch" or "none"; see the module docstring.
      num_classes: K, the number of output logits per pixel (background included).
      in_channels: input channels (4 MRI modalities: T1, T1Gd, T2, FLAIR).
      norm_groups: the most groups GroupNorm uses (gcd with the width is taken).
      background_bias: initial bias of the head's class-0 (background) logit, a prior
        p_bg of about e^b / (e^b + K - 1) at initialisation. A Dice loss that excludes the
        background (eq 2) barely pushes a uniform start towards background on the small
        tumour classes; a prior of 3 lets training start from a mostly-background prediction.
      spatial_dims: 2 for slices [N, H, W, in_channels] (3x3 kernels), 3 for volumes
        [N, D, H, W, in_channels] (3x3x3 kernels); see the module docstring.
      conv3d: how the 3x3x3 convolutions are computed, "direct" (one 3D convolution) or
        "stacked" (one 2D convolution of depth-stacked channels: the same layer, several
        times faster on CPU); see `layers.DepthStackedConv`. 3D models only.
      rngs: random streams for the initialisation.

    Raises:
      ValueError: for a non-positive width, depth or class count, an unknown norm, or a
        `spatial_dims` other than 2 or 3, or an unknown or misplaced `conv3d`.
    """
    for arg, value in (("base_width", base_width), ("depth", depth),
                       ("num_classes", num_classes), ("in_channels", in_channels),
                       ("norm_groups", norm_groups)):
      if value < 1:
        raise ValueError(f"{arg} must be >= 1, got {value}")
    if norm not in NORMS:
      raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
    self.spatial_dims = check_spatial_dims(spatial_dims)
    self.conv3d = layers.check_conv3d(conv3d, spatial_dims)
    self.base_width = base_width
    self.depth = depth
    self.norm = norm
    self.num_classes = num_classes
    self.in_channels = in_channels
    self.last_hidden_channels = base_width

    widths = [base_width * 2**level for level in range(depth + 1)]

    def block(c_in: int, c_out: int) -> ConvBlock:
      return ConvBlock(c_in, c_out, norm=norm, residual=self.residual,
                       norm_groups=norm_groups, spatial_dims=spatial_dims, conv3d=conv3d,
                       rngs=rngs)

    self.encoder = nnx.List(
        [block(c_in, c_out) for c_in, c_out in zip([in_channels, *widths[:depth - 1]],
                                                   widths[:depth])])
    self.bottleneck = block(widths[depth - 1], widths[depth])
    # Decoder levels from coarse to fine: depth - 1, ..., 1, then 0 (the last hidden layer).
    levels = list(reversed(range(depth)))
    self.up = nnx.List(
        [Upsample(widths[i + 1], widths[i], mode=self.upsample, spatial_dims=spatial_dims,
                  conv3d=conv3d, rngs=rngs) for i in levels])
    self.gates = (
        nnx.List([AttentionGate(widths[i], widths[i], max(widths[i] // 2, 1),
                                spatial_dims=spatial_dims, rngs=rngs)
                  for i in levels])
        if self.attention else None)
    self.decoder = nnx.List([block(2 * widths[i], widths[i]) for i in levels[:-1]])
    self.last_hidden = block(2 * widths[0], widths[0])
    self.head = layers.conv(widths[0], num_classes, layers.window(1, spatial_dims),
                            rngs=rngs)
    if background_bias:
      self.head.bias[...] = self.head.bias[...].at[0].set(background_bias)

  def _check_input(self, images: Array) -> None:
    c = self.in_channels
    if images.ndim != self.spatial_dims + 2 or images.shape[-1] != c:
      want = (f"[N, H, W, {c}] (a model of spatial_dims=2; volumes [N, D, H, W, {c}] need "
              "spatial_dims=3)" if self.spatial_dims == 2 else
              f"[N, D, H, W, {c}] (a model of spatial_dims=3; slices [N, H, W, {c}] need "
              "spatial_dims=2)")
      raise ValueError(f"images must be {want}, got shape {tuple(images.shape)}")
    spatial = images.shape[1:-1]
    factor = 2**self.depth
    if any(size % factor for size in spatial):
      what = "image size" if self.spatial_dims == 2 else "volume size (D x H x W)"
      raise ValueError(
          f"{what} {'x'.join(map(str, spatial))} of images of shape {tuple(images.shape)} is "
          f"not divisible by 2**depth = {factor} (depth={self.depth}); crop, pad or resize "
          f"them to a multiple of {factor}, or lower the depth")

  def __call__(self, images: Array, *, channel_mask: Array | None = None,
               return_hidden: bool = False) -> Array | tuple[Array, Array]:
    """Class logits for every pixel (voxel).

    Args:
      images: [N, H, W, in_channels] float32 (spatial_dims=2) or [N, D, H, W, in_channels]
        (spatial_dims=3), every spatial size divisible by 2**depth.
      channel_mask: None, [C] or [N, C] with C = last_hidden_channels; multiplies the last
        hidden layer's feature maps before the head (0 masks a feature map out).
      return_hidden: also return the last hidden layer's feature maps.

    Returns:
      logits [N, *spatial, num_classes] float32 ([N, H, W, K] or [N, D, H, W, K]); with
      `return_hidden`, (logits, hidden) where hidden [N, *spatial, C] are the features after
      the last hidden layer's ReLU, *before* the channel mask is applied (the mask only
      changes the logits).

    Raises:
      ValueError: for images of the wrong rank, channel count or size, or a mask of the
        wrong shape.
    """
    self._check_input(images)
    x = images
    skips = []
    for block in self.encoder:
      x = block(x)
      skips.append(x)
      x = max_pool2(x)
    x = self.bottleneck(x)
    for i, (up, block) in enumerate(zip(self.up, [*self.decoder, self.last_hidden])):
      x = up(x)
      skip = skips[-1 - i]
      if self.gates is not None:
        skip = self.gates[i](skip, x)
      x = block(jnp.concatenate([skip, x], axis=-1))
    hidden = x
    logits = self.head(hidden if channel_mask is None else apply_channel_mask(hidden, channel_mask))
    return (logits, hidden) if return_hidden else logits


@register_model("resunet")
class ResUNet(UNet):
  """UNet with residual blocks (ResUNet): each `ConvBlock` adds its (projected) input."""

  residual = True


@register_model("attention_unet")
class AttentionUNet(UNet):
  """Attention U-Net (Oktay et al., 2018): additive attention gates scale each skip
  connection by a [N, *spatial, 1] map computed from the skip and the upsampled decoder
  features.
  """

  attention = True


@register_model("deepseg")
class DeepSeg(UNet):
  """DeepSeg-style encoder-decoder (Zeineldin et al., 2020): the decoder upsamples by a
  nearest-neighbour resize followed by a 3x3 (3x3x3) convolution instead of a transposed
  convolution.

  The original's dropout is left out so that the model is a deterministic function of its
  parameters, as influence scores need; it uses the norm chosen here (default GroupNorm)
  rather than the original's BatchNorm.
  """

  upsample = "resize"


def get_model(name: str, *, base_width: int = 16, depth: int = 4, norm: str = "group",
              num_classes: int = 4, in_channels: int = 4, spatial_dims: int = 2,
              conv3d: str = "direct", seed: int = 0, rngs: nnx.Rngs | None = None,
              **kwargs: Any) -> UNet:
  """Builds the model registered under `name`.

  The parameters are those of the plain construction, `cls(..., rngs=rngs)`, bit for bit,
  and `rngs` is left as that would leave it; but the random draws are made together, in one
  compiled call (see `build`), not one compiled draw per parameter shape: a demo model
  (base width 8, depth 3) is built in a fresh process in 1 to 2.5 s rather than 6 to 17 s
  on a busy 2-core machine, the paper's (base width 64) in 2 to 4 s rather than 6 to 14 s
  (`benchmarks/model_init.py`).

  Args:
    name: one of `list_models()`.
    base_width, depth, norm, num_classes, in_channels: see `UNet.__init__`.
    spatial_dims: 2 (slices [N, H, W, C], the default) or 3 (volumes [N, D, H, W, C]).
    conv3d: "direct" or "stacked" (3D only): how 3x3x3 convolutions are computed; see
      `UNet.__init__`.
    seed: initialisation seed, used when `rngs` is None: the streams are then
      `nnx.Rngs(jax.random.key(seed, impl="rbg"))`, so `seed=s` and `rngs=nnx.Rngs(s)`
      (threefry, JAX's default) give different parameters. RBG was chosen when each draw
      was compiled on its own (XLA:CPU compiles RBG's draws faster); its bits may differ
      across backends (CPU vs GPU). Pass `rngs` for another generator.
    rngs: random streams; takes precedence over `seed`.
    **kwargs: further constructor arguments (e.g. `norm_groups`).

  Returns:
    The initialised model (an `nnx.Module`, in training mode).

  Raises:
    ValueError: for an unknown name (the message lists the known ones) or bad arguments.
  """
  cls = get_model_cls(name)
  return build(lambda r: cls(base_width=base_width, depth=depth, norm=norm,
                             num_classes=num_classes, in_channels=in_channels,
                             spatial_dims=spatial_dims, conv3d=conv3d, rngs=r, **kwargs),
               _default_rngs(seed) if rngs is None else rngs)


def _default_rngs(seed: int) -> nnx.Rngs:
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def build(construct: Callable[[nnx.Rngs], ModuleT], rngs: nnx.Rngs) -> ModuleT:
  """`construct(rngs)`, its `tracin_jax.draws.lecun_normal` draws made in one compiled call.

  Eagerly, each draw of a new shape is compiled on its own (about 0.2 s each on XLA:CPU,
  some twenty per model). Here the construction first runs on a copy of `rngs` recording
  its draws (`draws.recording`: the keys, shapes and fan-ins; the draws return zeros and
  that first module is dropped), they are drawn together (`draws.lecun_normal_together`),
  and the construction runs again on `rngs` itself, each draw replaced by its value
  (`draws.replaying`, which checks that the same draws come in the same order). The result
  is the plain construction's: the same parameters bit for bit, and `rngs` advanced as that
  advances it. Other initialisers (zeros, ones, or draws not made through
  `draws.lecun_normal`) run as they are, twice.

  The construction runs once, as it is, under a transform (`jax.jit`, `nnx.eval_shape`:
  the keys are traced, and tracing compiles nothing) and for keys that cannot be drawn
  together (`draws.drawn_together`: threefry with `jax_threefry_partitionable` off).

  Args:
    construct: builds a module from random streams; it must ask for the same draws in the
      same order every time it runs.
    rngs: the streams.

  Returns:
    The module `construct(rngs)` returns.

  Raises:
    RuntimeError: when the second run asks for other draws than the first.
  """
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(nnx.state(rngs))):
    return construct(rngs)
  with draws.recording() as record:
    construct(nnx.clone(rngs))
  if not record.together or not record.requests:
    return construct(rngs)
  with draws.replaying(record.requests, draws.lecun_normal_together(record.requests)):
    return construct(rngs)


def functional(model: nnx.Module) -> tuple[Callable[..., Any], Params, State]:
  """A pure-function view of `model` in evaluation mode, for JAX transforms.

  The model is split once into its graph definition, its parameters (`nnx.Param`) and the
  rest of its state (BatchNorm running statistics, if any; an empty `nnx.State` otherwise),
  taken from an evaluation-mode view (`nnx.view(..., use_running_average=True)`); `model`
  itself is left as it is. The returned function merges them back on each call, so it can
  be `jax.jit`-ed, `jax.grad`-ed with respect to `params` and `jax.vmap`-ped over examples
  (each example as a batch of one, [1, H, W, C] or [1, D, H, W, C]); with GroupNorm or
  eval-mode BatchNorm each example's output does not depend on the rest of the batch. Later
  updates of `model` are not seen: call again. Models of one architecture without state
  besides their parameters (GroupNorm or no norm) get the same `apply_fn` object, so that
  what is compiled for one serves them all.

  The state is returned, and passed, explicitly: models of several checkpoints share one
  `apply_fn` (one compiled function) and each passes its own state, as TracIn does with
  `tracin_jax.Checkpoint(params, learning_rate, state)`.

  Returns:
    (apply_fn, params, state):
      apply_fn(params, images, state=None, channel_mask=None, return_hidden=False) computes
        `model(images, channel_mask=channel_mask, return_hidden=return_hidden)` with the
        given params and state (None: the state `model` had when `functional` was called):
        logits [N, *spatial, K] (and hidden [N, *spatial, C] with return_hidden). `return_hidden`
        changes the output structure: keep it static under jit
        (`jax.jit(apply_fn, static_argnames="return_hidden")` or a closure).
      params: an `nnx.State` pytree of the parameter arrays.
      state: an `nnx.State` pytree of the other arrays (empty for GroupNorm models).
  """
  eval_view = nnx.view(model, use_running_average=True, deterministic=True,
                       raise_if_not_found=False)
  graphdef, params, own_state = nnx.split(eval_view, nnx.Param, ...)
  if jax.tree.leaves(own_state):  # its default state is its own: a function of its own
    return _apply_fn(graphdef, own_state), params, own_state
  if graphdef not in _SHARED_APPLY:
    _SHARED_APPLY[graphdef] = _apply_fn(graphdef, own_state)
  return _SHARED_APPLY[graphdef], params, own_state


# One apply_fn per architecture for models with no state besides their parameters (GroupNorm,
# no norm): every checkpoint, random network and retrained model of an architecture, in
# every stage of a process, then shares the functions compiled for it (a loss built on it by
# `segmentation.make_region_losses` is the same object too, and so are its compiled
# per-example gradients). A graph definition holds no arrays, only the structure.
_SHARED_APPLY: dict[Any, Callable[..., Any]] = {}


def _apply_fn(graphdef, own_state: State) -> Callable[..., Any]:

  def apply_fn(params: Params, images: Array, state: State | None = None,
               channel_mask: Array | None = None,
               return_hidden: bool = False) -> Array | tuple[Array, Array]:
    module = nnx.merge(graphdef, params, own_state if state is None else state)
    return module(images, channel_mask=channel_mask, return_hidden=return_hidden)

  return apply_fn


def count_params(params: Params | nnx.Module) -> int:
  """Number of scalar parameters in a params pytree (or in a module's `nnx.Param`s)."""
  if isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(params)))
