"""The influence stage's TracIn terms: computed in one pass, each saved as its checkpoint
finishes, resumed per checkpoint and summed in checkpoint order; one bar per checkpoint."""

import numpy as np
import pytest

from tracin_jax import progress as progress_lib
from tracin_jax.stages import base
from tracin_jax.stages import influence as influence_stage

summed_parts = influence_stage._summed_parts  # pylint: disable=protected-access
checkpoint_progress = influence_stage._checkpoint_progress  # pylint: disable=protected-access

EPOCHS = [3, 4, 5]
TERMS = [np.random.default_rng(t).normal(size=(4, 3, 4, 3)).astype(np.float32)
         for t in range(len(EPOCHS))]


def _left_sum(parts):
  total = None
  for part in parts:
    total = part if total is None else total + part
  return total


class Terms:
  """`terms(todo)` of fixed arrays, recording each call and what was on disk as it ran."""

  def __init__(self, parts):
    self.parts, self.calls, self.saved_before = parts, [], []

  def __call__(self, todo):
    self.calls.append(list(todo))

    def each():
      for t in todo:
        self.saved_before.append([e for e in EPOCHS if self.parts.has(f"epoch{e}")])
        yield TERMS[t].copy()
    return each()


def _parts(tmp_path):
  return base.Parts(tmp_path / "parts", {"run": "x"}, what="influence")


def test_terms_are_computed_in_one_call_saved_as_they_finish_and_resumed(tmp_path):
  parts = _parts(tmp_path)
  terms = Terms(parts)
  total = summed_parts(parts, EPOCHS, terms, lambda term, epoch: term)
  assert terms.calls == [[0, 1, 2]]
  assert terms.saved_before == [[], [3], [3, 4]]  # each part saved before the next is formed
  np.testing.assert_array_equal(total, _left_sum(TERMS))
  for e, term in zip(EPOCHS, TERMS):
    np.testing.assert_array_equal(np.load(parts.dir / f"epoch{e}.npy"), term)

  (parts.dir / "epoch4.npy").unlink()  # as after a kill during the second checkpoint
  again = Terms(_parts(tmp_path))
  resumed = summed_parts(again.parts, EPOCHS, again, lambda term, epoch: term)
  assert again.calls == [[1]]
  np.testing.assert_array_equal(resumed, total)  # bit for bit

  done = Terms(_parts(tmp_path))
  summed_parts(done.parts, EPOCHS, done, lambda term, epoch: term)
  assert done.calls == []  # nothing left: no computation is even set up


def test_a_refused_term_is_not_saved_and_stops_the_pass(tmp_path):
  parts = _parts(tmp_path)
  terms = Terms(parts)

  def check(term, epoch):
    if epoch == 4:
      raise base.StageError("epoch 4 is not finite")
    return term

  with pytest.raises(base.StageError, match="epoch 4"):
    summed_parts(parts, EPOCHS, terms, check)
  assert [e for e in EPOCHS if parts.has(f"epoch{e}")] == [3]
  assert len(terms.saved_before) == 2  # the third checkpoint was never computed


def test_one_progress_bar_per_checkpoint_named_from_the_progress_record(capsys):
  report = checkpoint_progress(True, ["first", "second"])
  for checkpoint, done in ((1, 3), (1, 7), (2, 4), (2, 7)):
    report(progress_lib.Progress(checkpoint, 2, 7 * (checkpoint - 1) + done, 14, 0.1, 0.1,
                                 "loop", done, 7))
  lines = capsys.readouterr().err.strip().splitlines()
  assert lines[0].startswith("first [") and " 3/7 " in lines[0]
  assert [l.split(" [")[0] for l in lines] == ["first", "first", "second", "second"]
  assert " 7/7 " in lines[1] and " 7/7 " in lines[-1] and "path=loop" in lines[-1]
  assert checkpoint_progress(False, ["first"]) is False
