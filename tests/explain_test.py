"""Explaining new images from the influence stage's gradient store, on the tiny run."""

import json

import numpy as np
import pytest
import tiny_run

from tracin_jax import explain
from tracin_jax import stages
from tracin_jax.influence import core
from tracin_jax.influence import layout
from tracin_jax.influence import segmentation
from tracin_jax.influence import store as store_lib
from tracin_jax.stages import influence as influence_stage

# The stage tests' settings (tests/stages/stages_test.py): one run serves both modules.
CONFIGS = {"train": tiny_run.CONFIG,
           "influence": influence_stage.InfluenceConfig(threshold=0.5, top_k=3, global_top=3,
                                                        num_local_panels=1)}


@pytest.fixture(scope="module")
def influenced(full_run):
  context = stages.Context(full_run[0], tiny_run.TRAIN, tiny_run.VAL,
                           data_name="tiny test set", configs=CONFIGS, progress=False)
  for name in ("train", "influence"):
    result = stages.run_stage(stages.get_stage(name, CONFIGS[name]), context)
  return context, result


def test_the_stage_writes_a_complete_store(influenced):
  context, _ = influenced
  store = store_lib.open_store(context.workdir / "influence" / "store")
  assert store.is_complete() and store.num_examples == len(tiny_run.TRAIN)
  assert store.meta["projection"]["kind"] == "countsketch"
  assert store.meta["example_ids"][0] == "{}:{}".format(*tiny_run.TRAIN.ids[0])
  headline = stages.read_manifest(context.workdir, "influence")["headline"]
  assert headline["store"]["bytes"] == store.nbytes() > 0


def test_explaining_an_image_equals_influence_with_the_store_projection(influenced, tmp_path):
  context, inf = influenced
  store = store_lib.open_store(context.workdir / "influence" / "store")
  run = explain.load_run(context.workdir)
  a = int(np.argmax(inf.presence_test.sum(1)))
  result = explain.explain_image(context.workdir, tiny_run.VAL.images[a], name="val", k=3)
  train_ex = influence_stage._examples(tiny_run.TRAIN, inf.train_regions)  # pylint: disable=protected-access
  image = tiny_run.VAL.images[a:a + 1]
  # An unlabelled image's region losses take the model's own prediction as target.
  own = np.argmax(np.asarray(segmentation.call_model(run.final_apply, run.params, image,
                                                     run.state)), -1).astype(np.int32)
  val_ex = {"image": image, "target": own, "region": inf.val_regions[a:a + 1]}
  expect = core.influence(run.loss_fn, run.checkpoints, train_ex, val_ex,
                          projection=store.projection)
  expect = layout.to_class_blocks(segmentation.mask_absent(
      expect, inf.presence_test[a:a + 1], inf.presence_train))
  np.testing.assert_allclose(result.blocks, expect, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(result.regions, inf.val_regions[a])
  assert {e["class"] for e in result.proponents} == {
      influence_stage.CLASS_NAMES[i] for i in np.flatnonzero(inf.presence_test[a])}
  paths = explain.write_explanation(result, tmp_path, tiny_run.TRAIN,
                                    train_regions=inf.train_regions, k=3)
  assert [p.name for p in paths] == ["val.json", "val.png"]
  written = json.loads(paths[0].read_text())
  assert written["explanations"] == json.loads(json.dumps(result.proponents))
  assert written["method"] == {"renormalised": False, "projection": store.meta["projection"],
                               "checkpoints": [c["name"] for c in store.meta["checkpoints"]]}


def test_an_exact_store_gives_the_stage_scores(influenced, tmp_path):
  context, inf = influenced
  run = explain.load_run(context.workdir)
  train_ex = influence_stage._examples(tiny_run.TRAIN, inf.train_regions)  # pylint: disable=protected-access
  val_ex = influence_stage._examples(tiny_run.VAL, inf.val_regions)  # pylint: disable=protected-access
  exact = store_lib.build_store(tmp_path / "exact", run.loss_fn, run.checkpoints, train_ex)
  scores = exact.influence(run.loss_fn, run.checkpoints, val_ex)
  blocks = layout.to_class_blocks(segmentation.mask_absent(scores, inf.presence_test,
                                                           inf.presence_train))
  np.testing.assert_allclose(blocks, inf.test_blocks, rtol=2e-4, atol=1e-6)
  train_blocks = layout.to_class_blocks(segmentation.mask_absent(
      exact.train_influence(), inf.presence_train, inf.presence_train))
  np.testing.assert_allclose(train_blocks, inf.train_blocks, rtol=2e-4, atol=1e-6)


def test_bad_images_and_missing_stores_are_named(influenced, tmp_path):
  context, _ = influenced
  with pytest.raises(ValueError, match=r"image must be \["):
    explain.explain_image(context.workdir, tiny_run.VAL.images[0][:-1])
  with pytest.raises(FileNotFoundError, match="no gradient store"):
    explain.explain_image(tmp_path, tiny_run.VAL.images[0])
