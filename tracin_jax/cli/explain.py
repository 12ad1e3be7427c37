"""Explain images against a finished run's gradient store (no training gradient recomputed).

    tracin-jax explain --flagfile=demo \\
        --image=<case>:<slice>[,<case>:<slice>...]
    tracin-jax explain --flagfile=demo \\
        --nifti_case=/data/BraTS/HGG/<case> --slice=<axial index>

Give the flags of the run (its flagfile, or --workdir and the data flags): the run's
influence stage must have written its store (`<workdir>/influence/store`, on by default).
`--image` names slices of the run's data (validation or training); `--nifti_case` reads a
BraTS-layout case directory (`<case>_{t1,t1ce,t2,flair,seg}.nii.gz`), preprocessed as the
run's data. For each image it writes `<out>/<name>.json` (top-k proponents and opponents of
every predicted region, with scores and timings) and the local explanation panel
`<out>/<name>.png`, and prints the seconds the explanation took.
`python -m experiments.explain` (from the repository's root) is the same command.
"""

from __future__ import annotations

import functools
import pathlib
import sys
import time
import types
from typing import NamedTuple, Sequence

from absl import flags

from tracin_jax.cli import config_flags
from tracin_jax.cli import run as run_cli


class ExplainFlags(NamedTuple):
  """The command's flags: the run's (its flagfile's), then those of the explanation."""

  run: run_cli.RunFlags
  image: flags.FlagHolder
  nifti_case: flags.FlagHolder
  slice: flags.FlagHolder
  with_truth: flags.FlagHolder
  out: flags.FlagHolder

  def values(self) -> types.SimpleNamespace:
    """The parsed values of the explanation's own flags, by name."""
    return types.SimpleNamespace(**{name: getattr(self, name).value
                                    for name in self._fields[1:]})


def define(flag_values: flags.FlagValues,
           run_flags: run_cli.RunFlags | None = None) -> ExplainFlags:
  """The command's flags, defined in `flag_values` (the run's too, unless given: already
  defined there)."""
  return ExplainFlags(
      run_flags or run_cli.define(flag_values),
      flags.DEFINE_list("image", None, "Slices of the run's data to explain, as case:slice.",
                        flag_values=flag_values),
      flags.DEFINE_string("nifti_case", None, "A BraTS-layout case directory to explain.",
                          flag_values=flag_values),
      flags.DEFINE_integer("slice", None, "With --nifti_case: the axial slice index to "
                           "explain.", flag_values=flag_values),
      flags.DEFINE_bool("with_truth", False, "Score the image's regions against its ground "
                        "truth (as the influence stage does for validation slices) instead of "
                        "the model's own prediction (as for an unlabelled image).",
                        flag_values=flag_values),
      flags.DEFINE_string("out", None, "Directory for the explanations (default: "
                          "<workdir>/explain).", flag_values=flag_values))


@functools.cache
def global_flags() -> ExplainFlags:
  """The command's flags in absl's global flags (defined on the first call)."""
  return define(flags.FLAGS, run_cli.global_flags())


def _images(opts, train_set, val_set, preprocess):
  """(case, slice, image, ground truth) of each image --image or --nifti_case/--slice name."""
  from tracin_jax.data import brats  # pylint: disable=g-import-not-at-top
  from tracin_jax.errors import UserError  # pylint: disable=g-import-not-at-top

  if opts.nifti_case:
    case = brats.load_case(brats.case_files(opts.nifti_case), preprocess)
    where = list(case.slice_indices).index(opts.slice) if opts.slice in case.slice_indices \
        else None
    if where is None:
      raise UserError(f"--slice={opts.slice}: {opts.nifti_case} gives slices "
                      f"{int(case.slice_indices[0])}..{int(case.slice_indices[-1])} after "
                      "preprocessing.")
    return [(str(case.case_ids[where]), opts.slice, case.images[where], case.labels[where])]
  known = {f"{c}:{z}": (s, i) for s in (val_set, train_set) for i, (c, z) in enumerate(s.ids)}
  out = []
  for name in opts.image:
    if name not in known:
      raise UserError(f"--image={name}: no such slice in the run's data (case:slice, e.g. "
                      f"{next(iter(known))}).")
    s, i = known[name]
    case_id, z = s.ids[i]
    out.append((case_id, z, s.images[i], s.labels[i]))
  return out


def _run_command(prog: str) -> str:
  """The run's command beside this one's: "tracin-jax run" for "tracin-jax explain"."""
  return prog[:-len("explain")] + "run" if prog.endswith("explain") else "tracin-jax run"


def check(opts, config, prog: str) -> None:
  """Checks the flags before any data is read: one line naming what is missing and how to
  give it (`prog` is the command, "tracin-jax explain").

  Raises:
    UserError: no run (--workdir), no run finished with a gradient store there, or not
      exactly one of --image and --nifti_case (with --slice).
  """
  from tracin_jax import explain  # pylint: disable=g-import-not-at-top
  from tracin_jax.errors import UserError  # pylint: disable=g-import-not-at-top

  example = f"{prog} --flagfile=demo --image=<case>:<slice>"
  if not config.workdir:
    raise UserError("--workdir: required (the finished run that explains the images: its "
                    f"flagfile, or --workdir and the data flags); e.g. {example}")
  if not explain.has_store(config.workdir):
    run = _run_command(prog)
    raise UserError(f"--workdir={config.workdir}: no finished influence stage with its "
                    f"gradient store there; run it first: {run} with the same flags (e.g. "
                    f"{run} --flagfile=demo)")
  if bool(opts.image) == bool(opts.nifti_case):
    raise UserError("give exactly one of --image=<case>:<slice>,... (the run's slices, e.g. "
                    f"as listed in {config.workdir}/influence/proponents.json) and "
                    f"--nifti_case=DIR with --slice; e.g. {example}")
  if opts.nifti_case and opts.slice is None:
    raise UserError("--nifti_case needs --slice (the axial index to explain).")
  if opts.slice is not None and not opts.nifti_case:
    raise UserError(f"--slice={opts.slice}: only with --nifti_case; --image names the run's "
                    "slices as <case>:<slice>.")


def execute(explain_flags: ExplainFlags, argv: Sequence[str]) -> int:
  """Explains the parsed flags' images; the exit status (user errors: one line, 1)."""
  try:
    run_cli.unexpected(argv)
    opts, config = explain_flags.values(), explain_flags.run.config.value()
    check(opts, config, argv[0])
    explain_images(opts, config)
  except Exception as e:  # pylint: disable=broad-except
    return run_cli.fail(e)
  return 0


def cli(argv: Sequence[str]) -> int:
  """The command in this process, with flags of its own (for tests); the exit status."""
  flag_values = flags.FlagValues()
  explain_flags = define(flag_values)
  rest = run_cli.parse(flag_values, argv)
  return 1 if rest is None else execute(explain_flags, rest)


def main(argv: Sequence[str]) -> int:
  """The command as a process runs it, argv[0] the program ("tracin-jax explain"): the help,
  or the explanations; the exit status."""
  if any(a in run_cli.HELP_FLAGS for a in argv[1:]):
    sys.stdout.write(usage())
    return 0
  explain_flags = global_flags()
  return run_cli.run_app(lambda rest: execute(explain_flags, rest), argv)


def usage() -> str:
  """`--help`: how to run, the command's own flags; the run's flags are the run's help."""
  flag_values = flags.FlagValues()
  holders = define(flag_values)
  own = []
  for holder in holders[1:]:
    flag = flag_values[holder.name]
    shown = "unset" if flag.default is None else str(flag.default).lower()
    name = f"[no]{flag.name}" if flag.boolean else flag.name
    own.append(config_flags.help_entry(f"--{name} (default: {shown})", flag.help))
  return "\n".join([__doc__.strip(), "", "Flags of the explanation:", *own, "",
                    "The run's flags (its flagfile, --workdir, the data and influence "
                    "settings):", "see tracin-jax run --help.", ""])


def _compilation_cache(cache_dir: str) -> None:
  """Keeps compiled programs on disk: a later explanation with the same model loads them
  instead of compiling (most of a cold start's time)."""
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(cache_dir) / "jax"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def _train_regions(workdir: pathlib.Path, train_set):
  """The training slices' regions as the run's final model predicts them (for the panel)."""
  from tracin_jax import models  # pylint: disable=g-import-not-at-top
  from tracin_jax import rundir  # pylint: disable=g-import-not-at-top
  from tracin_jax.influence import segmentation  # pylint: disable=g-import-not-at-top
  from tracin_jax.training import train as train_lib  # pylint: disable=g-import-not-at-top

  model, _ = train_lib.load_model(workdir)
  apply_fn, params, state = models.functional(model)
  threshold = float(rundir.read_manifest(workdir, rundir.INFLUENCE)["settings"]["threshold"])
  return segmentation.predict_regions(apply_fn, params, train_set.images, threshold,
                                      state=state)


def explain_images(opts, config) -> None:
  """Explains the images `opts` (`ExplainFlags.values()`) name against the run `config`
  describes (see the module docstring)."""
  start = time.perf_counter()
  from tracin_jax import experiment  # pylint: disable=g-import-not-at-top
  from tracin_jax import explain  # pylint: disable=g-import-not-at-top

  _compilation_cache(config.data.cache_dir or experiment.default_cache_dir())
  workdir = pathlib.Path(config.workdir)
  train_set, val_set = experiment.load_data(config.data, progress=False)
  images = _images(opts, train_set, val_set, config.data.preprocess)
  out = pathlib.Path(opts.out) if opts.out else workdir / "explain"
  train_regions = None
  for case_id, z, image, truth in images:
    name = f"{case_id}_z{z}"
    result = explain.explain_image(workdir, image, name=name, k=config.influence.top_k,
                                   labels=truth if opts.with_truth else None)
    if train_regions is None:  # the panel shows the training regions: predicted once
      train_regions = _train_regions(workdir, train_set)
    paths = explain.write_explanation(result, out, train_set, train_regions=train_regions,
                                      k=config.influence.top_k, case=case_id, slice_index=z)
    seconds = result.seconds
    print(f"{name}: explained in {seconds['total']:.2f} s (loading the run "
          f"{seconds['load']:.2f} s, the query {seconds['query']:.2f} s) against a "
          f"{result.store_bytes / 1e6:.1f} MB store; wrote "
          + ", ".join(str(p) for p in paths))
  print(f"Done in {time.perf_counter() - start:.1f} s (this command, data loading included).")
