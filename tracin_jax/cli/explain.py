"""Explain images against a finished run's gradient store (no training gradient recomputed).

    tracin-jax explain --flagfile=demo \\
        --image=<case>:<slice>[,<case>:<slice>...]
    tracin-jax explain --flagfile=demo --nifti_case=/data/BraTS2021_00621 [--slices=all]
    tracin-jax explain --flagfile=demo --t1=T1.nii.gz --t1ce=T1GD.nii.gz --t2=T2.nii.gz \\
        --flair=FLAIR.nii.gz [--slice=<axial index>]

Give the flags of the run (its flagfile, or --workdir and the data flags): the run's
influence stage must have written its store (`<workdir>/influence/store`, on by default).
`--image` names slices of the run's data (validation or training): for each it writes
`<out>/<name>.json` (top-k proponents and opponents of every predicted region, with scores
and timings) and the local explanation panel `<out>/<name>.png`. `--nifti_case` reads a case
folder of any BraTS layout (2019 to 2023; its segmentation is not needed), or `--t1`,
`--t1ce`, `--t2`, `--flair` four files of one patient, preprocessed as the run's data: every
axial slice of the run's central range (`--slices=centre`, the default; `--slices=all` for
the whole scan, `--slices=z,...` or `--slice=z`) is predicted and each predicted region
explained against the store, the `--explain_saliency` methods map the slices with the most
tumour, and the results are written on the patient's scan under `<out>/<case>/` (default
`<workdir>/explain/<case>/`): `prediction.nii.gz` (in the layout's labels),
`influence_<class>.nii.gz`, `saliency_<method>_<class>.nii.gz`, `explanation.json` and
`viewer.html`, an interactive viewer of the scan with every output (open it in a browser). Open the scan and the volumes
together in ITK-SNAP or 3D Slicer: they line up. Nothing is written beside the inputs.
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
  t1: flags.FlagHolder
  t1ce: flags.FlagHolder
  t2: flags.FlagHolder
  flair: flags.FlagHolder
  slice: flags.FlagHolder
  slices: flags.FlagHolder
  explain_saliency: flags.FlagHolder
  explain_saliency_slices: flags.FlagHolder
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
      flags.DEFINE_string("nifti_case", None, "A patient's case folder to explain, in any "
                          "BraTS layout (2019 to 2023; a segmentation is not needed).",
                          flag_values=flag_values),
      *(flags.DEFINE_string(kind, None, f"Instead of --nifti_case: the patient's {name} "
                            "file (.nii or .nii.gz); give all four modalities.",
                            flag_values=flag_values)
        for kind, name in (("t1", "T1"), ("t1ce", "T1Gd (contrast-enhanced T1)"),
                           ("t2", "T2"), ("flair", "FLAIR"))),
      flags.DEFINE_integer("slice", None, "With a patient's scan: the one axial slice index "
                           "to explain (same as --slices=<index>).", flag_values=flag_values),
      flags.DEFINE_list("slices", None, "With a patient's scan: the axial slices to explain: "
                        "centre (the run's central slices, the default: what its model was "
                        "trained on), all (every slice) or indices z,z,...",
                        flag_values=flag_values),
      flags.DEFINE_list("explain_saliency", ["grad_cam", "vanilla_gradient"], "With a "
                        "patient's scan: the saliency methods mapped (any of the saliency "
                        "stage's methods; empty for none).", flag_values=flag_values),
      flags.DEFINE_integer("explain_saliency_slices", 1, "With a patient's scan: how many "
                           "slices the saliency methods map (those with the most predicted "
                           "tumour).",
                           lower_bound=0, flag_values=flag_values),
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


def _images(opts, train_set, val_set):
  """(case, slice, image, ground truth) of each image --image names."""
  from tracin_jax.errors import UserError  # pylint: disable=g-import-not-at-top

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
  files = [opts.t1, opts.t1ce, opts.t2, opts.flair]
  given = [bool(opts.image), bool(opts.nifti_case), any(files)]
  if sum(given) != 1:
    raise UserError("give exactly one of --image=<case>:<slice>,... (the run's slices, e.g. "
                    f"as listed in {config.workdir}/influence/proponents.json), "
                    "--nifti_case=DIR (a patient's case folder) and --t1, --t1ce, --t2, "
                    f"--flair (a patient's four files); e.g. {example}")
  if any(files) and not all(files):
    missing = [f"--{k}" for k, v in zip(("t1", "t1ce", "t2", "flair"), files) if not v]
    raise UserError(f"{', '.join(missing)}: missing; a patient's scan is four files, one "
                    "per modality (or give its folder as --nifti_case=DIR).")
  if opts.nifti_case and not pathlib.Path(opts.nifti_case).is_dir():
    raise UserError(f"--nifti_case={opts.nifti_case}: no such directory (a patient's case "
                    "folder, holding its four modality files).")
  for kind, path in zip(("t1", "t1ce", "t2", "flair"), files):
    if path and not pathlib.Path(path).is_file():
      raise UserError(f"--{kind}={path}: no such file.")
  scan = given[1] or given[2]
  for name in ("slice", "slices"):
    if getattr(opts, name) is not None and not scan:
      raise UserError(f"--{name}: only with a patient's scan (--nifti_case or the four "
                      "files); --image names the run's slices as <case>:<slice>.")
  if opts.slice is not None and opts.slices is not None:
    raise UserError("give one of --slice and --slices.")
  if opts.with_truth and scan:
    raise UserError("--with_truth: only with --image; a patient's scan is explained against "
                    "the model's own prediction.")
  _slices(opts)
  from tracin_jax import saliency  # pylint: disable=g-import-not-at-top

  unknown = [m for m in opts.explain_saliency or () if m not in saliency.METHODS]
  if unknown:
    raise UserError(f"--explain_saliency: unknown {', '.join(unknown)}; any of "
                    f"{', '.join(saliency.METHODS)}.")


def _slices(opts):
  """--slice/--slices as `patient.explain_case` takes them: "all", None (the run's central
  slices) or axial indices."""
  from tracin_jax.errors import UserError  # pylint: disable=g-import-not-at-top

  if opts.slice is not None:
    return [opts.slice]
  chosen = opts.slices or ["centre"]
  if chosen in (["all"], ["centre"], ["center"]):
    return None if chosen[0] != "all" else "all"
  try:
    return [int(z) for z in chosen]
  except ValueError:
    raise UserError(f"--slices={','.join(chosen)}: all, centre, or axial indices "
                    "(integers).") from None


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
  """Explains the images or the scan `opts` (`ExplainFlags.values()`) name against the run
  `config` describes (see the module docstring)."""
  start = time.perf_counter()
  from tracin_jax import experiment  # pylint: disable=g-import-not-at-top
  from tracin_jax import explain  # pylint: disable=g-import-not-at-top

  _compilation_cache(config.data.cache_dir or experiment.default_cache_dir())
  workdir = pathlib.Path(config.workdir)
  train_set, val_set = experiment.load_data(config.data, progress=False)
  if opts.nifti_case or opts.t1:
    _explain_scan(opts, config, train_set)
    print(f"Done in {time.perf_counter() - start:.1f} s (this command, data loading "
          "included).")
    return
  images = _images(opts, train_set, val_set)
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


def _explain_scan(opts, config, train_set) -> None:
  """A patient's scan (--nifti_case or the four files), explained and written back on it."""
  from tracin_jax import patient  # pylint: disable=g-import-not-at-top
  from tracin_jax.data import brats  # pylint: disable=g-import-not-at-top

  if opts.nifti_case:
    case = brats.case_files(opts.nifti_case)
  else:
    case = brats.case_from_files(opts.t1, opts.t1ce, opts.t2, opts.flair)
  result = patient.explain_case(
      config.workdir, case, config.data.preprocess, train_set, slices=_slices(opts),
      out_dir=pathlib.Path(opts.out) / case.case_id if opts.out else None,
      k=config.influence.top_k, saliency_methods=opts.explain_saliency or (),
      saliency_slices=opts.explain_saliency_slices, progress=print)
  seconds = result.seconds
  regions = sum(len(e) for e in result.explanations)
  print(f"{case.case_id}: {len(result.slices)} slices, {regions} predicted regions explained "
        f"in {seconds['total']:.1f} s (reading and predicting {seconds['load']:.1f} s, "
        f"TracIn {seconds['explain']:.1f} s, saliency {seconds['saliency']:.1f} s, writing "
        f"{seconds['write']:.1f} s); wrote {len(result.files)} files in "
        f"{result.paths[0].parent}:")
  for f in result.files:
    print(f"  {pathlib.Path(f['path']).name}: {f['description']}")
