"""Reference presets: the settings of NeuroXAI and of Spagnolo et al.'s IES, beside ours.

A preset is the keyword arguments it gives each method, by the method's name; a method it
does not set keeps this project's defaults. Pass them to a method, or name the preset in
`methods.method_map`:

    from tracin_jax import saliency
    nx = saliency.presets.NEUROXAI
    ig = saliency.integrated_gradients(f, p, x, target, **nx.options("integrated_gradients"))
    sg = saliency.method_map("smoothgrad", f, p, x, target, preset="neuroxai")  # [N, H, W, C]
    ies = saliency.instance_smoothgrad(f, p, image, found[:1],
                                       **saliency.presets.IES.options("instance_smoothgrad"))

Method                "default" (ours, as         "neuroxai"                  "ies"
                      `method_map` uses them)
--------------------  --------------------------  --------------------------  ---------------
integrated gradients  50 steps, midpoint rule,    25 steps, rule "pair"       ours
                      gradients along the path,   (nodes linspace(0, 1, 25),
                      baseline each channel's     weights 1/25), every
                      minimum                     gradient at the input
                                                  (gradient x input),
                                                  baseline 0
guided IG             200 steps, fraction 0.25,   5 steps, fraction 0.5,      ours
                      max_dist 0.02, baseline     max_dist 1.0, baseline 0
                      the minimum
SmoothGrad            25 samples, sigma 0.15 x    5 samples, sigma 0.15 x     50 samples,
                      the range over all          the range over all          sigma 0.05 x
                      channels, mean of squares   channels, mean of squares   FLAIR's range,
                      of the gradient             of its guided IG (its       signed max
                                                  segmentation mode)          aggregation
Grad-CAM and guided   raw gradients               gradients / (mean(g^2) +    ours
Grad-CAM                                          1e-5)
Grad-CAM++            pytorch-grad-cam's eq. 19   ours (NeuroXAI has none)    MONAI's GradCAMpp
instance SmoothGrad   50 samples, sigma 0.05 x    ours                        ours, sigma from
                      the range over all                                      FLAIR's range
                      channels, max, logits
instance Grad-CAM++   pytorch-grad-cam's          ours                        MONAI's

MONAI's GradCAMpp also multiplies the gradients by exp(score) inside its ReLU: a positive
per-example scale of the map, left out (it overflows float32 above a score of 88.7).
Vanilla gradient and guided backpropagation have no settings.

The library functions' own keyword defaults are ours too, but for the baselines of the path
methods (0 there; `method_map` takes each channel's minimum). What a preset does not hold is
the target: NeuroXAI explains the softmax channel of a class summed over the whole image
(`targets.class_softmax_sum(c)`); IES the class logit summed over one lesion
(`instances.instance_target(instance)`). Channel order here is T1, T1Gd, T2, FLAIR, so IES's
FLAIR (its channel 0) is channel 3 (`FLAIR_CHANNEL`).
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any, Mapping

from tracin_jax.saliency import gradients
from tracin_jax.saliency import instances

FLAIR_CHANNEL = instances.IES_NOISE_CHANNEL  # 3: T1, T1Gd, T2, FLAIR
# The methods a preset can set: `methods.METHODS` and the two instance methods.
METHOD_NAMES = ("vanilla_gradient", "guided_backprop", "integrated_gradients",
                "guided_integrated_gradients", "smoothgrad", "grad_cam", "guided_grad_cam",
                "grad_cam_plus_plus", "instance_smoothgrad", "instance_grad_cam_plus_plus")


@dataclasses.dataclass(frozen=True)
class Preset:
  """The keyword arguments of each method under one system's settings.

  Attributes:
    name: "default", "neuroxai" or "ies".
    description: one line for figures and logs.
    settings: {method name: {keyword: value}}, read-only; methods absent keep the
      defaults (`DEFAULT`).
  """

  name: str
  description: str
  settings: Mapping[str, Mapping[str, Any]]

  def options(self, method: str) -> dict[str, Any]:
    """The keyword arguments of `method` (one of `METHOD_NAMES`) under this preset: the
    defaults' updated with the preset's own (a new dict each call).

    Raises:
      ValueError: an unknown method name.
    """
    if method not in METHOD_NAMES:
      raise ValueError(f"unknown saliency method {method!r}; choose from "
                       f"{', '.join(METHOD_NAMES)}")
    out = dict(_DEFAULT_SETTINGS.get(method, {}))
    out.update(self.settings.get(method, {}))
    return out


def _frozen(settings: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Mapping[str, Any]]:
  return types.MappingProxyType({k: types.MappingProxyType(dict(v))
                                 for k, v in settings.items()})


_DEFAULT_SETTINGS = _frozen({
    "integrated_gradients": dict(steps=50, rule="midpoint", gradient_at="path",
                                 baseline="min"),
    "guided_integrated_gradients": dict(steps=200, fraction=0.25, max_dist=0.02,
                                        baseline="min"),
    "smoothgrad": dict(num_samples=25, noise_level=0.15, aggregation="mean_of_squares",
                       noise_channel=None),
    "grad_cam": dict(gradient_normalisation=None),
    "guided_grad_cam": dict(gradient_normalisation=None),
    "grad_cam_plus_plus": dict(variant="pytorch_grad_cam"),
    "instance_smoothgrad": dict(num_samples=instances.IES_SAMPLES,
                                noise_level=instances.IES_NOISE_LEVEL, aggregation="max",
                                on="logits", noise_channel=None),
    "instance_grad_cam_plus_plus": dict(variant="pytorch_grad_cam"),
})

# NeuroXAI's guided IG (`neuroxai/src/guided_ig.py`): 5 steps, fraction 0.5, max distance 1,
# a zero baseline; its SmoothGrad for segmentation smooths this map.
_NEUROXAI_GUIDED_IG = dict(steps=5, fraction=0.5, max_dist=1.0, baseline=0.0)

DEFAULT = Preset("default", "this project's settings", _DEFAULT_SETTINGS)
NEUROXAI = Preset("neuroxai", "NeuroXAI's settings (Zeineldin et al.)", _frozen({
    "integrated_gradients": dict(steps=25, rule="pair", gradient_at="input", baseline=0.0),
    "guided_integrated_gradients": _NEUROXAI_GUIDED_IG,
    "smoothgrad": dict(num_samples=5, noise_level=0.15, aggregation="mean_of_squares",
                       noise_channel=None, over=functools.partial(
                           gradients.guided_integrated_gradients, **_NEUROXAI_GUIDED_IG)),
    "grad_cam": dict(gradient_normalisation="mean_square"),
    "guided_grad_cam": dict(gradient_normalisation="mean_square"),
}))
IES = Preset("ies", "IES's settings (Spagnolo et al.)", _frozen({
    "smoothgrad": dict(num_samples=50, noise_level=0.05, aggregation="max",
                       noise_channel=FLAIR_CHANNEL),
    "grad_cam_plus_plus": dict(variant="monai"),
    "instance_smoothgrad": dict(noise_channel=FLAIR_CHANNEL),
    "instance_grad_cam_plus_plus": dict(variant="monai"),
}))
PRESETS: Mapping[str, Preset] = types.MappingProxyType(
    {p.name: p for p in (DEFAULT, NEUROXAI, IES)})


def get_preset(preset: str | Preset) -> Preset:
  """A preset by name ("default", "neuroxai", "ies"), or the given `Preset` itself.

  Raises:
    ValueError: an unknown name.
  """
  if isinstance(preset, Preset):
    return preset
  if preset not in PRESETS:
    raise ValueError(f"unknown saliency preset {preset!r}; choose from {', '.join(PRESETS)}")
  return PRESETS[preset]
