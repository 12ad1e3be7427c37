"""The saliency methods by name: one call per method, as the saliency stage and the
patient explanations use them.

    from tracin_jax import saliency
    m = saliency.NnxModel(model)
    maps = saliency.methods.method_map("grad_cam", m.apply_fn, m.params, x, target,
                                       layer=m.layer("last_hidden"))   # [N, H, W, C]
"""

from __future__ import annotations

import jax.numpy as jnp

from tracin_jax.saliency import cam
from tracin_jax.saliency import gradients

METHODS = ("vanilla_gradient", "guided_backprop", "integrated_gradients",
           "guided_integrated_gradients", "smoothgrad", "grad_cam", "guided_grad_cam",
           "grad_cam_plus_plus")
LABELS = {"vanilla_gradient": "Gradient", "guided_backprop": "Guided backprop",
          "integrated_gradients": "Integrated gradients",
          "guided_integrated_gradients": "Guided IG", "smoothgrad": "SmoothGrad",
          "grad_cam": "Grad-CAM", "guided_grad_cam": "Guided Grad-CAM",
          "grad_cam_plus_plus": "Grad-CAM++", "random": "random (chance)"}
NO_CHANNELS = ("grad_cam", "grad_cam_plus_plus")  # maps at the layer, not per input channel


def method_map(name: str, apply_fn, params, x, target, *, layer=None, ig_steps: int = 50,
               guided_ig_steps: int = 200, smoothgrad_samples: int = 25, seed: int = 0,
               memory_budget_bytes: int | None = None):
  """[N, H, W, C] map of one method (the Grad-CAM family broadcast over the channels).

  Args:
    name: one of `METHODS`.
    apply_fn, params, x, target: as for every method of `tracin_jax.saliency`.
    layer: the Grad-CAM family's layer (`NnxModel.layer(name)` or a split).
    ig_steps, guided_ig_steps: path steps of integrated and guided integrated gradients
      (baseline: each channel's minimum).
    smoothgrad_samples, seed: SmoothGrad's samples and noise seed.
    memory_budget_bytes: bytes of per-sample gradients held at once (None: the default).

  Raises:
    ValueError: an unknown method, or a layer method without `layer`.
  """
  if name == "vanilla_gradient":
    return gradients.vanilla_gradient(apply_fn, params, x, target)
  if name == "guided_backprop":
    return gradients.guided_backprop(apply_fn, params, x, target)
  if name == "integrated_gradients":
    return gradients.integrated_gradients(apply_fn, params, x, target, steps=ig_steps,
                                          baseline="min",
                                          memory_budget_bytes=memory_budget_bytes).attributions
  if name == "guided_integrated_gradients":
    return gradients.guided_integrated_gradients(apply_fn, params, x, target,
                                                 steps=guided_ig_steps,
                                                 baseline="min").attributions
  if name == "smoothgrad":
    return gradients.smoothgrad(apply_fn, params, x, target, key=seed,
                                num_samples=smoothgrad_samples,
                                memory_budget_bytes=memory_budget_bytes)
  if name not in ("guided_grad_cam",) + NO_CHANNELS:
    raise ValueError(f"unknown saliency method {name!r}; choose from {', '.join(METHODS)}.")
  if layer is None:
    raise ValueError(f"saliency method {name!r} needs layer= (a block of the model).")
  if name == "guided_grad_cam":
    return cam.guided_grad_cam(apply_fn, params, x, target, layer=layer)
  cam_fn = cam.grad_cam if name == "grad_cam" else cam.grad_cam_plus_plus
  return jnp.broadcast_to(cam_fn(apply_fn, params, x, target, layer=layer).upsampled[..., None],
                          x.shape)
