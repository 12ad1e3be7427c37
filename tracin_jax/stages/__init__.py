"""The experiment's stages: orchestration over the library, one contract for all.

    from tracin_jax import stages
    stages.list_stages()  # ('train', 'influence', 'interpret', 'saliency', 'validate',
                          #  'lds', 'report')
    context = stages.Context(workdir, train_set, val_set, data_name="synthetic cohort")
    result = stages.run_stage(stages.get_stage("influence"), context)

Each stage is a class in its own module (`train`, `influence`, `interpret`, `saliency`, `validate`,
`lds`, `report`),
registered by name in the order the stages run; `base` holds the contract (`Stage`),
the `Context` every stage receives, the per-stage `manifest.json` and the resume mechanism
(`Parts`). The analysis itself lives in the library packages (`training`, `influence`,
`interpret`, `checks`); a stage only calls it, writes files and lists them.
"""

from tracin_jax.stages import base
from tracin_jax.stages import train  # registration order is run order
from tracin_jax.stages import influence  # pylint: disable=g-bad-import-order
from tracin_jax.stages import interpret  # pylint: disable=g-bad-import-order
from tracin_jax.stages import saliency  # pylint: disable=g-bad-import-order
from tracin_jax.stages import validate  # pylint: disable=g-bad-import-order
from tracin_jax.stages import lds  # pylint: disable=g-bad-import-order
from tracin_jax.stages import report  # pylint: disable=g-bad-import-order
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
