"""Tests of the text progress bar."""

import io

from tracin_jax.progress import ProgressBar


def test_progress_lines_count_and_time_left():
  out = io.StringIO()
  bar = ProgressBar(4, "epoch 1/2", stream=out, log_interval=0.0)
  bar.update(1, loss=0.5)
  bar.update(1, loss=0.25)
  bar.close()
  lines = out.getvalue().strip().splitlines()
  assert lines[0].startswith("epoch 1/2 [") and "1/4" in lines[0] and "loss=0.5" in lines[0]
  assert "2/4" in lines[-1] and "loss=0.25" in lines[-1]
  assert "<" in lines[-1]  # elapsed<left


def test_progress_disabled_prints_nothing_and_interval_limits_lines():
  out = io.StringIO()
  bar = ProgressBar(100, "x", stream=out, enabled=False)
  bar.update(50)
  bar.close()
  assert out.getvalue() == ""
  out = io.StringIO()
  bar = ProgressBar(100, "x", stream=out, log_interval=3600)
  for _ in range(100):
    bar.update(1)
  bar.close()
  assert len(out.getvalue().strip().splitlines()) == 2  # the first update and the close


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_a_terminal_gets_a_tqdm_bar_with_the_time_left():
  out = _Terminal()
  with ProgressBar(4, "epoch 1/2", stream=out) as bar:
    assert bar._tqdm is not None  # pylint: disable=protected-access
    for _ in range(4):
      bar.update(1, loss=0.5)
  text = out.getvalue()
  assert "epoch 1/2" in text and "4/4" in text and "loss=0.5" in text
  assert "<00:00" in text  # tqdm's elapsed<remaining


def test_modes_are_checked():
  import pytest  # pylint: disable=g-import-not-at-top

  with pytest.raises(ValueError, match="mode must be"):
    ProgressBar(1, mode="fancy")
