"""benchmarks/gpu.py on a CPU: --quick measures every part and the paths' scores agree, its
time budget skips or stops what would overrun, and nibabel, nilearn and Grain (absent on the
GPU machine) are never imported."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from tracin_jax.influence import grads

ROOT = pathlib.Path(__file__).parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
HIDDEN = ("nibabel", "nilearn", "grain")

# Runs the script with the packages the GPU machine lacks made unimportable.
RUNNER = f"""
import runpy, sys

class Hide:
  def find_spec(self, name, path=None, target=None):
    if name.partition(".")[0] in {HIDDEN!r}:
      raise ImportError(f"{{name}} is hidden: the GPU machine does not have it")

sys.meta_path.insert(0, Hide())
sys.argv = [{str(SCRIPT)!r}, *sys.argv[1:]]
runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
"""


def _run(tmp_path, *flags):
  out = tmp_path / "gpu.json"
  result = subprocess.run(
      [sys.executable, "-c", RUNNER, "--quick", f"--out={out}", f"--workdir={tmp_path / 'w'}",
       *flags], capture_output=True, text=True, cwd=ROOT, timeout=600,
      env={**os.environ, "PYTHONPATH": str(ROOT)})
  return result, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.slow  # 1-2 minutes on 2 busy cores: every path and saliency method compiles once
def test_quick_run_measures_every_part_and_the_paths_scores_agree(tmp_path):
  result, data = _run(tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert data["complete"] and data["errors"] == [] and data["skipped"] == []
  assert data["device"]["platform"] == "cpu" and data["versions"]["jax"] == jax.__version__
  assert 0 < data["elapsed_s"] < data["deadline_s"]

  (influence,) = data["influence"]
  paths = {"auto", "loop", "vmap", "naive"}
  assert set(influence["seconds"]) == set(influence["warmup_seconds"]) == paths
  assert all(x > 0 for x in influence["seconds"].values())
  assert all(n == 2 for n in influence["repeats"].values())
  auto = influence["auto"]
  # "auto" times every path this device offers ("threads" only on a CPU of several cores).
  assert {"loop", "vmap"} <= set(auto["seconds"]) <= set(grads.PATHS)
  assert auto["path"] == min(auto["seconds"], key=auto["seconds"].get)
  assert influence["scores_agree"], influence["error_vs_loop"]
  assert set(influence["error_vs_loop"]) == paths and influence["error_vs_loop"]["loop"] == 0
  assert max(influence["error_vs_loop"].values()) < 1e-4  # float32; exact in float64

  (store,) = data["store"]
  p, k, slices = store["parameters"], store["k"], store["slices"]
  assert set(store["seconds_per_slice"]) == {"exact", "projected", "gradients"}
  # The sample's block files hold its rows (plus the .npy headers).
  assert 0 < store["bytes_measured"]["exact"] - slices * k * p * 4 < 1024
  assert 0 < store["bytes_measured"]["projected"] - slices * k * store["dim"] * 4 < 1024
  exact, projected = store["extrapolated"]["exact"], store["extrapolated"]["projected"]
  assert exact["bytes"] == 2070 * 5 * k * p * 4
  assert projected["bytes"] == 2070 * 5 * k * store["dim"] * 4
  assert exact["seconds"] == pytest.approx(2070 * 5 * store["seconds_per_slice"]["exact"])
  assert store["exact_influence_plan"]["gradient_examples"] == 2070 * 5
  assert store["auto"]["path"] in grads.PATHS

  (sal,) = data["saliency"]
  names = [row["method"].split(" ")[0] for row in sal["methods"]]
  assert names == ["vanilla_gradient", "guided_backprop", "integrated_gradients",
                   "guided_integrated_gradients", "smoothgrad", "smoothgrad", "grad_cam",
                   "grad_cam_plus_plus", "guided_grad_cam", "information_flow"]
  for row in sal["methods"]:
    assert row["maps_per_second"] == pytest.approx(sal["batch"] / row["seconds"])

  assert "| auto |" in result.stdout and "| projected |" in result.stdout
  assert "| vanilla_gradient |" in result.stdout
  assert not any((tmp_path / "w").iterdir())  # the store samples are removed


@pytest.mark.slow  # a process: about 4 s (JAX's import)
def test_past_the_deadline_no_step_starts_and_the_json_says_so(tmp_path):
  result, data = _run(tmp_path, "--deadline_s=0")
  assert result.returncode == 0, result.stderr[-3000:]
  assert not data["complete"]
  assert [s["step"] for s in data["skipped"]] == [
      "influence quick", "store quick", "saliency quick"]
  assert "past the deadline" in data["skipped"][0]["reason"]
  assert "influence" not in data and data["device"]["platform"] == "cpu"


@pytest.mark.slow  # a process: about 4 s (JAX's import)
def test_at_the_hard_limit_the_watchdog_writes_the_json_and_ends_the_run(tmp_path):
  result, data = _run(tmp_path, "--hard_limit_s=0")
  assert result.returncode == 3, result.stderr[-3000:]
  assert "hard limit of 0 s reached" in data["stopped"]["reason"]
  assert not data["complete"] and "hard limit" in result.stderr
  assert not any((tmp_path / "w").iterdir())  # its temporary directory is removed
