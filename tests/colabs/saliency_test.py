"""The saliency notebook: every method, faithfulness and lesions on the toy run."""

import re

import pytest
from notebook_run import check_stripped, execute, images, outputs_text

NAME = "saliency.ipynb"
METHODS = ("Gradient", "Guided backprop", "Integrated gradients", "Guided IG", "SmoothGrad",
           "Grad-CAM", "Guided Grad-CAM", "Grad-CAM++")


def test_saliency_is_committed_without_outputs():
  check_stripped(NAME)


@pytest.mark.slow
def test_saliency_notebook_executes(toy_run, tmp_path, monkeypatch):
  nb = execute(NAME, tmp_path, monkeypatch, toy_run)
  text = outputs_text(nb)
  table = {}
  for line in text.splitlines():
    row = re.match(r"(.+?) +(\d\.\d{3}) +(\d\.\d{3}) +(\d\.\d{3})? +(\d\.\d{3})$", line)
    if row:
      table[row.group(1)] = [float(v) if v else None for v in row.groups()[1:]]
  assert set(table) == set(METHODS) | {"random map"}, text[-3000:]
  # Every method beats the random map at deletion and insertion on this region.
  for method in METHODS:
    assert table[method][0] < table["random map"][0], method
    assert table[method][1] > table["random map"][1], method
  assert table["Integrated gradients"][2] is not None and table["Gradient"][2] is None
  assert re.search(r"\d+ lesions: \{'TP': \d+", text) and "driven by" in text
  assert len(images(nb)) == 5, "grid, information flow, curves, modality shares, context"
