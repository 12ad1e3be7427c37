"""TracIn influence: the generic core and the segmentation adapter.

    from tracin_jax.influence import influence, self_influence, top_k
    scores = influence(loss_fn, [(params_t, eta_t), ...], train, test)  # [n_test, K, n_train, K]
"""

from tracin_jax.influence.core import DEFAULT_MEMORY_BUDGET_BYTES
from tracin_jax.influence.core import Progress
from tracin_jax.influence.core import influence
from tracin_jax.influence.core import self_influence
from tracin_jax.influence.grads import per_example_grads
from tracin_jax.influence.topk import top_k

__all__ = [
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "Progress",
    "influence",
    "per_example_grads",
    "self_influence",
    "top_k",
]
