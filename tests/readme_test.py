"""The README's code example runs as shown and gives what it says."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _example(marker: str) -> str:
  """The README's one python block that contains `marker`."""
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  found = [b for b in blocks if marker in b]
  assert len(found) == 1, f"{len(found)} python blocks of the README contain {marker!r}"
  return found[0]


def test_readme_python_example_runs():
  namespace: dict = {}
  code = _example("tracin_jax.self_influence(loss_fn")
  exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
  scores, self_inf = namespace["scores"], namespace["self_inf"]
  assert scores.shape == (5, 1, 100, 1)
  assert self_inf.shape == (100, 1)
  # The example's proponents are the largest scores of each test row.
  np.testing.assert_array_equal(
      namespace["prop_idx"][:, 0], np.argmax(scores[:, 0, :, 0], axis=1))


def test_readme_saliency_example_runs_on_a_unet_and_a_pure_jax_model():
  namespace: dict = {}
  code = _example("saliency.integrated_gradients(")
  exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
  images = namespace["images"]
  for name in ("grad", "guided", "smooth"):
    assert namespace[name].shape == images.shape
    assert np.abs(np.asarray(namespace[name])).sum() > 0
  ig = namespace["ig"]
  # The README's claims: with the "min" baseline, completeness within 3-5% of the change;
  # from the zero baseline the GroupNorm UNet's attributions sum to about 0, so the error
  # is the whole change.
  relative = np.abs(ig.completeness_error / ig.delta)
  assert np.all(relative < 0.06), relative
  unet, et = namespace["unet"], namespace["et"]
  import tracin_jax.saliency as saliency  # pylint: disable=g-import-not-at-top
  zero = saliency.integrated_gradients(unet.apply_fn, unet.params, images, et, steps=64)
  np.testing.assert_allclose(zero.completeness_error / zero.delta, -1.0, atol=0.01)
  assert namespace["cam"].cam.shape == images.shape[:3]
  assert namespace["own_cam"].upsampled.shape == images.shape[:3]
  assert "last_hidden" in namespace["flow"] and "bottleneck" in namespace["flow"]
  assert namespace["deletion"].auc.shape == (2,)
  # Guided backpropagation differs from the plain gradient on a ReLU model.
  plain = saliency.vanilla_gradient(namespace["apply_fn"], namespace["params"], images,
                                    namespace["ed"])
  assert not np.allclose(plain, namespace["guided"])


def test_readme_instance_example_runs():
  namespace: dict = {}
  code = _example("find_instances(")
  exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
  found, table = namespace["found"], namespace["table"]
  # Both true lesions are found: as true positives, or as false negatives through their mask.
  truth_lesions = [i for i in found if i.status in ("TP", "FN")]
  assert len(truth_lesions) >= 2 and len(table) == len(found)
  for lesion, row in zip(found, table):
    assert row["driver"].split()[0] in ("T1", "T1Gd", "T2", "FLAIR")
    assert row["curve"]["probability"].shape == (9,)
    assert abs(row["numbers"]["share"].sum() - 1) < 1e-6
