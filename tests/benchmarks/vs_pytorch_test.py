"""benchmarks/vs_pytorch.py --quick runs every method and they agree (needs the bench extra)."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("torch", reason="the benchmark against PyTorch needs the bench extra "
                    '(pip install -e ".[bench]": torch and captum)')
pytest.importorskip("captum", reason='the benchmark needs captum (pip install -e ".[bench]")')

ROOT = pathlib.Path(__file__).parents[2]


@pytest.mark.slow  # about a minute: every method compiles or warms up once
def test_quick_benchmark_runs_every_method_and_the_scores_agree():
  result = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "vs_pytorch.py"), "--quick"],
      capture_output=True, text=True, cwd=ROOT, timeout=600,
      env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert re.search(r"logits: PyTorch vs Flax, max relative difference \d\.\de-0[5-9]", out)
  rows = dict(re.findall(r"^\| (.+?) \| [\d.]+ \| [\d.]* \| (\S*) \|$", out, re.M))
  for label in ("tracin_jax (default: vectorize=\"auto\")", "torch.func vmap(jacrev) + matmul",
                "plain PyTorch loop of autograd.grad",
                "Captum TracInCP (one item per example and class)"):
    assert float(rows[label]) < 1e-3, (label, rows)
  # Captum's hook mode gives GroupNorm and ConvTranspose2d parameters no gradient.
  assert float(rows["Captum TracInCP hook mode (sample_wise_grads_per_batch=True)"]) > 1e-2
  assert re.search(r'vectorize="auto" took (loop|vmap|threads) \(ms per example', out)
