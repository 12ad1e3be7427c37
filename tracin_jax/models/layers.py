"""Building blocks shared by every segmentation model in `tracin_jax.models`.

All four UNet variants are built from the same three modules: `ConvBlock` (two 3x3
convolutions, optionally residual), `Upsample` (transposed convolution or nearest resize
followed by a convolution) and `AttentionGate`. A variant is a choice of their arguments,
never a copy of them.

Every block works in 2D or 3D, chosen by `spatial_dims` (2, the default, or 3): one code
path by spatial rank, the kernels 3x3 or 3x3x3, the pooling and upsampling 2x2 or 2x2x2.
Layout is channels-last throughout: images and feature maps are [N, H, W, C] in 2D,
volumes [N, D, H, W, C] in 3D (D the axial slices); [N, *spatial, C] below stands for both.

How a 3x3x3 convolution is computed (`conv3d`, 3D only): "direct" is one 3D
`lax.conv_general_dilated`; "stacked" (`DepthStackedConv`) is one 2D 3x3 convolution of the
three depth-shifted copies of the input stacked as channels, [N * D, H, W, 3 C], with the
same kernel rearranged to [3, 3, 3 C, Cout]: the same products and sums, the same parameters
(a checkpoint of either opens in the other), results equal to rounding. XLA:CPU runs 2D
convolutions through its fast kernels and 3D ones mostly on its own loop, so "stacked" is
several times faster there (`benchmarks/volume_model.py`). "direct" stays the default: the
layer-wise methods that read a convolution's kernel where a `conv_general_dilated` uses it
(LoGra's factors) see a stacked kernel only through its rearrangement and treat it as a
plain parameter.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
from flax import nnx

from tracin_jax import draws

NORMS: tuple[str, ...] = ("group", "batch", "none")
UPSAMPLE_MODES: tuple[str, ...] = ("transpose", "resize")
SPATIAL_DIMS: tuple[int, ...] = (2, 3)
CONV3D_MODES: tuple[str, ...] = ("direct", "stacked")


def check_spatial_dims(spatial_dims: int) -> int:
  """Returns `spatial_dims` if it is 2 (images [N, H, W, C]) or 3 (volumes [N, D, H, W, C]).

  Raises:
    ValueError: for anything else (another number, a bool, a float, a string).
  """
  if (isinstance(spatial_dims, bool) or not isinstance(spatial_dims, numbers.Integral)
      or spatial_dims not in SPATIAL_DIMS):
    raise ValueError(f"spatial_dims must be 2 (images [N, H, W, C]) or 3 (volumes "
                     f"[N, D, H, W, C]), got {spatial_dims!r}")
  return int(spatial_dims)


def window(size: int, spatial_dims: int) -> tuple[int, ...]:
  """The square (cubic) window `(size,) * spatial_dims`: (3, 3) in 2D, (3, 3, 3) in 3D."""
  return (size,) * check_spatial_dims(spatial_dims)


def check_conv3d(conv3d: str, spatial_dims: int) -> str:
  """Returns `conv3d` if it is one of `CONV3D_MODES` and fits `spatial_dims`.

  Raises:
    ValueError: an unknown mode, "stacked" for a 2D model (it rearranges 3D kernels), or
      a `spatial_dims` other than 2 or 3.
  """
  check_spatial_dims(spatial_dims)
  if conv3d not in CONV3D_MODES:
    raise ValueError(f"conv3d must be one of {CONV3D_MODES}, got {conv3d!r}")
  if conv3d == "stacked" and spatial_dims != 3:
    raise ValueError("conv3d='stacked' computes 3x3x3 convolutions: it needs spatial_dims=3 "
                     f"(volumes), got spatial_dims={spatial_dims}")
  return conv3d


class DepthStackedConv(nnx.Conv):
  """A 3x3x3, stride-1, "SAME" `nnx.Conv` computed as one 2D convolution.

  Output voxel (d, h, w) is sum over a, b, e in {0, 1, 2} of x[d + a - 1, h + b - 1,
  w + e - 1] @ kernel[a, b, e] (zero outside the volume). Stacking x[d - 1], x[d], x[d + 1]
  (zero-padded in depth) as 3 C channels of one slice turns the sum over a into part of a
  2D 3x3 convolution's sum over input channels, with the kernel [3, 3, 3, C, Cout] read as
  [3, 3, 3 C, Cout] (axes b, e, then a and C). Parameters, initialisation and results are
  those of `nnx.Conv`; only the computation differs. Maps [N, D, H, W, C] ->
  [N, D, H, W, Cout].
  """

  def __call__(self, inputs: jax.Array) -> jax.Array:
    kernel = self.kernel[...]
    n, d, h, w, c = inputs.shape
    padded = jnp.pad(inputs, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
    stacked = jnp.concatenate([padded[:, a:a + d] for a in range(3)], axis=-1)
    y = jax.lax.conv_general_dilated(
        stacked.reshape(n * d, h, w, 3 * c).astype(kernel.dtype),
        kernel.transpose(1, 2, 0, 3, 4).reshape(3, 3, 3 * c, -1),
        (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=self.precision)
    y = y.reshape(n, d, h, w, -1)
    return y if self.bias is None else y + self.bias[...]


def conv(in_channels: int, out_channels: int, kernel_size: tuple[int, ...], *,
         rngs: nnx.Rngs, conv3d: str = "direct", **kwargs) -> nnx.Conv:
  """`nnx.Conv` with its default initialisation (LeCun normal kernel, zero bias), drawn by
  `tracin_jax.draws`: the same values, compiled several times faster on XLA:CPU.

  With `conv3d="stacked"` a 3x3x3 kernel gives a `DepthStackedConv` (the same layer,
  computed as a 2D convolution); other kernel sizes stay `nnx.Conv`.
  """
  stacked = conv3d == "stacked" and tuple(kernel_size) == (3, 3, 3)
  if stacked and (kwargs.get("strides", 1) not in (1, (1, 1, 1))
                  or kwargs.get("padding", "SAME") != "SAME"):
    raise ValueError("conv3d='stacked' takes stride-1 'SAME' convolutions only")
  cls = DepthStackedConv if stacked else nnx.Conv
  return cls(in_channels, out_channels, kernel_size,
             kernel_init=draws.lecun_normal(), rngs=rngs, **kwargs)


def make_norm(norm: str, channels: int, *, norm_groups: int,
              rngs: nnx.Rngs) -> nnx.Module | None:
  """Returns the normalisation layer for `channels` feature maps, or None for "none".

  Args:
    norm: "group" (GroupNorm with gcd(channels, norm_groups) groups), "batch" (BatchNorm,
      running statistics used in eval mode) or "none".
    channels: number of feature maps C it normalises.
    norm_groups: the largest number of groups GroupNorm uses; the actual number is the
      greatest common divisor with `channels`, so every width is valid.
    rngs: random streams (unused by the norms' deterministic initialisation, required by nnx).

  Raises:
    ValueError: for an unknown `norm`.
  """
  if norm == "group":
    return nnx.GroupNorm(channels, num_groups=math.gcd(channels, norm_groups), rngs=rngs)
  if norm == "batch":
    return nnx.BatchNorm(channels, rngs=rngs)
  if norm == "none":
    return None
  raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")


def _apply(layer: nnx.Module | None, x: jax.Array) -> jax.Array:
  return x if layer is None else layer(x)


def max_pool2(x: jax.Array) -> jax.Array:
  """Max pooling over 2x2 (2x2x2) windows with stride 2, for any spatial rank:
  [N, H, W, C] -> [N, H/2, W/2, C], [N, D, H, W, C] -> [N, D/2, H/2, W/2, C] (sizes even).

  A reshape and a max rather than `reduce_window`: the same values, and its gradient is a
  cheap elementwise mask on XLA:CPU instead of a select-and-scatter.
  """
  n, *spatial, c = x.shape
  split = [n, *(d for size in spatial for d in (size // 2, 2)), c]
  return x.reshape(split).max(axis=tuple(range(2, 2 * len(spatial) + 1, 2)))


def upsample_nearest2(x: jax.Array) -> jax.Array:
  """Nearest-neighbour 2x upsampling along every spatial axis:
  [N, H, W, C] -> [N, 2H, 2W, C], [N, D, H, W, C] -> [N, 2D, 2H, 2W, C]."""
  n, *spatial, c = x.shape
  # x[:, :, None, :, None, :] in 2D: a new axis of 2 after each spatial axis.
  x = x[(slice(None), *(i for _ in spatial for i in (slice(None), None)), slice(None))]
  x = jnp.broadcast_to(x, (n, *(d for size in spatial for d in (size, 2)), c))
  return x.reshape(n, *(2 * size for size in spatial), c)


class ConvBlock(nnx.Module):
  """Two 3x3 (3x3x3) convolutions, each followed by a norm; ReLU after each.

  With `residual=True` the input (projected by a 1x1 (1x1x1) convolution when the widths
  differ) is added before the second ReLU, as in a ResNet basic block; this is the only
  difference between the plain and the residual variants.

  Maps [N, *spatial, in_channels] -> [N, *spatial, out_channels] (`spatial_dims` spatial
  axes, zero-padded "SAME" convolutions); the output is non-negative.
  """

  def __init__(self, in_channels: int, out_channels: int, *, norm: str,
               residual: bool = False, norm_groups: int = 8, spatial_dims: int = 2,
               conv3d: str = "direct", rngs: nnx.Rngs):
    # A bias before a norm with a learned offset is redundant: keep it only without norm.
    use_bias = norm == "none"
    k3, k1 = window(3, spatial_dims), window(1, spatial_dims)
    check_conv3d(conv3d, spatial_dims)
    self.conv1 = conv(in_channels, out_channels, k3, use_bias=use_bias, conv3d=conv3d,
                      rngs=rngs)
    self.norm1 = make_norm(norm, out_channels, norm_groups=norm_groups, rngs=rngs)
    self.conv2 = conv(out_channels, out_channels, k3, use_bias=use_bias, conv3d=conv3d,
                      rngs=rngs)
    self.norm2 = make_norm(norm, out_channels, norm_groups=norm_groups, rngs=rngs)
    self.residual = residual
    self.shortcut = (
        conv(in_channels, out_channels, k1, rngs=rngs)
        if residual and in_channels != out_channels else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.relu(_apply(self.norm1, self.conv1(x)))
    h = _apply(self.norm2, self.conv2(h))
    if self.residual:
      h = h + _apply(self.shortcut, x)
    return jax.nn.relu(h)


class Upsample(nnx.Module):
  """2x spatial upsampling that also changes the width: [N, H, W, Cin] -> [N, 2H, 2W, Cout]
  in 2D, [N, D, H, W, Cin] -> [N, 2D, 2H, 2W, Cout] in 3D.

  mode "transpose": the original UNet's 2x2 up-convolution, a transposed convolution with a
    2x2 (2x2x2) kernel and stride 2. Its windows do not overlap, so output pixel
    (2i + a, 2j + b) is x[i, j] @ kernel[:, a, b, :] + bias (voxel (2i + a, 2j + b, 2k + e)
    is x[i, j, k] @ kernel[:, a, b, e, :] + bias): one matrix product followed by
    depth-to-space. It is computed that way (`kernel` [Cin, 2, 2, Cout] or
    [Cin, 2, 2, 2, Cout], `bias` [Cout]) because XLA:CPU takes about 5x longer for the
    gradient of `lax.conv_transpose` than for this product.
  mode "resize": nearest-neighbour 2x resize followed by a 3x3 (3x3x3) convolution (the Keras
    `UpSampling2D` + `Conv2D` decoder of DeepSeg).
  """

  def __init__(self, in_channels: int, out_channels: int, *, mode: str,
               spatial_dims: int = 2, conv3d: str = "direct", rngs: nnx.Rngs):
    check_conv3d(conv3d, spatial_dims)
    if mode == "transpose":
      # fan_in = in_channels: each output pixel sees one input pixel.
      init = draws.lecun_normal(in_axis=0, out_axis=tuple(range(1, spatial_dims + 2)))
      self.kernel = nnx.Param(init(rngs.params(), (in_channels, *window(2, spatial_dims),
                                                   out_channels)))
      self.bias = nnx.Param(jnp.zeros((out_channels,)))
    elif mode == "resize":
      self.conv = conv(in_channels, out_channels, window(3, spatial_dims), conv3d=conv3d,
                       rngs=rngs)
    else:
      raise ValueError(f"unknown upsampling mode {mode!r}; expected one of {UPSAMPLE_MODES}")
    self.mode = mode

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.mode == "resize":
      return self.conv(upsample_nearest2(x))
    n, *spatial, _ = x.shape
    # "nhwc,cabo->nhawbo" in 2D, "ndhwc,cabeo->ndahbweo" in 3D: each input axis followed by
    # its offset within the 2x window.
    axes, offsets = "dhw"[-len(spatial):], "abe"[:len(spatial)]
    interleaved = "".join(a + o for a, o in zip(axes, offsets))
    y = jnp.einsum(f"n{axes}c,c{offsets}o->n{interleaved}o", x, self.kernel[...])
    return y.reshape(n, *(2 * size for size in spatial), -1) + self.bias[...]


class AttentionGate(nnx.Module):
  """Additive attention gate on a skip connection (Oktay et al., Attention U-Net, 2018).

  alpha = sigmoid(psi(relu(W_skip skip + W_gate gate))), a [N, *spatial, 1] map in (0, 1);
  the gate returns skip * alpha. Here the gating signal is the decoder's upsampled features,
  already at the skip's resolution, so all three maps are 1x1 (1x1x1) convolutions.
  Computed per pixel (voxel) and per example: no statistics across the batch.
  """

  def __init__(self, skip_channels: int, gate_channels: int, inter_channels: int, *,
               spatial_dims: int = 2, rngs: nnx.Rngs):
    k1 = window(1, spatial_dims)
    self.w_skip = conv(skip_channels, inter_channels, k1, use_bias=False, rngs=rngs)
    self.w_gate = conv(gate_channels, inter_channels, k1, rngs=rngs)
    self.psi = conv(inter_channels, 1, k1, rngs=rngs)

  def __call__(self, skip: jax.Array, gate: jax.Array) -> jax.Array:
    """skip: [N, *spatial, Cs]; gate: [N, *spatial, Cg]. Returns skip scaled by alpha:
    [N, *spatial, Cs]."""
    alpha = jax.nn.sigmoid(self.psi(jax.nn.relu(self.w_skip(skip) + self.w_gate(gate))))
    return skip * alpha
