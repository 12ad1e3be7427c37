"""A small text progress bar for long work (training epochs, gradients, Gram blocks).

On a terminal it redraws one line; elsewhere (logs, CI, notebooks' captured stderr) it
prints a line at most every `log_interval` seconds and at the end, so logs stay short.
"""

from __future__ import annotations

import sys
import time


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  m, s = divmod(seconds, 60)
  h, m = divmod(m, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressBar:
  """Progress of `total` units of work, with elapsed time and time left.

  Usage:
    bar = ProgressBar(32, "epoch 1/10")
    for batch in batches:
      ...
      bar.update(1, loss=0.42)
    bar.close()
  """

  def __init__(self, total: int, desc: str = "", *, stream=None, enabled: bool = True,
               log_interval: float = 10.0, width: int = 24):
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
    self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
    self._closed = False

  def set_postfix(self, **values) -> None:
    self.postfix.update(values)

  def update(self, n: int = 1, **values) -> None:
    self.count += n
    self.postfix.update(values)
    now = time.perf_counter()
    if self.enabled and (self._tty or now - self._last_print >= self.log_interval):
      self._print(now)

  def line(self, now: float | None = None) -> str:
    now = time.perf_counter() if now is None else now
    elapsed = now - self._start
    frac = self.count / self.total if self.total else 1.0
    filled = int(round(self.width * min(frac, 1.0)))
    bar = "#" * filled + "." * (self.width - filled)
    left = elapsed / self.count * (self.total - self.count) if self.count else float("nan")
    left_s = _fmt_time(left) if left == left else "--:--"
    post = " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.postfix.items())
    return (f"{self.desc} [{bar}] {self.count}/{self.total} "
            f"{_fmt_time(elapsed)}<{left_s} {post}").rstrip()

  def _print(self, now: float) -> None:
    self._last_print = now
    if self._tty:
      self.stream.write("\r" + self.line(now) + "\x1b[K")
    else:
      self.stream.write(self.line(now) + "\n")
    self.stream.flush()

  def close(self) -> None:
    if self._closed:
      return
    self._closed = True
    if self.enabled:
      self._print(time.perf_counter())
      if self._tty:
        self.stream.write("\n")
        self.stream.flush()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
