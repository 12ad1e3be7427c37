"""The experiment's stages: orchestration over the library, one contract for all.

    from tracin_jax import stages
    stages.list_stages()  # ('train', 'influence', 'interpret', 'saliency', 'export',
                          #  'validate', 'lds', 'report')
    context = stages.Context(workdir, train_set, val_set, data_name="synthetic cohort")
    result = stages.run_stage(stages.get_stage("influence"), context)

Each stage is a class in its own module (`train`, `influence`, `interpret`, `saliency`,
`export`, `validate`, `lds`, `report`), registered by name; the order a run runs them is one tuple,
`tracin_jax.rundir.STAGES`, and the modules are imported (so registered) in that order. A
new stage is its module and its name in that tuple. `base` holds the contract (`Stage`), the
`Context` every stage receives and the resume mechanism (`Parts`); the manifest each stage
writes and the names of its files live below every stage, in `tracin_jax.rundir`, where the
report and other readers find them. The analysis itself lives in the library packages
(`training`, `influence`, `interpret`, `saliency`, `checks`, `patient`); a stage only calls it,
writes files and lists them.
"""

import importlib

from tracin_jax import rundir
from tracin_jax.stages import base

for _name in rundir.STAGES:  # registration order is run order
  importlib.import_module(f"{__name__}.{_name}")
del _name

# pylint: disable=g-bad-import-order,wrong-import-position
from tracin_jax.stages import export  # noqa: E402
from tracin_jax.stages import influence  # noqa: E402
from tracin_jax.stages import interpret  # noqa: E402
from tracin_jax.stages import lds  # noqa: E402
from tracin_jax.stages import report  # noqa: E402
from tracin_jax.stages import saliency  # noqa: E402
from tracin_jax.stages import train  # noqa: E402
from tracin_jax.stages import validate  # noqa: E402
from tracin_jax.stages.base import MANIFEST
from tracin_jax.stages.base import Context
from tracin_jax.stages.base import Manifest
from tracin_jax.stages.base import Parts
from tracin_jax.stages.base import Stage
from tracin_jax.stages.base import StageError
from tracin_jax.stages.base import get_stage
from tracin_jax.stages.base import list_stages
from tracin_jax.stages.base import read_manifest
from tracin_jax.stages.base import register_stage
from tracin_jax.stages.base import run_stage

__all__ = [
    "MANIFEST",
    "Context",
    "Manifest",
    "Parts",
    "Stage",
    "StageError",
    "base",
    "export",
    "get_stage",
    "influence",
    "interpret",
    "lds",
    "list_stages",
    "read_manifest",
    "register_stage",
    "report",
    "run_stage",
    "saliency",
    "train",
    "validate",
]
