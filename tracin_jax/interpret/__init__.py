"""Interpretation of TracIn explanations through the model's latent representation.

    from tracin_jax import interpret
    f_train = interpret.hidden_features(apply_fn, params, train_images, train_regions)
    f_test = interpret.hidden_features(apply_fn, params, test_images, test_regions)
    fi = interpret.feature_importance(scores, f_train, f_test,
                                      exclude_columns=[g["column"] for g in explainers])
    verdict = interpret.select_predictive(fi)                     # [K, C] arrays
    impact = interpret.feature_impact(apply_fn, params, val_images, val_labels)  # [C, K]

See `tracin_jax.interpret.features` for the definitions (paper section 3.5, eq 7-9).

Whether the influence is real (`tracin_jax.interpret.faithfulness`, and
`tracin_jax.training.retrain.Retrainer` to retrain without chosen examples):

    scores = interpret.slice_scores(test_blocks)            # [K, n_test, n_train]
    proponents, opponents = interpret.removal_sets(scores[i, a], k=20)
    model = Retrainer(workdir, train_set)(removed=proponents)
    interpret.class_block_structure(train_blocks)           # {"auc": ..., ...}
"""

from tracin_jax.interpret.faithfulness import choose_regions
from tracin_jax.interpret.faithfulness import class_block_structure
from tracin_jax.interpret.faithfulness import removal_sets
from tracin_jax.interpret.faithfulness import slice_scores
from tracin_jax.interpret.features import DEFAULT_FI_THRESHOLD
from tracin_jax.interpret.features import feature_importance
from tracin_jax.interpret.features import feature_impact
from tracin_jax.interpret.features import hidden_channels
from tracin_jax.interpret.features import hidden_features
from tracin_jax.interpret.features import region_features
from tracin_jax.interpret.features import select_predictive
from tracin_jax.interpret.features import similarity

__all__ = [
    "DEFAULT_FI_THRESHOLD",
    "choose_regions",
    "class_block_structure",
    "feature_importance",
    "feature_impact",
    "hidden_channels",
    "hidden_features",
    "region_features",
    "removal_sets",
    "select_predictive",
    "similarity",
    "slice_scores",
]
