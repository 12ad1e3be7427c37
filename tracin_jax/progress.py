"""Progress of long work (training epochs, gradients, Gram blocks, cohorts, retrainings).

In a terminal and in a notebook, a `tqdm.auto` bar with the rate and the time left (a widget
in Jupyter and Colab); elsewhere (logs, CI, output piped to a file) one plain line at most
every `log_interval` seconds and one at the end, so logs stay short.

`Progress` says where a computation of example gradients (`influence`, `self_influence`, the
gradient store) stands, and is what their `progress` callbacks receive; `Reporter` counts
the gradients and calls such a callback, or draws a bar.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Callable


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  m, s = divmod(seconds, 60)
  h, m = divmod(m, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def in_notebook() -> bool:
  """Whether this runs in a Jupyter (or Colab) kernel, where a widget shows progress."""
  shell = sys.modules.get("IPython")
  if shell is None or not hasattr(shell, "get_ipython"):
    return False
  ip = shell.get_ipython()
  return ip is not None and type(ip).__name__ in ("ZMQInteractiveShell", "Shell")


def _format(value: Any) -> str:
  return f"{value:.4g}" if isinstance(value, float) else str(value)


class ProgressBar:
  """Progress of `total` units of work, with elapsed time and time left.

  Usage:
    with ProgressBar(32, "epoch 1/10") as bar:
      for batch in batches:
        ...
        bar.update(1, loss=0.42)

  Args:
    total: units of work.
    desc: what is being done ("epoch 1/10 (adam)").
    stream: where to write (default sys.stderr).
    enabled: False shows nothing.
    log_interval: seconds between plain lines when the stream is not a terminal.
    width: characters of the plain line's bar.
    mode: "auto" (tqdm in a terminal or a notebook, plain lines elsewhere), "tqdm" or "lines".
  """

  def __init__(self, total: int, desc: str = "", *, stream=None, enabled: bool = True,
               log_interval: float = 10.0, width: int = 24, mode: str = "auto"):
    self.total = max(int(total), 0)
    self.desc = desc
    self.stream = stream if stream is not None else sys.stderr
    self.enabled = enabled
    self.width = width
    self.log_interval = log_interval
    self.count = 0
    self.postfix: dict[str, object] = {}
    self._start = time.perf_counter()
    self._last_print = -float("inf")
    self._closed = False
    if mode not in ("auto", "tqdm", "lines"):
      raise ValueError(f"mode must be 'auto', 'tqdm' or 'lines', got {mode!r}")
    tty = bool(getattr(self.stream, "isatty", lambda: False)())
    self._tqdm = None
    if enabled and (mode == "tqdm" or (mode == "auto" and (tty or in_notebook()))):
      from tqdm import auto  # pylint: disable=g-import-not-at-top

      self._tqdm = auto.tqdm(total=self.total, desc=desc, file=self.stream,
                             dynamic_ncols=True, leave=True, mininterval=0.5)

  def set_postfix(self, **values) -> None:
    self.postfix.update(values)
    if self._tqdm is not None:
      self._tqdm.set_postfix_str(self._post(), refresh=False)

  def _post(self) -> str:
    return " ".join(f"{k}={_format(v)}" for k, v in self.postfix.items() if v is not None)

  def update(self, n: int = 1, **values) -> None:
    self.count += n
    self.postfix.update(values)
    if not self.enabled:
      return
    if self._tqdm is not None:
      if values:
        self._tqdm.set_postfix_str(self._post(), refresh=False)
      self._tqdm.update(n)
      return
    now = time.perf_counter()
    if now - self._last_print >= self.log_interval:
      self._print(now)

  def line(self, now: float | None = None) -> str:
    """The plain line: desc [####....] count/total elapsed<left postfix."""
    now = time.perf_counter() if now is None else now
    elapsed = now - self._start
    frac = self.count / self.total if self.total else 1.0
    filled = int(round(self.width * min(frac, 1.0)))
    bar = "#" * filled + "." * (self.width - filled)
    left = elapsed / self.count * (self.total - self.count) if self.count else float("nan")
    left_s = _fmt_time(left) if left == left else "--:--"
    return (f"{self.desc} [{bar}] {self.count}/{self.total} "
            f"{_fmt_time(elapsed)}<{left_s} {self._post()}").rstrip()

  def _print(self, now: float) -> None:
    self._last_print = now
    self.stream.write(self.line(now) + "\n")
    self.stream.flush()

  def close(self) -> None:
    if self._closed:
      return
    self._closed = True
    if self._tqdm is not None:
      self._tqdm.close()
    elif self.enabled:
      self._print(time.perf_counter())

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


@dataclasses.dataclass(frozen=True)
class Progress:
  """Where a computation stands; what a `progress` callback receives.

  Attributes:
    checkpoint: checkpoints finished or in progress (1-based): the position, among the
      checkpoints the computation was given, of the one whose gradients are being computed.
    num_checkpoints: checkpoints in all.
    examples_done: example gradients computed so far (all checkpoints; an example whose
      gradient is recomputed for another group of blocks counts again).
    examples_total: example gradients the whole computation will compute.
    elapsed_s: seconds since the start.
    remaining_s: estimated seconds left (None before the first block).
    vectorize: the path that computed the last block's gradients ("loop" or "vmap"; with
      `vectorize="auto"`, the one measured fastest).
    checkpoint_examples_done: example gradients computed so far at this checkpoint.
    checkpoint_examples_total: example gradients this checkpoint will compute (None where
      the computation did not say).
  """

  checkpoint: int
  num_checkpoints: int
  examples_done: int
  examples_total: int
  elapsed_s: float
  remaining_s: float | None
  vectorize: str | None = None
  checkpoint_examples_done: int | None = None
  checkpoint_examples_total: int | None = None


class Reporter:
  """Counts example gradients and calls a progress callback or draws a progress bar.

  A computation over checkpoints calls `checkpoint` as each checkpoint starts and
  `examples` after each block of example gradients.

  Args:
    progress: True draws a `ProgressBar` ("tracin example gradients", on stderr) whose
      postfix names the checkpoint and the path; a callable receives a `Progress` after
      every block; False or None report nothing.
    num_checkpoints: checkpoints in all.
    examples_total: example gradients the whole computation will compute.

  Raises:
    ValueError: `progress` is neither a bool nor a callable.
  """

  def __init__(self, progress: bool | Callable[[Progress], None] | None,
               num_checkpoints: int, examples_total: int):
    if progress is True:
      self._callback, self._text = None, True
    elif progress is False or progress is None:
      self._callback, self._text = None, False
    elif callable(progress):
      self._callback, self._text = progress, False
    else:
      raise ValueError(f"progress must be a bool or a callable, got {progress!r}.")
    self._num_checkpoints, self._total = num_checkpoints, examples_total
    self._done, self._checkpoint = 0, 0
    self._checkpoint_done, self._checkpoint_total = 0, None
    self._start = time.perf_counter()
    self._bar = ProgressBar(examples_total, "tracin example gradients", enabled=self._text)

  def checkpoint(self, index: int, examples: int | None = None) -> None:
    """Checkpoint `index` (0-based) starts; it will compute `examples` example gradients."""
    self._checkpoint = index + 1
    self._checkpoint_done, self._checkpoint_total = 0, examples

  def examples(self, count: int, vectorize: str | None = None) -> None:
    """`count` more example gradients are done, computed by the path `vectorize`."""
    self._done += count
    self._checkpoint_done += count
    if not (self._callback or self._text):
      return
    elapsed = time.perf_counter() - self._start
    remaining = elapsed / self._done * (self._total - self._done) if self._done else None
    info = Progress(self._checkpoint, self._num_checkpoints, self._done, self._total,
                    elapsed, remaining, vectorize, self._checkpoint_done,
                    self._checkpoint_total)
    if self._callback:
      self._callback(info)
    if self._text:
      self._bar.update(count, checkpoint=f"{info.checkpoint}/{info.num_checkpoints}",
                       vectorize=vectorize)
      if self._done >= self._total:
        self._bar.close()
