"""tracin_jax: TracIn influence explanations for multiclass segmentation, in JAX/Flax.

    import tracin_jax
    scores = tracin_jax.influence(loss_fn, [(params, eta), ...], train, test)

`loss_fn(params, example) -> [K]` is any model's per-example loss; the segmentation
adapter `tracin_jax.make_region_losses(apply_fn)` gives the paper's K = 3 region Dice losses.
Submodules: `data` (BraTS loader, synthetic cohort, pipelines), `models` (UNet variants),
`training` (Adam-then-SGD with Orbax checkpoints), `influence` (TracIn core and rankings),
`interpret` (global explanation and faithfulness checks), `stages` (the experiment's stages).
"""

from tracin_jax.influence import ekfac_influence
from tracin_jax.influence import influence
from tracin_jax.influence import make_region_losses
from tracin_jax.influence import mask_absent
from tracin_jax.influence import Projection
from tracin_jax.influence import predict_regions
from tracin_jax.influence import region_presence
from tracin_jax.influence import segmentation_influence
from tracin_jax.influence import self_influence
from tracin_jax.influence import top_k
from tracin_jax.influence import trak_influence
from tracin_jax.types import Checkpoint

__version__ = "0.1.0"


def __getattr__(name):
  # Loading a run's checkpoints needs Orbax (and the training code, Grain): imported on
  # first use, so that `import tracin_jax` stays light.
  if name == "tracin_checkpoints":
    from tracin_jax.training.train import tracin_checkpoints  # pylint: disable=g-import-not-at-top
    return tracin_checkpoints
  raise AttributeError(f"module 'tracin_jax' has no attribute {name!r}")


__all__ = [
    "Projection",
    "Checkpoint",
    "ekfac_influence",
    "influence",
    "make_region_losses",
    "mask_absent",
    "predict_regions",
    "region_presence",
    "segmentation_influence",
    "self_influence",
    "top_k",
    "tracin_checkpoints",
    "trak_influence",
]
