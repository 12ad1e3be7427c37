"""The your_own_model notebook: TracIn and saliency on models defined in the notebook."""

import re

import pytest
from notebook_run import check_stripped, execute, images, outputs_text

NAME = "your_own_model.ipynb"


def test_your_own_model_is_committed_without_outputs():
  check_stripped(NAME)


@pytest.mark.slow
def test_your_own_model_notebook_executes(tmp_path, monkeypatch):
  nb = execute(NAME, tmp_path, monkeypatch)
  text = outputs_text(nb)
  # Self-influence finds the wrong labels (0.8 of 10 by chance); proponents share the class.
  found = re.search(r"wrong labels among the 10 highest self-influences: (\d+) of 10", text)
  assert found and int(found.group(1)) >= 6, text[-3000:]
  share = re.search(r"top-5 proponents labelled with the test example's class: ([\d.]+)", text)
  assert share and float(share.group(1)) >= 0.8
  # The segmenter's square explained: the noise channel gets the smallest share.
  shares = re.search(r"per channel \(square, bar, noise\): \[([\d.]+) +([\d.]+) +([\d.]+)\]", text)
  assert shares and float(shares.group(3)) < min(float(shares.group(1)), float(shares.group(2)))
  assert "test class square: classes of the top-5 proponents" in text
  assert len(images(nb)) == 3, "self-influence, classifier saliency, segmenter grid"
