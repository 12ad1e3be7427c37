"""The HTML report: built from the manifests, escaped, and checked in a real browser."""

import json
import pathlib
import re
import shutil
import subprocess
import sys
import time
import urllib.parse

import layers_test
import numpy as np
import pytest
import report_pages
import stages_test
import tiny_run

from tracin_jax import report
from tracin_jax import stages
from tracin_jax.data.slices import SliceSet

staged = stages_test.staged  # every stage once on the tiny run (reused when finished)
HOSTILE = '<img src=x onerror="alert(1)">&"case'


_IMAGES = """
document.querySelectorAll('img').forEach(i => { i.loading = 'eager'; });
return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete,
                                             i.naturalWidth]);
"""
_LINKS = "return Array.from(document.querySelectorAll('a[href]')).map(a => a.href);"
_VIEWERS = "return Array.from(document.querySelectorAll('.viewer'), s => s.dataset.state);"


def _check_page(driver, url: str) -> list[str]:
  """Opens url; asserts every image loaded and every link resolves; returns the links."""
  driver.get(url)
  images = []
  for _ in range(100):  # images decode asynchronously: wait until every one is complete
    images = driver.execute_script(_IMAGES)
    if all(done for _, done, _ in images):
      break
    driver.implicitly_wait(0.1)
  assert images, url
  broken = [src for src, done, width in images if not done or width == 0]
  assert not broken, f"{url}: images that did not load: {broken}"
  states = []
  for _ in range(300):  # the viewers load their volumes asynchronously
    states = driver.execute_script(_VIEWERS)
    if "loading" not in states:
      break
    time.sleep(0.1)
  assert all(s == "ready" for s in states), f"{url}: viewers {states}"
  links = driver.execute_script(_LINKS)
  for link in links:
    parsed = urllib.parse.urlparse(link)
    assert parsed.scheme == "file", f"{url} links outside the report: {link}"
    path = pathlib.Path(urllib.parse.unquote(parsed.path))
    assert path.exists(), f"{url}: broken link {link}"
    if parsed.fragment and path.suffix == ".html":
      assert f'id="{parsed.fragment}"' in path.read_text(), f"{url}: no anchor {link}"
  return links


def test_choose_pages_takes_the_given_images_then_large_regions_of_new_cases():
  ids = [("a", 0), ("a", 1), ("b", 0), ("c", 0)]
  regions = np.zeros((4, 4, 4, 3), bool)
  regions[1, :2] = True   # 24 px
  regions[0, :1] = True   # 12 px
  regions[2, :3] = True   # 36 px
  assert report.choose_pages(ids, regions, [("c", 0)], 3) == [3, 2, 1]
  assert report.choose_pages(ids, regions, [("zz", 9)], 4) == [2, 1, 3, 0]
  assert report.choose_pages(ids, regions, [], 0) == []


@pytest.mark.slow  # every stage, end to end, on the tiny run
def test_the_report_lists_every_stage_and_its_pages(staged):
  context, results = staged
  index = results["report"].index
  html = index.read_text()
  assert index == context.workdir / "report" / "index.html"
  for name in ("train", "influence", "interpret", "saliency", "validate"):
    assert f"<td>{name}</td>" in html
    for fig in stages.read_manifest(context.workdir, name)["figures"]:
      assert f'src="../{fig["path"]}"' in html
  pages = sorted((context.workdir / "report" / "images").glob("val*.html"))
  assert pages and len(pages) <= stages_test.CONFIGS["report"].pages
  # Every image the saliency stage explained has a page, with its grids.
  texts = [p.read_text() for p in pages]
  for case, z in results["saliency"].images:
    mine = [t for t in texts if f"<h1>{case} slice {z}" in t]
    assert len(mine) == 1 and "saliency/grid_" in mine[0]
  # The pages' scores are queries of the gradient store, compared with the exact scores.
  for text in texts:
    assert "Scores queried from the run&#39;s gradient store (countsketch projection" in text
    assert "are also among the top" in text
    assert len(report_pages.viewer_data(text)) == 1 and 'src="../static/viewer.js"' in text
  # The saliency stage's maps of a page's image are heat maps of its viewer.
  heats = [v["name"] for t in texts for v in report_pages.viewer_data(t)[0]["volumes"]
           if v["kind"] == "overlay"]
  assert any(name.startswith("smoothgrad: ") for name in heats), heats
  assert sorted(p.name for p in (context.workdir / "report" / "static").iterdir()) == [
      "NIIVUE-LICENSE", "niivue.umd.js", "viewer.js"]
  manifest = stages.read_manifest(context.workdir, "report")
  assert manifest["files"][0]["path"] == "report/index.html"


def test_a_stage_that_did_not_run_is_absent_not_an_error(tmp_path):
  (tmp_path / "train").mkdir()
  (tmp_path / "train" / "manifest.json").write_text(json.dumps({
      "stage": "train", "data": HOSTILE, "synthetic": False, "fingerprint": "abc",
      "settings": {"seed": 0}, "seconds": 1.0, "files": [], "figures": [],
      "headline": {"validation_dice": {"ED": 0.5}}}))
  html = report.build_report(tmp_path).read_text()
  assert "Not run in this workdir: influence, interpret, saliency, export, validate" in html
  assert HOSTILE not in html and "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in html
  assert "badge synthetic" not in html  # this run's data are not the synthetic cohort
  assert "<td>validation</td><td class=\"num\">0.500</td>" in html


@pytest.mark.slow  # every stage, end to end, on the tiny run
def test_case_names_are_escaped_on_the_pages(staged, tmp_path):
  context, results = staged
  workdir = tmp_path / "run"
  shutil.copytree(context.workdir, workdir, ignore=shutil.ignore_patterns("parts"))
  val = tiny_run.VAL
  hostile = SliceSet(val.images, val.labels,
                     np.array([HOSTILE + str(i) for i in range(len(val))]), val.slice_indices)
  report.build_report(workdir, train_set=tiny_run.TRAIN, val_set=hostile,
                      influence=results["influence"], max_pages=2)
  page = next((workdir / "report" / "images").glob("val*.html")).read_text()
  assert HOSTILE not in page and "&lt;img src=x onerror=" in page


@pytest.mark.slow  # a real browser
def test_every_image_loads_and_every_link_resolves_in_chromium(staged, tmp_path):
  context, _ = staged
  driver = report_pages.browser(*report_pages.WEBGL2)
  try:
    index = (context.workdir / "report" / "index.html").resolve()
    links = _check_page(driver, index.as_uri())
    pages = sorted({l.split("#")[0] for l in links if "/report/images/val" in l})
    assert pages
    for page in pages:
      _check_page(driver, page)
    driver.get(index.as_uri())
    shot = tmp_path / "report.png"
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
  finally:
    driver.quit()


_FROM_THE_RUN_DIRECTORY = layers_test.WITHOUT_THE_STAGES + """
sys.path.insert(0, sys.argv[2])
import tiny_run
from tracin_jax import report
report.build_report(sys.argv[1], train_set=tiny_run.TRAIN, val_set=tiny_run.VAL,
                    max_pages=int(sys.argv[3]), top=int(sys.argv[4]))
assert not [m for m in sys.modules if m.startswith(("tracin_jax.stages", "tracin_jax.experiment"))]
"""


@pytest.mark.slow  # every stage, end to end, on the tiny run, and a fresh process
def test_the_report_is_built_from_the_run_directory_alone(staged, tmp_path):
  """In a process where the stages cannot be imported, the report reads the manifests and
  the influence stage's files and makes the pages the report stage made, with the
  saliency grids its manifest lists."""
  context, _ = staged
  workdir = tmp_path / "run"
  shutil.copytree(context.workdir, workdir, ignore=shutil.ignore_patterns("parts"))
  shutil.rmtree(workdir / "report")
  config = stages_test.CONFIGS["report"]
  subprocess.run([sys.executable, "-c", _FROM_THE_RUN_DIRECTORY, str(workdir),
                  str(pathlib.Path(tiny_run.__file__).parent), str(config.pages),
                  str(config.top)], check=True, cwd=pathlib.Path(__file__).parents[2])

  def pages(root):
    found = {}
    for page in sorted((root / "report" / "images").glob("val*.html")):
      found[page.name] = sorted(set(re.findall(r'src="([^"]+)"', page.read_text())))
    return found

  mine, the_stages = pages(workdir), pages(context.workdir)
  assert mine == the_stages and mine
  assert any("saliency/grid_" in src for srcs in mine.values() for src in srcs)
