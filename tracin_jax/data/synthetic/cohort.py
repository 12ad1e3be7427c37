"""Cases and cohorts: one case's volumes and files, and the cohort on disk.

`synthesize_case` makes case i of a seeded cohort in memory (anatomy from `anatomy`, images
from `physics`) in BraTS storage orientation; `write_case` writes its five NIfTI files;
`generate_cohort` writes a whole cohort in worker processes (which end with their parent,
however it ends), resumably, with its record
`cohort.json`; `ensure_cohort` reuses a finished one.

Everything random is drawn from `numpy.random.SeedSequence([seed, case_index])`: the same
seed gives byte-identical files, and the number of worker processes does not change them.
A case is computed with one BLAS and OpenMP thread wherever it is made: a threaded matrix
product splits its sums by the thread count, and the last bit it changes can move a voxel
across an int16 rounding boundary.
A cohort of n cases is the first n cases of any larger cohort with the same seed.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import dataclasses
import io
import json
import logging
import multiprocessing
import os
import pathlib
import shutil
import signal
import threading
import time
import zlib
from typing import Any, Mapping

import nibabel as nib
import numpy as np
import threadpoolctl

from tracin_jax import outputs
from tracin_jax.data import constants
from tracin_jax.data.synthetic import anatomy
from tracin_jax.data.synthetic import physics

_log = logging.getLogger(__name__)

# The package's import path; cached cohorts record it.
GENERATOR = "tracin_jax.data.synthetic"
# Bump whenever the generated data change: cached cohorts of another version are not reused.
GENERATOR_VERSION = "1"
CASE_PREFIX = "BraTS19_SYN_"
COHORT_FILE = "cohort.json"
# Written first and replaced by COHORT_FILE last: a directory holding it is unfinished.
PARTIAL_FILE = ".cohort.partial.json"
FILE_KINDS = constants.MODALITIES + (constants.SEG_SUFFIX,)
_SHAPE = constants.VOLUME_SHAPE


@dataclasses.dataclass(frozen=True)
class Case:
  """One synthetic case in BraTS storage orientation (BRATS_AFFINE maps voxels to mm).

  Attributes:
    name: e.g. "BraTS19_SYN_0001".
    group: "HGG" or "LGG".
    images: modality (constants.MODALITIES) -> [240, 240, 155] int16, >= 0.
    seg: [240, 240, 155] uint8 in {0, 1, 2, 4}.
    meta: JSON-able facts about the case (tumour centre in storage voxels, grade, sizes).
  """

  name: str
  group: str
  images: dict[str, np.ndarray]
  seg: np.ndarray
  meta: dict[str, Any]


def case_name(index: int) -> str:
  """Name of the case with 0-based `index`: BraTS19_SYN_0001 for index 0."""
  return f"{CASE_PREFIX}{index + 1:04d}"


def case_rng(seed: int, index: int) -> np.random.Generator:
  """The generator of case `index` of the cohort with `seed`."""
  return np.random.default_rng(np.random.SeedSequence([seed, index]))


def synthesize_case(index: int, seed: int = 0, *, lgg_fraction: float = 0.0,
                    maps: anatomy.TissueMaps | None = None) -> Case:
  """Makes case `index` of the cohort with `seed` (no files written).

  Args:
    index: 0-based case index; the name is case_name(index).
    seed: the cohort's seed, >= 0.
    lgg_fraction: probability that the case is a lower-grade glioma (filed under LGG/).
    maps: template tissue maps; anatomy.load_tissue_maps(1) when None.

  Returns:
    The Case, in BraTS storage orientation: the same bytes in any process and with any
    number of threads its numerical libraries were started with.
  """
  maps = anatomy.load_tissue_maps(1) if maps is None else maps
  with threadpoolctl.threadpool_limits(1):
    return _synthesize(index, seed, lgg_fraction, maps)


def _synthesize(index: int, seed: int, lgg_fraction: float, maps: anatomy.TissueMaps) -> Case:
  rng = case_rng(seed, index)
  params = anatomy.draw_case_params(rng, lgg_fraction)
  body = anatomy.case_anatomy(maps, params)
  images = physics.mr_images(
      body.frac, body.tumour_frac, body.sel, body.ijk, relaxation=params.relaxation,
      gains=params.gains, bias=params.bias, noise=params.noise, rng=rng)
  ijk, centre, labels = body.ijk, body.centre, body.labels

  # Scatter straight into BraTS storage order: x and y flipped, Fortran (NIfTI) layout.
  flat = np.ravel_multi_index(
      (_SHAPE[0] - 1 - ijk[0], _SHAPE[1] - 1 - ijk[1], ijk[2]), _SHAPE, order="F")
  out_images = {}
  for m, modality in enumerate(constants.MODALITIES):
    vol = np.zeros(_SHAPE, np.int16, order="F")
    vol.ravel(order="F")[flat] = images[m]
    out_images[modality] = vol
  seg = np.zeros(_SHAPE, np.uint8, order="F")
  (x0, y0, z0), (bx, by, bz) = body.box_lo, labels.shape
  x1, y1 = _SHAPE[0] - x0, _SHAPE[1] - y0  # flipped: RAS index i is storage index 239 - i
  seg[x1 - bx:x1, y1 - by:y1, z0:z0 + bz] = labels[::-1, ::-1, :]

  name = case_name(index)
  storage_centre = [_SHAPE[0] - 1 - centre[0], _SHAPE[1] - 1 - centre[1], centre[2]]
  counts = {str(v): int((labels == v).sum()) for v in (1, 2, 4)}
  whole = sum(counts.values())
  meta = {
      "case": name,
      "group": params.group,
      "synthetic": True,
      "has_enhancing": params.has_enhancing,
      "has_necrosis": params.has_necrosis,
      "tumour_centre_voxel": [round(float(c), 1) for c in storage_centre],
      "whole_tumour_diameter_mm": round(float((6.0 * whole / np.pi)**(1 / 3)), 1),
      "label_voxels": counts,
  }
  return Case(name, params.group, out_images, seg, meta)


# ---------------------------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------------------------

_DESCRIP = b"SYNTHETIC tracin_jax cohort, not patient data"


def _write_nifti_gz(path: pathlib.Path, volume: np.ndarray) -> None:
  """Writes a .nii.gz with BRATS_AFFINE: gzip level 1, mtime 0 (byte-reproducible)."""
  header = nib.Nifti1Header()
  header.set_data_shape(volume.shape)
  header.set_data_dtype(volume.dtype)
  header.set_qform(constants.BRATS_AFFINE, code=1)
  header.set_sform(constants.BRATS_AFFINE, code=1)
  header.set_xyzt_units("mm", "sec")
  header["descrip"] = _DESCRIP
  buffer = io.BytesIO()
  header.write_to(buffer)
  if buffer.tell() != int(header["vox_offset"]):
    raise AssertionError("unexpected NIfTI header size")
  # wbits 31: a gzip stream with mtime 0. Run-length matching only (Z_RLE) is faster than
  # level 1's default and smaller on these noisy volumes; any gzip reader reads it.
  gz = zlib.compressobj(1, zlib.DEFLATED, 31, 8, zlib.Z_RLE)
  with open(path, "wb") as f:
    f.write(gz.compress(buffer.getvalue()))
    f.write(gz.compress(memoryview(np.asfortranarray(volume).ravel(order="F"))))
    f.write(gz.flush())


def case_files(case_dir: str | os.PathLike, name: str | None = None) -> dict[str, pathlib.Path]:
  """kind (t1, t1ce, t2, flair, seg) -> path of <case_dir>/<name>_<kind>.nii.gz.

  `name` defaults to the directory's name, as in BraTS.
  """
  case_dir = pathlib.Path(case_dir)
  name = case_dir.name if name is None else name
  return {k: case_dir / f"{name}_{k}.nii.gz" for k in FILE_KINDS}


def write_case(case: Case, case_dir: str | os.PathLike) -> None:
  """Writes the five files of `case` into `case_dir` (which must exist)."""
  files = case_files(case_dir, case.name)
  for modality, volume in case.images.items():
    _write_nifti_gz(files[modality], volume)
  _write_nifti_gz(files[constants.SEG_SUFFIX], case.seg)


# ---------------------------------------------------------------------------------------------
# Cohorts.
# ---------------------------------------------------------------------------------------------

# Template maps handed to worker processes (so they need not import nilearn).
_PROCESS_MAPS: dict[int, anatomy.TissueMaps] = {}


def _maps(resolution: int) -> anatomy.TissueMaps:
  return _PROCESS_MAPS.get(resolution) or anatomy.load_tissue_maps(resolution)


def _die_with_parent(parent: int) -> None:
  """Ends this worker process as soon as its parent ends, even by SIGKILL: Linux's
  PR_SET_PDEATHSIG where there is one, and a thread that watches the parent's pid."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
  except (OSError, AttributeError, TypeError):
    pass  # not Linux: the thread alone

  def watch():
    while os.getppid() == parent:
      time.sleep(0.5)
    os._exit(1)  # pylint: disable=protected-access  # no cleanup: the parent is gone

  threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def _init_worker(resolution: int, maps_queue, parent: int) -> None:
  """Ties the worker to its parent, then waits for the parent's template maps (the parent
  loads them while workers start).

  None means the parent failed; a task then loads them itself (and meets the same error).
  """
  _die_with_parent(parent)
  maps = maps_queue.get()
  if maps is not None:
    _PROCESS_MAPS[resolution] = maps


def _make_case(root: str, index: int, settings: dict[str, Any]) -> dict[str, Any]:
  """Synthesises case `index` and moves its finished directory into place; returns its meta."""
  case = synthesize_case(index, settings["seed"], lgg_fraction=settings["lgg_fraction"],
                         maps=_maps(settings["template_resolution"]))
  group_dir = pathlib.Path(root) / case.group
  group_dir.mkdir(exist_ok=True)
  tmp = group_dir / f".{case.name}.tmp"
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir()
  write_case(case, tmp)
  final = group_dir / case.name
  if final.exists():  # a leftover of an interrupted run of this cohort
    shutil.rmtree(final)
  os.replace(tmp, final)
  return case.meta


def _settings(num_cases: int, seed: int, lgg_fraction: float,
              template_resolution: int) -> dict[str, Any]:
  if not isinstance(num_cases, (int, np.integer)) or num_cases < 1:
    raise ValueError(f"num_cases must be a positive integer, got {num_cases!r}")
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
  if not 0.0 <= lgg_fraction <= 1.0:
    raise ValueError(f"lgg_fraction must be in [0, 1], got {lgg_fraction}")
  if template_resolution not in (1, 2):
    raise ValueError(f"template_resolution must be 1 or 2, got {template_resolution}")
  return {
      "generator": GENERATOR,
      "version": GENERATOR_VERSION,
      "synthetic": True,
      "seed": int(seed),
      "num_cases": int(num_cases),
      "lgg_fraction": float(lgg_fraction),
      "template_resolution": int(template_resolution),
  }


_SETTING_KEYS = ("version", "seed", "num_cases", "lgg_fraction", "template_resolution")


def _read_json(path: pathlib.Path) -> dict[str, Any] | None:
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError):
    return None
  return data if isinstance(data, dict) else None


def _differences(found: Mapping[str, Any], wanted: Mapping[str, Any]) -> str:
  return ", ".join(f"{k}={found.get(k)!r} (asked {wanted[k]!r})"
                   for k in _SETTING_KEYS if found.get(k) != wanted[k])


def _existing_cases(root: pathlib.Path, settings: Mapping[str, Any]) -> dict[str, dict]:
  """Finished cases (name -> meta) of the cohort in `root`; raises if root is not ours.

  Raises:
    FileExistsError: root is not empty and holds no cohort with these settings.
    NotADirectoryError: root is a file.
  """
  if not root.exists():
    return {}
  if not root.is_dir():
    raise NotADirectoryError(f"{root} exists and is not a directory")
  for marker in (COHORT_FILE, PARTIAL_FILE):
    if (root / marker).exists():
      data = _read_json(root / marker)
      if data is None or not data.get("synthetic"):
        raise FileExistsError(
            f"{root / marker} is not a synthetic cohort record written by {GENERATOR}; "
            "refusing to write into that directory.")
      if _differences(data, settings):
        raise FileExistsError(
            f"{root} holds a synthetic cohort with other settings "
            f"({_differences(data, settings)}); choose another directory or delete it.")
      cases = data.get("cases", [])
      metas = cases if isinstance(cases, list) else list(cases.values())
      return {m["case"]: m for m in metas
              if all(f.exists() for f in case_files(root / m["group"] / m["case"]).values())}
  if any(p.name != PARTIAL_FILE + ".tmp" for p in root.iterdir()):
    raise FileExistsError(
        f"{root} is not empty and holds no synthetic cohort ({COHORT_FILE}); refusing to "
        "write into it. Choose an empty or new directory.")
  return {}


_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _default_workers(num_todo: int) -> int:
  return max(1, min(os.cpu_count() or 1, 4, num_todo))


def generate_cohort(out_dir: str | os.PathLike, num_cases: int, seed: int = 0, *,
                    workers: int | None = None, progress: bool = True,
                    lgg_fraction: float = 0.0,
                    template_resolution: int = 1) -> list[pathlib.Path]:
  """Writes a synthetic cohort in the BraTS 2019 layout (see `tracin_jax.data.synthetic`).

  Only an empty or new directory, or one holding this very cohort (finished, or interrupted:
  it resumes), is written to; cases already finished are kept.

  Args:
    out_dir: cohort root.
    num_cases: number of cases, BraTS19_SYN_0001 ... .
    seed: cohort seed (>= 0); case i draws from SeedSequence([seed, i]).
    workers: processes; None picks min(cpu count, 4, cases to make), 1 runs in this process.
      The files do not depend on it. Workers are spawned, so a script that asks for more
      than one needs the usual `if __name__ == "__main__":` guard.
    progress: log progress at INFO: a line at the start, one per tenth of the cases made
      (with the time left) and one at the end.
    lgg_fraction: probability of a lower-grade glioma, filed under LGG/ (default all HGG).
    template_resolution: 1 or 2 (mm) MNI templates.

  Returns:
    The case directories, in case order.

  Raises:
    FileExistsError: out_dir is not empty and holds no cohort with these settings.
  """
  settings = _settings(num_cases, seed, lgg_fraction, template_resolution)
  root = pathlib.Path(out_dir)
  done = _existing_cases(root, settings)
  names = [case_name(i) for i in range(num_cases)]
  todo = [i for i, n in enumerate(names) if n not in done]
  if not todo and (root / COHORT_FILE).exists():
    return [root / done[n]["group"] / n for n in names]

  start = time.perf_counter()
  root.mkdir(parents=True, exist_ok=True)
  record = dict(settings, cases={n: done[n] for n in names if n in done})
  outputs.write_json(root / PARTIAL_FILE, record)  # first: the directory is now known to be ours
  (root / COHORT_FILE).unlink(missing_ok=True)
  workers = _default_workers(len(todo)) if workers is None else max(1, int(workers))
  workers = min(workers, max(len(todo), 1))
  if progress and todo:
    _log.info("[synthetic] writing %d of %d synthetic cases to %s (seed %d, %d worker%s)",
              len(todo), num_cases, root, seed, workers, "s" if workers > 1 else "")
  made, tenths_logged = 0, 0

  def finished(meta):
    nonlocal made, tenths_logged
    record["cases"][meta["case"]] = meta
    outputs.write_json(root / PARTIAL_FILE, record)
    made += 1
    tenths = 10 * made // len(todo)
    if progress and tenths > tenths_logged:  # one line per tenth of the cases, at most
      tenths_logged = tenths
      elapsed = time.perf_counter() - start
      left = elapsed / made * (len(todo) - made)
      _log.info("[synthetic] %d/%d %s (%s), %.1f s%s", len(record["cases"]), num_cases,
                meta["case"], meta["group"], elapsed,
                f", about {left:.0f} s left" if made < len(todo) else "")

  if workers == 1:
    for i in todo:
      finished(_make_case(str(root), i, settings))
  elif todo:
    # "spawn": safe in a parent that runs JAX threads. One BLAS thread per worker: the
    # workers already fill the cores, and their matrix products are small.
    context = multiprocessing.get_context("spawn")
    maps_queue = context.Queue()
    saved = {k: os.environ.get(k) for k in _THREAD_VARS}
    os.environ.update({k: "1" for k in _THREAD_VARS})
    try:
      with concurrent.futures.ProcessPoolExecutor(
          workers, mp_context=context, initializer=_init_worker,
          initargs=(template_resolution, maps_queue, os.getpid())) as pool:
        # Submitting starts the workers; they import while this process loads the maps.
        futures = [pool.submit(_make_case, str(root), i, settings) for i in todo]
        try:
          try:
            maps = anatomy.load_tissue_maps(template_resolution)
          except BaseException:
            for _ in range(workers):
              maps_queue.put(None)
            raise
          for _ in range(workers):
            maps_queue.put(maps)
          for future in concurrent.futures.as_completed(futures):
            finished(future.result())
        except BaseException:
          for future in futures:  # stop at once; what is finished stays for a resume
            future.cancel()
          raise
    finally:
      for k, v in saved.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v

  metas = [record["cases"][n] for n in names]
  outputs.write_json(root / COHORT_FILE, dict(
      settings,
      description=("Synthetic brain-tumour cohort in the BraTS 2019 layout, generated by "
                   "tracin_jax from the MNI ICBM152 2009 templates. Not patient data."),
      cases=metas))
  (root / PARTIAL_FILE).unlink()
  if progress:
    _log.info("[synthetic] %d cases in %s (%d made in %.1f s)", num_cases, root, len(todo),
              time.perf_counter() - start)
  return [root / m["group"] / m["case"] for m in metas]


def ensure_cohort(out_dir: str | os.PathLike, num_cases: int, seed: int = 0,
                  **kwargs) -> pathlib.Path:
  """The root of the cohort with these settings in out_dir, generated only if not there.

  A finished cohort (its cohort.json matches and every case is on disk) is returned
  untouched; an interrupted one is completed. kwargs go to generate_cohort.
  """
  generate_cohort(out_dir, num_cases, seed, **kwargs)
  return pathlib.Path(out_dir)


# ---------------------------------------------------------------------------------------------
# The cohort in the layouts of later BraTS releases.
# ---------------------------------------------------------------------------------------------

# Case folder names of case index i (0-based) in each layout the cohort can be written in.
LAYOUT_CASE_NAMES = {
    "brats2020": "BraTS20_Training_{n:03d}",
    "brats2021": "BraTS2021_{n:05d}",
    "brats2023": "BraTS-GLI-{n:05d}-000",
}


def write_in_layout(cohort_root: str | os.PathLike, out_dir: str | os.PathLike,
                    layout: str) -> list[pathlib.Path]:
  """Writes a cohort (the BraTS 2019 layout, from `generate_cohort`) again in the layout of
  a later release: case folders renamed (`LAYOUT_CASE_NAMES`), files named as the release
  names them, and the 2023 segmentation relabelled (enhancing tumour 4 -> 3). The images
  are hard links to the cohort's files where the file system allows, else copies.

  Args:
    cohort_root: the cohort's root (holding HGG/ and, maybe, LGG/).
    out_dir: the new root (made; its case folders must not exist yet).
    layout: "brats2020", "brats2021" or "brats2023".

  Returns:
    The new case folders, in the cohort's order (HGG first, then LGG).
  """
  from tracin_jax.data import layouts  # pylint: disable=g-import-not-at-top

  if layout not in LAYOUT_CASE_NAMES:
    raise ValueError(f"layout must be one of {', '.join(LAYOUT_CASE_NAMES)}, got {layout!r}.")
  spec = layouts.get_layout(layout)
  root, out = pathlib.Path(cohort_root), pathlib.Path(out_dir)
  sources = [d for group in constants.GROUPS if (root / group).is_dir()
             for d in sorted((root / group).iterdir()) if d.is_dir()]
  out.mkdir(parents=True, exist_ok=True)
  written = []
  for n, source in enumerate(sources, start=1):
    case_id = LAYOUT_CASE_NAMES[layout].format(n=n)
    case_dir = out / case_id
    case_dir.mkdir()
    for kind, path in case_files(source).items():
      target = case_dir / spec.file_name(case_id, kind)
      if kind == constants.SEG_SUFFIX and layout == "brats2023":
        seg = np.asarray(nib.load(path).dataobj)
        _write_nifti_gz(target, layouts.to_layout_labels(constants.remap_labels(seg),
                                                         layout).astype(np.uint8))
        continue
      try:
        os.link(path, target)
      except OSError:
        shutil.copyfile(path, target)
    written.append(case_dir)
  return written
