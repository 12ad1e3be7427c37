"""How TracIn's rankings on chosen layers compare with those of the full gradients.

    python -m experiments.run --flagfile=demo           # full
    python -m experiments.run --flagfile=demo \\
        --workdir=runs/demo_head --stages=influence --influence_params=head      # last layer
    (copy runs/demo/{checkpoints,train,metrics.json,train_config.json} to runs/demo_head
    first, so that the same trained run is explained)
    PYTHONPATH=. python benchmarks/layer_selection.py --full=runs/demo \\
        --restricted=runs/demo_head

Reads `influence/test_influence.npz` of both workdirs (the same run explained with all
parameters and with `--influence_params`) and, for every present validation region (test
example a, class i), compares its scores over the present train regions (all classes):

* Spearman's rank correlation of the two score vectors;
* top-k overlap: the share of the full gradients' top `--top` proponents (largest scores)
  that are also among the restricted gradients' top `--top`, and the same for opponents.

Prints the median and the mean over the validation regions, per class and in all, and the
influence stages' seconds from their manifests.
"""

from __future__ import annotations

import json
import pathlib

from absl import app, flags
import numpy as np

from tracin_jax.influence import rankings

FLAGS = flags.FLAGS
flags.DEFINE_string("full", None, "Workdir whose influence stage used all parameters.")
flags.DEFINE_multi_string("restricted", None, "Workdir(s) whose influence stage used "
                          "--influence_params (the same trained run).")
flags.DEFINE_integer("top", 10, "k of the top-k overlap.")
flags.mark_flags_as_required(["full", "restricted"])


def _load(workdir: str):
  path = pathlib.Path(workdir) / "influence"
  with np.load(path / "test_influence.npz") as f:
    data = {k: f[k] for k in ("scores", "presence_test", "presence_train", "class_names",
                              "test_case_ids", "test_slice_indices")}
  manifest = json.loads((path / "manifest.json").read_text())
  return data, manifest


def main(argv):
  del argv
  full, full_manifest = _load(FLAGS.full)
  names = [str(c) for c in full["class_names"]]
  print(f"full gradients: {FLAGS.full} (influence stage {full_manifest['seconds']:.0f} s)")
  print(f"\n| parameters | influence stage s | class | regions | Spearman median (mean) "
        f"| top-{FLAGS.top} proponents shared, median (mean) | top-{FLAGS.top} opponents "
        "shared, median (mean) |")
  print("|---|---|---|---|---|---|---|")
  for workdir in FLAGS.restricted:
    other, manifest = _load(workdir)
    for key in ("presence_test", "presence_train", "test_case_ids", "test_slice_indices"):
      if not np.array_equal(full[key], other[key]):
        raise ValueError(f"{workdir} explains other regions or examples than {FLAGS.full} "
                         f"({key} differs): not the same trained run.")
    kept = manifest["settings"].get("params_filter")
    rows = np.asarray(rankings.ranking_agreement(full["scores"], other["scores"],
                                                 full["presence_test"], full["presence_train"],
                                                 FLAGS.top))
    for label, mask in [*((names[i], rows[:, 0] == i) for i in range(len(names))),
                        ("all", np.ones(len(rows), bool))]:
      r = rows[mask]
      stat = lambda x: f"{np.median(x):.2f} ({np.mean(x):.2f})"
      print(f"| {', '.join(kept) if kept else 'all'} | {manifest['seconds']:.0f} | {label} "
            f"| {len(r)} | {stat(r[:, 1])} | {stat(r[:, 2])} | {stat(r[:, 3])} |")


if __name__ == "__main__":
  app.run(main)
