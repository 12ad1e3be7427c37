"""TracIn influence: the generic core and the segmentation adapter.

    from tracin_jax.influence import influence, self_influence, top_k
    scores = influence(loss_fn, [(params_t, eta_t), ...], train, test)  # [n_test, K, n_train, K]

`loss_fn(params, example) -> [K]` is any model's loss for one example; the paper's region
losses for segmentation come from `make_region_losses`, and `segmentation_influence` runs the
whole of eq 6 (regions, losses, NaN for empty regions). The same losses serve TRAK
(`trak_influence`, an ensemble of models' kernel regressions) and EK-FAC influence
(`ekfac_influence`, an influence function with a Kronecker-factored Fisher), both
[n_test, K, n_train, K].
"""

from tracin_jax.influence.core import DEFAULT_MEMORY_BUDGET_BYTES
from tracin_jax.influence.core import InfluencePlan
from tracin_jax.influence.core import influence
from tracin_jax.influence.core import influence_per_checkpoint
from tracin_jax.influence.core import plan_influence
from tracin_jax.influence.core import self_influence
from tracin_jax.influence.ekfac import ekfac_factors
from tracin_jax.influence.ekfac import ekfac_influence
from tracin_jax.influence.ekfac import sampled_cross_entropy
from tracin_jax.influence.grads import per_example_grads
from tracin_jax.influence.projection import Projection
from tracin_jax.influence.segmentation import make_region_losses
from tracin_jax.influence.segmentation import mask_absent
from tracin_jax.influence.segmentation import predict_regions
from tracin_jax.influence.segmentation import region_presence
from tracin_jax.influence.segmentation import segmentation_influence
from tracin_jax.influence.topk import top_k
from tracin_jax.influence.trak import choose_damping
from tracin_jax.influence.trak import trak_influence
from tracin_jax.progress import Progress

__all__ = [
    "Projection",
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "Progress",
    "InfluencePlan",
    "choose_damping",
    "ekfac_factors",
    "ekfac_influence",
    "influence",
    "influence_per_checkpoint",
    "plan_influence",
    "make_region_losses",
    "mask_absent",
    "per_example_grads",
    "predict_regions",
    "region_presence",
    "sampled_cross_entropy",
    "segmentation_influence",
    "self_influence",
    "top_k",
    "trak_influence",
]
