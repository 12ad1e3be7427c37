"""The saliency methods by name: one call per method, as the saliency stage and the
patient explanations use them.

    from tracin_jax import saliency
    m = saliency.NnxModel(model)
    maps = saliency.methods.method_map("grad_cam", m.apply_fn, m.params, x, target,
                                       layer=m.layer("last_hidden"))   # [N, H, W, C]
    ig = saliency.methods.method_map("integrated_gradients", m.apply_fn, m.params, x, target,
                                     preset="neuroxai")      # NeuroXAI's gradient x input

`preset` picks the settings of every method: "default" (ours), "neuroxai" or "ies" (the
reference systems'; `presets` tabulates all three); the step and sample counts given here
override the preset's.
"""

from __future__ import annotations

import jax.numpy as jnp

from tracin_jax.saliency import cam
from tracin_jax.saliency import gradients
from tracin_jax.saliency import presets as presets_lib

METHODS = ("vanilla_gradient", "guided_backprop", "integrated_gradients",
           "guided_integrated_gradients", "smoothgrad", "grad_cam", "guided_grad_cam",
           "grad_cam_plus_plus")
LABELS = {"vanilla_gradient": "Gradient", "guided_backprop": "Guided backprop",
          "integrated_gradients": "Integrated gradients",
          "guided_integrated_gradients": "Guided IG", "smoothgrad": "SmoothGrad",
          "grad_cam": "Grad-CAM", "guided_grad_cam": "Guided Grad-CAM",
          "grad_cam_plus_plus": "Grad-CAM++", "random": "random (chance)"}
NO_CHANNELS = ("grad_cam", "grad_cam_plus_plus")  # maps at the layer, not per input channel


def method_map(name: str, apply_fn, params, x, target, *, layer=None,
               preset: str | presets_lib.Preset = "default", ig_steps: int | None = None,
               guided_ig_steps: int | None = None, smoothgrad_samples: int | None = None,
               seed: int = 0, memory_budget_bytes: int | None = None):
  """[N, H, W, C] map of one method (the Grad-CAM family broadcast over the channels).

  Args:
    name: one of `METHODS`.
    apply_fn, params, x, target: as for every method of `tracin_jax.saliency`.
    layer: the Grad-CAM family's layer (`NnxModel.layer(name)` or a split).
    preset: "default" (ours: the path methods' baseline is each channel's minimum),
      "neuroxai", "ies" or a `presets.Preset`: every method's settings (see `presets`).
    ig_steps, guided_ig_steps: path steps of integrated and guided integrated gradients
      (None: the preset's, 50 and 200 by default).
    smoothgrad_samples: SmoothGrad's samples (None: the preset's, 25 by default).
    seed: SmoothGrad's noise seed.
    memory_budget_bytes: bytes of per-sample gradients held at once (None: the default).

  Raises:
    ValueError: an unknown method or preset, or a layer method without `layer`.
  """
  chosen = presets_lib.get_preset(preset)
  if name not in METHODS:
    raise ValueError(f"unknown saliency method {name!r}; choose from {', '.join(METHODS)}.")
  options = chosen.options(name)
  if name == "vanilla_gradient":
    return gradients.vanilla_gradient(apply_fn, params, x, target)
  if name == "guided_backprop":
    return gradients.guided_backprop(apply_fn, params, x, target)
  if name == "integrated_gradients":
    if ig_steps is not None:
      options["steps"] = ig_steps
    return gradients.integrated_gradients(apply_fn, params, x, target,
                                          memory_budget_bytes=memory_budget_bytes,
                                          **options).attributions
  if name == "guided_integrated_gradients":
    if guided_ig_steps is not None:
      options["steps"] = guided_ig_steps
    return gradients.guided_integrated_gradients(apply_fn, params, x, target,
                                                 **options).attributions
  if name == "smoothgrad":
    if smoothgrad_samples is not None:
      options["num_samples"] = smoothgrad_samples
    return gradients.smoothgrad(apply_fn, params, x, target, key=seed,
                                memory_budget_bytes=memory_budget_bytes, **options)
  if layer is None:
    raise ValueError(f"saliency method {name!r} needs layer= (a block of the model).")
  if name == "guided_grad_cam":
    return cam.guided_grad_cam(apply_fn, params, x, target, layer=layer, **options)
  cam_fn = cam.grad_cam if name == "grad_cam" else cam.grad_cam_plus_plus
  return jnp.broadcast_to(cam_fn(apply_fn, params, x, target, layer=layer,
                                 **options).upsampled[..., None], x.shape)
