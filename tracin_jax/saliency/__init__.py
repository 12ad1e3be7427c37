"""Saliency maps for any JAX model: pure functions usable from a notebook.

Every method is `method(apply_fn, params, x, target, **options)` with `apply_fn(params, x)
-> output`, an input batch x [N, H, W, C] (or [N, D, H, W, C]) and a target
`output -> [N]` (`targets`); it returns maps of x's shape, or a result dataclass when there
are extra outputs. Layer methods (the Grad-CAM family) also take `layer=`: a
`(features_fn, head_fn)` split of a pure function, or a named submodule of a Flax NNX model.

    from tracin_jax import models, saliency

    model = models.get_model("unet", base_width=8, depth=3)
    m = saliency.NnxModel(model)                       # apply_fn, params, named layers
    x = images[:2]                                     # [2, H, W, 4] in [-1, 1]
    et = saliency.masked_class_sum(3, saliency.predicted_region("ET"))  # fixed at clean x

    grad = saliency.vanilla_gradient(m.apply_fn, m.params, x, et)       # [2, H, W, 4]
    gbp = saliency.guided_backprop(m.apply_fn, m.params, x, et)
    ig = saliency.integrated_gradients(m.apply_fn, m.params, x, et)     # .attributions,
    ig.completeness_error                                               # [2]
    sg = saliency.smoothgrad(m.apply_fn, m.params, x, et, key=0)        # mean of squares
    cam = saliency.grad_cam(m.apply_fn, m.params, x, et, layer=m.layer("bottleneck"))
    cam.cam, cam.upsampled, cam.display                                 # [2, h, w], ...
    flow = saliency.information_flow(m.apply_fn, m.params, x, et, layers=m.layers())

    found = saliency.find_instances(pred_labels[0], true_labels[0])    # lesions: TP/FP/FN
    ies = saliency.instance_smoothgrad(m.apply_fn, m.params, x[0], found[:1], key=0)
    numbers = saliency.quantify(ies[0], found[0].mask, radius=3)        # per modality
    context = saliency.context_curve(m.apply_fn, m.params, x[0], found[0])

    curve = saliency.deletion_curve(m.apply_fn, m.params, x, et, grad, patch_size=4)
    sanity = saliency.parameter_randomisation(
        lambda p: saliency.vanilla_gradient(m.apply_fn, p, x, et), m.params, key=0,
        layer_order=m.param_groups_in_call_order(x))

Reference presets: `presets.NEUROXAI` and `presets.IES` hold NeuroXAI's and IES's settings of
every method as keyword arguments (`presets` tabulates them beside ours, `presets.DEFAULT`);
`method_map(name, ..., preset="neuroxai")` takes them by name:

    ig = saliency.integrated_gradients(m.apply_fn, m.params, x, et,
                                       **saliency.presets.NEUROXAI.options("integrated_gradients"))
    ies = saliency.instance_smoothgrad(m.apply_fn, m.params, x[0], found[:1], key=0,
                                       **saliency.presets.IES.options("instance_smoothgrad"))

A pure-JAX model works through the same calls: `apply_fn = lambda p, x: ...`, and for
Grad-CAM `layer=(features_fn, head_fn)` with `head_fn(p, features_fn(p, x)) == apply_fn(p,
x)`.

Volumes take the same calls: x [N, D, H, W, C] (D axial slices, channels last), targets
on logits [N, D, H, W, K], every input-gradient map [N, D, H, W, C]; a CAM is [N, d, h, w] at
its layer and upsampled trilinearly to [N, D, H, W]; instances are 26-connected components
of a [D, H, W] mask (components of at most 5 voxels dropped), rings and context dilate in
3-D; deletion patches are cubes of patch_size (or one size per axis); SSIM is the mean over
axial slices; figures draw the axial slice where the explained region is largest
(`figures.axial_slice`). A volume of depth 1 gives its slice's 2-D results.

Modules: `targets` (targets and masks), `gradients` (vanilla, guided backprop, IG, guided IG,
SmoothGrad), `guided_interpreter` (the guided-ReLU jaxpr interpreter), `layers` (layer splits, NNX
probing), `cam` (Grad-CAM, Grad-CAM++, guided Grad-CAM, information flow), `faithfulness`
(deletion/insertion, completeness, relevance mass/rank, parameter randomisation, SSIM),
`instances` (lesions as connected components, their targets, instance SmoothGrad and
Grad-CAM++, quantitative saliency per modality, perilesional context), `figures` (grids),
`methods` (every method by name), `presets` (the reference systems' settings), `core`
(chunking, baselines, resizing, display normalisation).
"""

from tracin_jax.saliency.cam import GradCamResult
from tracin_jax.saliency.cam import channel_weights
from tracin_jax.saliency.cam import grad_cam
from tracin_jax.saliency.cam import grad_cam_plus_plus
from tracin_jax.saliency.cam import guided_grad_cam
from tracin_jax.saliency.cam import information_flow
from tracin_jax.saliency.core import display
from tracin_jax.saliency.core import make_baseline
from tracin_jax.saliency.faithfulness import CurveResult
from tracin_jax.saliency.faithfulness import RandomisationResult
from tracin_jax.saliency.faithfulness import completeness_error
from tracin_jax.saliency.faithfulness import deletion_curve
from tracin_jax.saliency.faithfulness import insertion_curve
from tracin_jax.saliency.faithfulness import param_groups
from tracin_jax.saliency.faithfulness import parameter_randomisation
from tracin_jax.saliency.faithfulness import perturbation_curve
from tracin_jax.saliency.faithfulness import random_saliency
from tracin_jax.saliency.faithfulness import randomize_groups
from tracin_jax.saliency.faithfulness import reduce_channels
from tracin_jax.saliency.faithfulness import relevance_mass_accuracy
from tracin_jax.saliency.faithfulness import relevance_rank_accuracy
from tracin_jax.saliency.faithfulness import spearman
from tracin_jax.saliency.faithfulness import ssim
from tracin_jax.saliency.gradients import IntegratedGradientsResult
from tracin_jax.saliency.gradients import guided_backprop
from tracin_jax.saliency.gradients import guided_integrated_gradients
from tracin_jax.saliency.gradients import integrated_gradients
from tracin_jax.saliency.gradients import quadrature
from tracin_jax.saliency.gradients import smoothgrad
from tracin_jax.saliency.gradients import vanilla_gradient
from tracin_jax.saliency.guided_interpreter import guided
from tracin_jax.saliency.guided_interpreter import guided_relu
from tracin_jax.saliency.instances import Instance
from tracin_jax.saliency.instances import context_curve
from tracin_jax.saliency.instances import find_instances
from tracin_jax.saliency.instances import instance_grad_cam_plus_plus
from tracin_jax.saliency.instances import instance_smoothgrad
from tracin_jax.saliency.instances import instance_target
from tracin_jax.saliency.instances import quantify
from tracin_jax.saliency.layers import Layers
from tracin_jax.saliency.layers import NnxModel
from tracin_jax.saliency.layers import split_layer
from tracin_jax.saliency.methods import METHODS
from tracin_jax.saliency.methods import method_map
from tracin_jax.saliency.presets import PRESETS
from tracin_jax.saliency.presets import Preset
from tracin_jax.saliency.presets import get_preset
from tracin_jax.saliency.targets import REGIONS
from tracin_jax.saliency.targets import ClassScore
from tracin_jax.saliency.targets import ClassSoftmaxSum
from tracin_jax.saliency.targets import MaskedClassSum
from tracin_jax.saliency.targets import MaskedClassSums
from tracin_jax.saliency.targets import PredictedRegion
from tracin_jax.saliency.targets import Target
from tracin_jax.saliency.targets import bind_target
from tracin_jax.saliency.targets import class_score
from tracin_jax.saliency.targets import class_softmax_sum
from tracin_jax.saliency.targets import masked_class_sum
from tracin_jax.saliency.targets import masked_class_sums
from tracin_jax.saliency.targets import predicted_region
from tracin_jax.saliency.targets import region_mask

__all__ = [
    "METHODS",
    "PRESETS",
    "REGIONS",
    "ClassScore",
    "ClassSoftmaxSum",
    "CurveResult",
    "GradCamResult",
    "Instance",
    "IntegratedGradientsResult",
    "Layers",
    "MaskedClassSum",
    "MaskedClassSums",
    "NnxModel",
    "PredictedRegion",
    "Preset",
    "RandomisationResult",
    "Target",
    "bind_target",
    "channel_weights",
    "class_score",
    "class_softmax_sum",
    "completeness_error",
    "context_curve",
    "deletion_curve",
    "display",
    "find_instances",
    "get_preset",
    "grad_cam",
    "grad_cam_plus_plus",
    "guided",
    "guided_backprop",
    "guided_grad_cam",
    "guided_integrated_gradients",
    "guided_relu",
    "information_flow",
    "instance_grad_cam_plus_plus",
    "instance_smoothgrad",
    "instance_target",
    "insertion_curve",
    "integrated_gradients",
    "make_baseline",
    "masked_class_sum",
    "masked_class_sums",
    "method_map",
    "param_groups",
    "parameter_randomisation",
    "perturbation_curve",
    "predicted_region",
    "quantify",
    "quadrature",
    "random_saliency",
    "randomize_groups",
    "reduce_channels",
    "region_mask",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "smoothgrad",
    "spearman",
    "split_layer",
    "ssim",
    "vanilla_gradient",
]
