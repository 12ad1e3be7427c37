"""How projected gradients rank training regions against exact TracIn, and what each
projection costs, on a finished run.

    python -m experiments.run --flagfile=demo   # once
    PYTHONPATH=. python benchmarks/projection_quality.py \\
        --flagfile=demo --out=runs/demo/projection_quality.json

For every checkpoint TracIn sums over, the per-example region gradients of the training and
validation slices are computed once; each projection (kind x d) is applied to the same
gradient blocks, and the validation-train TracIn scores of every variant are summed over
checkpoints beside the exact ones. For every present validation region (test example a,
class i), its scores over the present training regions (all classes) are compared with the
exact scores: Spearman's rank correlation and the share of the exact top-10 proponents (and
opponents) that the projected scores also put in their top 10
(`influence.rankings.ranking_agreement`).
Also timed: each projection's seconds per gradient row (median over blocks), against the
gradient computation's.

The "logra" rows (`--logra_dims`) are formed inside the model from each layer's projected
inputs and output gradients (`influence.logra`), never from the formed gradient: their time
is that of the whole row (its own forward and backward passes included), against the
formed gradient's plus its projection. `--logra_seeds` > 1 also scores the mean of the
LoGra scores over that many seeds (what the expectation converges to).
"""

from __future__ import annotations

import json
import pathlib
import time

from absl import app
from absl import flags
import numpy as np

from tracin_jax import experiment  # pylint: disable=g-import-not-at-top
from tracin_jax.cli import run as run_cli  # pylint: disable=g-import-not-at-top
from tracin_jax.influence import grads as grads_lib  # pylint: disable=g-import-not-at-top
from tracin_jax.influence import layout  # pylint: disable=g-import-not-at-top
from tracin_jax.influence import logra  # pylint: disable=g-import-not-at-top
from tracin_jax.influence import projection as projection_lib  # pylint: disable=g-import-not-at-top
from tracin_jax.influence import rankings  # pylint: disable=g-import-not-at-top
from tracin_jax.influence import segmentation  # pylint: disable=g-import-not-at-top
from tracin_jax.stages import influence as influence_stage  # pylint: disable=g-import-not-at-top

flags.DEFINE_string("out", None, "JSON file for the table (optional).")
flags.DEFINE_list("dims", ["256", "1024", "4096", "16384"], "Projected sizes d.")
flags.DEFINE_list("kinds", list(projection_lib.KINDS), "Projection kinds.")
flags.DEFINE_integer("dense_max_dim", 4096, "Largest d tried for the dense kind (its cost "
                     "grows as P x d).")
flags.DEFINE_integer("top", 10, "k of the top-k overlap.")
flags.DEFINE_integer("block", 32, "Examples per gradient block.")
flags.DEFINE_list("logra_dims", ["1024", "4096", "16384"], "Row widths d of the LoGra rows "
                  "(empty: none).")
flags.DEFINE_integer("logra_seeds", 1, "Seeds of each LoGra d (their scores' mean is also "
                     "scored when > 1).")
flags.DEFINE_string("logra_vectorize", "loop", "How LoGra rows are vectorised (loop, vmap).")

FLAGS = flags.FLAGS
RUN_FLAGS = run_cli.global_flags()  # the run's flags: its flagfile, --workdir, the settings


def main(argv):
  del argv
  config = RUN_FLAGS.config.value()
  train_set, val_set = experiment.load_data(config.data, progress=False)
  context = experiment.make_context(config, train_set, val_set)
  stage = influence_stage.InfluenceStage(config.influence)
  apply_fn, checkpoints, epochs, final, final_apply = stage._checkpoints(context)  # pylint: disable=protected-access
  regions = [segmentation.predict_regions(final_apply, final.params, s.images,
                                          config.influence.threshold, state=final.state)
             for s in (train_set, val_set)]
  presence = [segmentation.region_presence(r) for r in regions]
  examples = [influence_stage._examples(s, r) for s, r in zip((train_set, val_set), regions)]  # pylint: disable=protected-access
  both = {key: np.concatenate([examples[0][key], examples[1][key]]) for key in examples[0]}
  n_train, n = len(train_set), len(train_set) + len(val_set)
  loss_fn = segmentation.make_region_losses(apply_fn)
  dims = [int(d) for d in FLAGS.dims]
  variants = [projection_lib.Projection(d, kind, seed=0) for kind in FLAGS.kinds for d in dims
              if kind != "dense" or d <= FLAGS.dense_max_dim]
  factored = [projection_lib.Projection(int(d), logra.KIND, seed=s)
              for d in FLAGS.logra_dims if d for s in range(FLAGS.logra_seeds)]
  variants += factored
  k = 3
  scores = {v: np.zeros((n * k, n_train * k)) for v in [None, *variants]}
  seconds = {v: [] for v in [None, *variants]}
  widths = {}  # numbers per row (a LoGra row may be narrower than its d)
  for epoch, ckpt in zip(epochs, checkpoints):
    rows = {v: [] for v in [None, *variants]}
    for start in range(0, n, FLAGS.block):
      batch = {key: x[start:start + FLAGS.block] for key, x in both.items()}
      t0 = time.perf_counter()
      g, _ = grads_lib.block_grads(loss_fn, k, ckpt.params, batch, "auto", ckpt.state)
      g.block_until_ready()
      seconds[None].append((time.perf_counter() - t0) / g.shape[0])
      rows[None].append(np.asarray(g))
      for v in variants:
        t0 = time.perf_counter()
        if logra.is_logra(v):
          p, _ = logra.block_rows(loss_fn, k, ckpt.params, batch, v, ckpt.state,
                                  vectorize=FLAGS.logra_vectorize, pad_to=FLAGS.block)
          p = p.block_until_ready()
        else:
          p = v(g).block_until_ready()
        seconds[v].append((time.perf_counter() - t0) / g.shape[0])
        rows[v].append(np.asarray(p))
    for v, parts in rows.items():
      m = np.concatenate(parts).astype(np.float64)
      widths[v] = m.shape[1]
      scores[v] += ckpt.learning_rate * m @ m[:n_train * k].T
    print(f"checkpoint of epoch {epoch} done", flush=True)

  def blocks(v):
    s = scores[v].reshape(n, k, n_train, k)[n_train:]
    return layout.to_class_blocks(segmentation.mask_absent(s, presence[1], presence[0]))

  if FLAGS.logra_seeds > 1:  # the mean over seeds of each LoGra d, scored as one variant
    for d in sorted({v.dim for v in factored}):
      runs = [v for v in factored if v.dim == d]
      mean = projection_lib.Projection(d, logra.KIND, seed=-len(runs))
      scores[mean] = sum(scores[v] for v in runs) / len(runs)
      seconds[mean] = [float("nan")]
      widths[mean] = widths[runs[0]]
      variants.append(mean)
  exact = blocks(None)
  p = sum(int(np.size(x)) for x in __import__("jax").tree.leaves(checkpoints[0].params))
  grad_s = float(np.median(seconds[None][1:] or seconds[None]))
  table = []
  print(f"\nP = {p} parameters; exact gradient rows: {1e3 * grad_s:.1f} ms per row (median); "
        f"{len(epochs)} checkpoints, {n_train} train + {len(val_set)} validation slices.\n")
  print(f"| kind | d | Spearman median (mean) | top-{FLAGS.top} proponents shared, mean "
        f"| top-{FLAGS.top} opponents shared, mean | projection ms per row (share of the "
        "gradient's) | store MB per checkpoint |")
  print("|---|---|---|---|---|---|---|")
  for v in variants:
    rows_ = np.asarray(rankings.ranking_agreement(exact, blocks(v), presence[1], presence[0],
                                                 FLAGS.top))
    proj_s = float(np.median(seconds[v][1:] or seconds[v]))
    kind = v.kind
    if logra.is_logra(v):
      kind = (f"logra (seed {v.seed})" if v.seed >= 0 else
              f"logra (mean of {-v.seed} seeds)")
    # A region whose scores are all equal has no rank correlation (NaN): left out.
    entry = {"kind": kind, "dim": v.dim, "rho_median": float(np.nanmedian(rows_[:, 1])),
             "rho_mean": float(np.nanmean(rows_[:, 1])), "rho_min": float(np.nanmin(rows_[:, 1])),
             "regions_ranked": int(np.sum(np.isfinite(rows_[:, 1]))),
             "top_proponents": float(np.mean(rows_[:, 2])),
             "top_opponents": float(np.mean(rows_[:, 3])), "ms_per_row": 1e3 * proj_s,
             "share_of_gradient": proj_s / grad_s,
             "width": widths[v], "store_mb_per_checkpoint": n_train * k * widths[v] * 4 / 1e6}
    table.append(entry)
    print(f"| {kind} | {v.dim} | {entry['rho_median']:.3f} ({entry['rho_mean']:.3f}) "
          f"| {entry['top_proponents']:.2f} | {entry['top_opponents']:.2f} "
          f"| {entry['ms_per_row']:.2f} ({100 * entry['share_of_gradient']:.1f}%) "
          f"| {entry['store_mb_per_checkpoint']:.1f} |")
  print(f"| exact | {p} | 1 | 1 | 1 | - | {n_train * k * p * 4 / 1e6:.0f} |")
  if FLAGS.out:
    pathlib.Path(FLAGS.out).write_text(json.dumps(
        {"num_parameters": p, "gradient_ms_per_row": 1e3 * grad_s, "epochs": list(epochs),
         "regions": int(presence[1].sum()), "table": table}, indent=1))


if __name__ == "__main__":
  app.run(main, flags_parser=run_cli.parse_global)
