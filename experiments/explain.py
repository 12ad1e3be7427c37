"""Explain images against a finished run's gradient store (no training gradient recomputed).

    python -m experiments.explain --flagfile=experiments/configs/demo.flags \\
        --image=<case>:<slice>[,<case>:<slice>...]
    python -m experiments.explain --flagfile=experiments/configs/demo.flags \\
        --nifti_case=/data/BraTS/HGG/<case> --slice=<axial index>

Give the flags of the run (its flagfile, or --workdir and the data flags): the run's
influence stage must have written its store (`<workdir>/influence/store`, on by default).
`--image` names slices of the run's data (validation or training); `--nifti_case` reads a
BraTS-layout case directory (`<case>_{t1,t1ce,t2,flair,seg}.nii.gz`), preprocessed as the
run's data. For each image it writes `<out>/<name>.json` (top-k proponents and opponents of
every predicted region, with scores and timings) and the local explanation panel
`<out>/<name>.png`, and prints the seconds the explanation took.
"""

from __future__ import annotations

import pathlib
import sys
import time

from absl import app
from absl import flags

from experiments import run as run_app

flags.DEFINE_list("image", None, "Slices of the run's data to explain, as case:slice.")
flags.DEFINE_string("nifti_case", None, "A BraTS-layout case directory to explain.")
flags.DEFINE_integer("slice", None, "With --nifti_case: the axial slice index to explain.")
flags.DEFINE_bool("with_truth", False, "Score the image's regions against its ground truth "
                  "(as the influence stage does for validation slices) instead of the "
                  "model's own prediction (as for an unlabelled image).")
flags.DEFINE_string("out", None, "Directory for the explanations (default: "
                    "<workdir>/explain).")

FLAGS = flags.FLAGS


def _images(train_set, val_set, preprocess):
  """(case, slice, image, ground truth) of each image --image or --nifti_case/--slice name."""
  from tracin_jax.data import brats  # pylint: disable=g-import-not-at-top
  from tracin_jax.errors import UserError  # pylint: disable=g-import-not-at-top

  if bool(FLAGS.image) == bool(FLAGS.nifti_case):
    raise UserError("give exactly one of --image=case:slice,... and --nifti_case=DIR.")
  if FLAGS.nifti_case:
    if FLAGS.slice is None:
      raise UserError("--nifti_case needs --slice (the axial index to explain).")
    case = brats.load_case(brats.case_files(FLAGS.nifti_case), preprocess)
    where = list(case.slice_indices).index(FLAGS.slice) if FLAGS.slice in case.slice_indices \
        else None
    if where is None:
      raise UserError(f"--slice={FLAGS.slice}: {FLAGS.nifti_case} gives slices "
                      f"{int(case.slice_indices[0])}..{int(case.slice_indices[-1])} after "
                      "preprocessing.")
    return [(str(case.case_ids[where]), FLAGS.slice, case.images[where], case.labels[where])]
  known = {f"{c}:{z}": (s, i) for s in (val_set, train_set) for i, (c, z) in enumerate(s.ids)}
  out = []
  for name in FLAGS.image:
    if name not in known:
      raise UserError(f"--image={name}: no such slice in the run's data (case:slice, e.g. "
                      f"{next(iter(known))}).")
    s, i = known[name]
    case_id, z = s.ids[i]
    out.append((case_id, z, s.images[i], s.labels[i]))
  return out


def main(argv):
  if len(argv) > 1:
    sys.stderr.write(f"error: unexpected argument {' '.join(argv[1:])!r}.\n")
    sys.exit(1)
  try:
    explain_images()
  except Exception as e:  # pylint: disable=broad-except
    text = run_app._message(e)  # pylint: disable=protected-access
    if not text:
      raise
    sys.stderr.write(f"error: {text}\n")
    sys.exit(1)


def _compilation_cache(cache_dir: str) -> None:
  """Keeps compiled programs on disk: a later explanation with the same model loads them
  instead of compiling (most of a cold start's time)."""
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(cache_dir) / "jax"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def explain_images() -> None:
  """Explains the images the flags name (see the module docstring)."""
  start = time.perf_counter()
  from tracin_jax import experiment  # pylint: disable=g-import-not-at-top
  from tracin_jax import explain  # pylint: disable=g-import-not-at-top
  from tracin_jax.influence import segmentation  # pylint: disable=g-import-not-at-top

  config = run_app._FLAGS[2].value()  # pylint: disable=protected-access
  _compilation_cache(config.data.cache_dir or experiment.default_cache_dir())
  workdir = pathlib.Path(config.workdir)
  train_set, val_set = experiment.load_data(config.data, progress=False)
  images = _images(train_set, val_set, config.data.preprocess)
  out = pathlib.Path(FLAGS.out) if FLAGS.out else workdir / "explain"
  train_regions = None
  for case_id, z, image, truth in images:
    name = f"{case_id}_z{z}"
    result = explain.explain_image(workdir, image, name=name, k=config.influence.top_k,
                                   labels=truth if FLAGS.with_truth else None)
    if train_regions is None:  # the panel shows the training regions: predicted once
      run = explain._run(workdir)  # pylint: disable=protected-access
      train_regions = segmentation.predict_regions(run.final_apply, run.params,
                                                   train_set.images, run.threshold,
                                                   state=run.state)
    paths = explain.write_explanation(result, out, train_set, train_regions=train_regions,
                                      k=config.influence.top_k, case=case_id, slice_index=z)
    seconds = result.seconds
    print(f"{name}: explained in {seconds['total']:.2f} s (loading the run "
          f"{seconds['load']:.2f} s, the query {seconds['query']:.2f} s) against a "
          f"{result.store_bytes / 1e6:.1f} MB store; wrote "
          + ", ".join(str(p) for p in paths))
  print(f"Done in {time.perf_counter() - start:.1f} s (this command, data loading included).")


if __name__ == "__main__":
  app.run(main, flags_parser=run_app._parse)  # pylint: disable=protected-access
