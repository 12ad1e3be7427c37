"""The influence stage's params_filter (--influence_params: TracIn on chosen layers) and
normalize (--influence_normalize: renormalised TracIn) settings."""

import dataclasses
import json
import logging
import shutil

import numpy as np
import pytest
import tiny_run

from tracin_jax import stages
from tracin_jax.stages.influence import InfluenceConfig

FULL = InfluenceConfig(threshold=0.5, top_k=3, global_top=3, num_local_panels=0)


def _run(workdir, config):
  context = stages.Context(workdir, tiny_run.TRAIN, tiny_run.VAL, data_name="tiny test set",
                           configs={"train": tiny_run.CONFIG, "influence": config},
                           progress=False)
  stages.run_stage(stages.get_stage("train", tiny_run.CONFIG), context)  # reuses the run
  return stages.run_stage(stages.get_stage("influence", config), context)


def test_params_filter_restricts_the_gradients_and_keys_the_saved_parts(
    full_run, tmp_path, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(full_run[0], workdir)  # the shared run stays as it is
  full = _run(workdir, FULL)
  head = dataclasses.replace(FULL, params_filter=("head",))
  caplog.clear()  # the full run's lines are captured too when the logger is already at INFO
  with caplog.at_level(logging.INFO, logger="tracin_jax"):
    last_layer = _run(workdir, head)
  assert "TracIn gradients restricted to head (2 arrays" in caplog.text
  assert "(1/2) reused" not in caplog.text  # the full run's saved sums are not taken
  assert last_layer.fingerprint != full.fingerprint
  present = np.isfinite(full.test_blocks)
  np.testing.assert_array_equal(np.isfinite(last_layer.test_blocks), present)
  assert not np.allclose(last_layer.test_blocks[present], full.test_blocks[present])
  # The head's gradients are a part of the full gradients: the self-influence
  # (diagonal of train-influence) can only shrink.
  k, n = full.train_blocks.shape[:2]
  own = lambda b: np.stack([b[i, :, i * n:(i + 1) * n].diagonal() for i in range(k)])
  head_self, full_self = own(last_layer.train_blocks), own(full.train_blocks)
  present = np.isfinite(full_self)
  assert present.any() and np.all(head_self[present] <= full_self[present] * (1 + 1e-5))

  with pytest.raises(stages.StageError, match=r"--influence_params: 'decodr' selects no "
                                              r"parameter; .*groups are .*head"):
    _run(workdir, dataclasses.replace(FULL, params_filter=("head", "decodr")))


def test_normalize_gives_renormalised_tracin_and_keys_its_parts(full_run, tmp_path, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(full_run[0], workdir)
  full = _run(workdir, FULL)
  assert (workdir / "influence" / "self_influence.png").is_file()
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="tracin_jax"):
    renorm = _run(workdir, dataclasses.replace(FULL, normalize=True))
  assert "Renormalised TracIn" in caplog.text and "(1/2) reused" not in caplog.text
  assert renorm.fingerprint != full.fingerprint
  present = np.isfinite(full.test_blocks)
  np.testing.assert_array_equal(np.isfinite(renorm.test_blocks), present)
  # Each checkpoint adds its learning rate times a cosine: a region with itself scores the
  # sum of the learning rates, and no pair scores more. A region holding no pixel of its
  # class in the target has loss 1 and gradient 0 under eq 6, renormalised or not.
  total = sum(renorm.learning_rates)
  k, n = renorm.train_blocks.shape[:2]
  own = lambda b: np.stack([b[i, :, i * n:(i + 1) * n].diagonal() for i in range(k)])
  renorm_self, full_self = own(renorm.train_blocks), own(full.train_blocks)
  moved = np.isfinite(full_self) & (full_self > 0)
  assert moved.any()
  np.testing.assert_allclose(renorm_self[moved], total, rtol=1e-4)
  np.testing.assert_array_equal(renorm_self[full_self == 0], 0)
  assert np.nanmax(np.abs(renorm.test_blocks)) <= total * (1 + 1e-4)
  assert not np.allclose(renorm.test_blocks[present] / total,
                         full.test_blocks[present] / np.nanmax(np.abs(full.test_blocks)))
  # The store holds unit rows too, and the flat self-influence figure is not drawn.
  assert json.loads((workdir / "influence" / "store" / "store.json").read_text())["normalize"]
  assert not (workdir / "influence" / "self_influence.png").exists()
  assert renorm.manifest.headline["renormalised"] is True
