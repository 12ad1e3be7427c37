"""Is an attribution method faithful? The checks against retraining, in one place.

  - `checks.stats`: the statistics every check reports (Spearman's rho, means with
    intervals, paired tests, the bootstrap);
  - `checks.lds`: the linear datamodeling score (retraining on random subsets);
  - `checks.ceiling`: the LDS's noise ceiling (the same subsets retrained with another data
    order) and an LDS as a fraction of it;
  - `checks.removal`: the removal test (retraining without a region's top proponents, top
    opponents or random slices).

    from tracin_jax.checks import lds, stats
    score = lds.lds(lds.predicted_outputs(scores, masks), measured)  # {"mean", "low", ...}
    stats.mean_ci(changes)                                           # {"mean", "low", ...}

The modules are imported by name (nothing is imported here), so that `checks.stats` stays as
light as numpy and scipy for the modules below it that use it. The stages (`validate`,
`lds`) run these checks on a run and write their files; nothing here imports a stage.
"""
