"""The global_explanation notebook: Fig. 4-7 and the two checks, on the toy run."""

import re

import pytest
from notebook_run import check_stripped, execute, images, outputs_text

NAME = "global_explanation.ipynb"


def test_global_explanation_is_committed_without_outputs():
  check_stripped(NAME)


@pytest.mark.slow
def test_global_explanation_notebook_executes(toy_run, tmp_path, monkeypatch):
  nb = execute(NAME, tmp_path, monkeypatch, toy_run)
  text = outputs_text(nb)
  # The notebook recomputes FI and the feature impact and compares them with the stage's
  # (assert_allclose in the cells), so getting here means they agree.
  assert re.search(r"FI \(3, 8, \d+\) \(class, feature, rank\)", text), text[-3000:]
  auc = re.search(r"class-block AUC: trained ([\d.]+), randomised ([\d.]+)", text)
  assert auc and all(0.0 <= float(v) <= 1.0 for v in auc.groups())
  rows = re.findall(r"^(NCR/NET|ED|ET) +BraTS19_SYN_\d+ z\d+ +[\d.]+ +[-+][\d.]+ +[-+][\d.]+ "
                    r"+[-+][\d.]+$", text, re.M)
  assert sorted(rows) == ["ED", "ET", "NCR/NET"], "one retrained region per class"
  assert len(images(nb)) == 7, "Fig. 4, Fig. 5, Fig. 6 per class, Fig. 7, randomisation"
