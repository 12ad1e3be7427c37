"""The quickstart notebook runs top to bottom, so it never rots."""

import re

import pytest
from notebook_run import check_stripped, execute, images, outputs_text

NAME = "quickstart.ipynb"


def test_quickstart_is_committed_without_outputs():
  check_stripped(NAME)


@pytest.mark.slow
def test_quickstart_notebook_executes(toy_run, tmp_path, monkeypatch):
  nb = execute(NAME, tmp_path, monkeypatch, toy_run)
  text = outputs_text(nb)
  dice = re.search(r"validation hard Dice: (\{.*\})", text)
  assert dice, text[-2000:]
  assert "the same scores as the stage's" in text
  assert re.search(r"test \S+ +proponents", text) and re.search(r"test \S+ +opponents", text)
  assert len(images(nb)) == 3, "slice, proponent panel, saliency grid"
