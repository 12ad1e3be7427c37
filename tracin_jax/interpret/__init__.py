"""Interpretation of TracIn explanations through the model's latent representation.

    from tracin_jax import interpret
    f_train = interpret.hidden_features(apply_fn, params, train_images, train_regions)
    f_test = interpret.hidden_features(apply_fn, params, test_images, test_regions)
    fi = interpret.feature_importance(scores, f_train, f_test,
                                      exclude_columns=[g["column"] for g in explainers])
    verdict = interpret.select_predictive(fi)                     # [K, C] arrays
    impact = interpret.feature_impact(apply_fn, params, val_images, val_labels)  # [C, K]

See `tracin_jax.interpret.features` for the definitions (paper section 3.5, eq 7-9).
"""

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
    "feature_importance",
    "feature_impact",
    "hidden_channels",
    "hidden_features",
    "region_features",
    "select_predictive",
    "similarity",
]
