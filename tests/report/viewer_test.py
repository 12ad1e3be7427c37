"""The report's volume viewer: its data blocks, the report pages that carry them, and NiiVue
drawing them in a real browser."""

import base64
import gzip
import io
import json
import shutil
import time
import types

import nibabel as nib
import numpy as np
import pytest
import report_pages

from tracin_jax import report
from tracin_jax import rundir
from tracin_jax.data.slices import SliceSet
from tracin_jax.report import viewer

HOSTILE = '</script><script>alert(1)</script><!--"\'&'
CLASSES = ("NCR/NET", "ED", "ET")


def _nifti(entry: dict) -> nib.Nifti1Image:
  """A data block's volume, decoded as a reader of the page would."""
  return nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(entry["nifti"])))


def _blob(shape, centre, radius) -> np.ndarray:
  grid = np.indices(shape).astype(float)
  return sum((g - c) ** 2 for g, c in zip(grid, centre)) < radius ** 2


def _tiny_slices(name: str = "") -> list[viewer.ViewerVolume]:
  """Four modalities of 6 slices of 32 x 32 (a bright disc, each modality its own pattern),
  a predicted lesion of the three classes and a heat map on the lesion."""
  n, side = 6, 32
  head = _blob((side, side), (16, 16), 13)
  x = np.arange(side)[:, None] / side
  images = np.zeros((n, side, side, 4), np.float32)
  for k in range(4):
    pattern = 0.3 * np.sin((k + 1) * 3 * x) + 0.15 * k
    images[..., k] = np.where(head, pattern - 0.2 + 0.05 * np.arange(n)[:, None, None], -1)
  predicted = np.zeros((n, side, side), np.int32)
  for z in range(1, 5):
    predicted[z][_blob((side, side), (11, 19), 6)] = 2
    predicted[z][_blob((side, side), (11, 19), 3.5)] = 1
    predicted[z][_blob((side, side), (11, 19), 1.5)] = 3
  heat = np.zeros((n, side, side), np.float32)
  heat[2:4] = np.exp(-((np.indices((side, side)) - np.array([13, 17])[:, None, None]) ** 2)
                     .sum(0) / 18.0)
  volumes = viewer.slice_volumes(images, predicted=predicted, truth=predicted,
                                 overlays={name + "SmoothGrad ED": heat,
                                           name + "Gradient ED": heat[:, ::-1]})
  for v in volumes:
    v.name = name + v.name
  return volumes


def test_each_volume_round_trips_through_the_data_block():
  rng = np.random.default_rng(0)
  turn = np.array([[np.cos(0.3), -np.sin(0.3), 0], [np.sin(0.3), np.cos(0.3), 0], [0, 0, 1]])
  affine = np.eye(4)
  affine[:3, :3] = turn @ np.diag([0.9, 1.1, 2.5])
  affine[:3, 3] = [-90.0, 126.0, -72.0]
  volumes = [viewer.ViewerVolume("T2", rng.normal(300, 90, (7, 5, 3)), affine, "image"),
             viewer.ViewerVolume("seg", rng.integers(0, 4, (7, 5, 3)), affine, "labels"),
             viewer.ViewerVolume("heat", rng.random((7, 5, 3)) ** 3, affine, "overlay",
                                 display_range=(0.2, 0.9))]
  block = viewer.viewer_block(volumes, title="a case")
  data = json.loads(str(block["data"]))
  assert [e["name"] for e in data["volumes"]] == ["T2", "seg", "heat"]
  for volume, entry in zip(volumes, data["volumes"]):
    image = _nifti(entry)
    assert image.shape == volume.data.shape and image.get_data_dtype() == np.uint8
    np.testing.assert_allclose(image.affine, affine, atol=1e-4)
    lo, hi = volume.data.min(), volume.data.max()
    assert entry["range"] == pytest.approx([lo, hi])
    step = 0 if volume.kind == "labels" else (hi - lo) / 255
    np.testing.assert_allclose(image.get_fdata(), volume.data, atol=step / 2 + 1e-6 * hi)
    assert [float(image.header["cal_min"]), float(image.header["cal_max"])] == pytest.approx(
        entry["display"])
  assert data["volumes"][2]["display"] == [0.2, 0.9]
  image_range = data["volumes"][0]["display"]  # the image's 0.5th and 99.5th percentiles
  assert volumes[0].data.min() < image_range[0] < image_range[1] < volumes[0].data.max()


def test_the_json_of_a_data_block_has_no_character_that_can_end_it():
  text = viewer.script_json({"name": HOSTILE, "list": ["<>&", "]]>"]})
  assert not set("<>&") & set(text)
  assert json.loads(text) == {"name": HOSTILE, "list": ["<>&", "]]>"]}


def test_a_hostile_name_cannot_close_the_data_block(tmp_path):
  page = viewer.write_viewer_page(tmp_path / "page.html", _tiny_slices(HOSTILE), title=HOSTILE,
                                  slice_names=[HOSTILE] * 6)
  text = page.read_text()
  found = report_pages.scripts(text)
  assert [s["attrs"].get("src") for s in found] == [None, "static/niivue.umd.js",
                                                   "static/viewer.js"]
  assert found[0]["attrs"]["type"] == "application/json"
  assert [s["text"] for s in found[1:]] == ["", ""]
  data = json.loads(found[0]["text"])
  assert data["title"] == HOSTILE and data["sliceNames"] == [HOSTILE] * 6
  assert all(v["name"].startswith(HOSTILE) for v in data["volumes"])
  assert "<script>alert" not in text
  assert "<!--" not in text and "&lt;/script&gt;&lt;script&gt;alert(1)" in text  # heading


def test_volumes_that_the_viewer_cannot_show_are_refused_and_masks_are_labels():
  eye, flat = np.eye(4), np.zeros((4, 4, 2))
  with pytest.raises(ValueError, match="kind"):
    viewer.ViewerVolume("x", flat, eye, "mesh")
  with pytest.raises(ValueError, match=r"\[X, Y, Z\]"):
    viewer.ViewerVolume("x", np.zeros((4, 4)), eye, "image")
  with pytest.raises(ValueError, match="affine"):
    viewer.ViewerVolume("x", flat, np.eye(3), "image")
  mask = viewer.viewer_block([viewer.ViewerVolume("x", flat, eye, "image"),
                              viewer.ViewerVolume("y", flat > -1, eye, "labels")], title="t")
  assert _nifti(json.loads(str(mask["data"]))["volumes"][1]).get_fdata().min() == 1
  with pytest.raises(ValueError, match="whole numbers"):
    viewer.viewer_block([viewer.ViewerVolume("x", flat, eye, "image"),
                         viewer.ViewerVolume("y", flat + 0.5, eye, "labels")], title="t")
  with pytest.raises(ValueError, match="kind 'image'"):
    viewer.viewer_block([viewer.ViewerVolume("y", flat, eye, "labels")], title="t")
  with pytest.raises(ValueError, match="element_id"):
    viewer.viewer_block([viewer.ViewerVolume("x", flat, eye, "image")], title="t",
                        element_id='a"b')


def test_a_case_of_ten_slices_of_96_pixels_stays_small():
  """Noise is the worst case for the compression: four modalities, the prediction, the truth
  and three heat maps of one slice."""
  rng = np.random.default_rng(1)
  images = rng.uniform(-1, 1, (10, 96, 96, 4)).astype(np.float32)
  labels = rng.integers(0, 4, (10, 96, 96))
  heat = np.zeros((10, 96, 96), np.float32)
  heat[4] = rng.random((96, 96))
  volumes = viewer.slice_volumes(images, predicted=labels, truth=labels,
                                 overlays={f"map {k}": heat for k in range(3)})
  block = viewer.viewer_block(volumes, title="ten slices")
  assert block["bytes"] < 700_000, block["bytes"]


# ----------------------------------------------------------------------------- the report


def _run(tmp_path, case: str):
  """A run directory with a saliency stage's maps of one image, and what the report's image
  pages need: slices (case `case` at z 10, 12 and 14; case "b" at z 3), regions and scores."""
  side, n_train, k = 16, 4, len(CLASSES)
  rng = np.random.default_rng(2)
  ids = [(case, 14), (case, 10), ("b", 3), (case, 12)]  # out of order on purpose
  images = rng.uniform(-1, 1, (len(ids), side, side, 4)).astype(np.float32)
  labels = rng.integers(0, 4, (len(ids), side, side)).astype(np.int32)
  val = SliceSet(images, labels, np.array([c for c, _ in ids]), np.array([z for _, z in ids]))
  train = SliceSet(images[:n_train], labels[:n_train], np.array(["t"] * n_train),
                   np.arange(n_train))
  regions = np.zeros((len(ids), side, side, k), bool)
  regions[:, 4:9, 5:10, 1] = True
  regions[:, 6:8, 6:8, 2] = True
  regions[2] = False
  regions[2, 1:3, 1:3, 0] = True
  influence = types.SimpleNamespace(
      val_regions=regions, train_regions=regions[:n_train], class_names=CLASSES,
      presence_test=regions.any((1, 2)), global_explainers=[], threshold=0.5,
      test_blocks=rng.normal(size=(k, len(ids), k * n_train)))
  out = tmp_path / rundir.SALIENCY
  out.mkdir(parents=True)
  (out / rundir.MANIFEST).write_text(json.dumps({"stage": "saliency", "figures": []}))
  (out / f"{rundir.FAITHFULNESS_NAME}.json").write_text(json.dumps(
      {"summary": [], "rows": [{"case": case, "slice": 12}]}))
  (out / f"{rundir.INSTANCES_NAME}.json").write_text(json.dumps({"instances": []}))
  maps = np.zeros((2, k, side, side, 4), np.float32)
  maps[0, 1, 5, 6] = -2.0  # methods x classes: |map| summed over the modalities
  maps[1, 0, 1, 1] = 1.0  # NCR/NET: no region predicted there, so no heat map
  np.savez(out / rundir.saliency_file("maps", case, 12, suffix=".npz"), maps=maps,
           methods=np.array(["smoothgrad", "grad_cam"]), classes=np.array(CLASSES))
  return train, val, influence


def _pages(workdir) -> dict[str, str]:
  return {p.name: p.read_text() for p in sorted((workdir / "report" / "images").glob("*.html"))}


def test_each_report_page_gets_a_viewer_of_its_case_and_the_scripts_are_copied_once(
    tmp_path, monkeypatch):
  train, val, influence = _run(tmp_path, HOSTILE)
  copies = []
  copy = viewer.copy_static
  monkeypatch.setattr(viewer, "copy_static", lambda folder: copies.append(folder) or copy(folder))
  report.build_report(tmp_path, train_set=train, val_set=val, influence=influence,
                      max_pages=2, top=2)
  assert copies == [tmp_path / "report"]
  pages = _pages(tmp_path)
  assert sorted(pages) == ["val0002.html", "val0003.html"]  # the saliency stage's first
  assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("niivue.umd.js")] == [
      "report/static/niivue.umd.js"]
  for text in pages.values():
    found = report_pages.scripts(text)
    assert [s["attrs"].get("src") for s in found] == [None, "../static/niivue.umd.js",
                                                     "../static/viewer.js"]
    assert HOSTILE not in text
  (data,) = report_pages.viewer_data(pages["val0003.html"])
  names = [v["name"] for v in data["volumes"]]
  assert names == ["T1", "T1Gd", "T2", "FLAIR", "prediction", "ground truth",
                   "smoothgrad: ED", "grad cam: ED", "smoothgrad: ET", "grad cam: ET"]
  assert data["title"].startswith(HOSTILE) and data["sliceNames"] == [
      f"{HOSTILE} slice {z}" for z in (10, 12, 14)]
  volumes = {v["name"]: _nifti(v) for v in data["volumes"]}
  order = [1, 3, 0]  # the case's slices in slice order
  np.testing.assert_allclose(volumes["FLAIR"].get_fdata(),
                             np.moveaxis(val.images[order, ..., 3], 0, -1), atol=1 / 255 + 1e-6)
  np.testing.assert_array_equal(volumes["ground truth"].get_fdata(),
                                np.moveaxis(val.labels[order], 0, -1))
  prediction = volumes["prediction"].get_fdata()
  assert prediction.shape == (16, 16, 3) and prediction[4, 5, 1] == 2 and prediction[6, 6, 1] == 3
  np.testing.assert_allclose(volumes["FLAIR"].affine, viewer.grid_affine((1, 1, 2), (0, 0, 10)))
  heat = volumes["smoothgrad: ED"].get_fdata()
  assert heat[5, 6, 1] == pytest.approx(8.0) and heat.sum() == pytest.approx(8.0)  # slice 12
  assert data["focusMM"] == pytest.approx([6.0, 7.0, 12.0])  # slice 12, in mm
  (other,) = report_pages.viewer_data(pages["val0002.html"])
  assert other["volumes"][0]["shape"] == [16, 16, 1]
  assert not [v for v in other["volumes"] if v["kind"] == "overlay"]


def test_the_pages_viewers_can_be_given_or_left_out(tmp_path):
  train, val, influence = _run(tmp_path, "a")
  affine = np.diag([-1.0, -1.0, 1.0, 1.0])
  affine[1, 3] = 239.0
  mine = [viewer.ViewerVolume("FLAIR", np.ones((20, 24, 8)), affine, "image"),
          viewer.ViewerVolume("seg", np.zeros((20, 24, 8), np.uint8), affine, "labels")]
  report.build_report(tmp_path, train_set=train, val_set=val, influence=influence,
                      max_pages=2, top=2, viewer_volumes={("b", 3): mine})
  pages = _pages(tmp_path)
  (given,) = report_pages.viewer_data(pages["val0002.html"])
  assert [v["name"] for v in given["volumes"]] == ["FLAIR", "seg"]
  np.testing.assert_allclose(_nifti(given["volumes"][0]).affine, affine)
  (default,) = report_pages.viewer_data(pages["val0003.html"])  # not in the mapping
  assert default["volumes"][0]["shape"] == [16, 16, 3]
  shutil.rmtree(tmp_path / "report")
  report.build_report(tmp_path, train_set=train, val_set=val, influence=influence,
                      max_pages=2, top=2, viewer_volumes=lambda case, z: [])
  assert not any(report_pages.viewer_data(t) for t in _pages(tmp_path).values())
  assert not (tmp_path / "report" / "static").exists()


# ----------------------------------------------------------------------------- the browser


def _canvas(driver) -> np.ndarray:
  """The viewer's canvas as the browser shows it: [H, W, 3] uint8."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  png = driver.find_element("css selector", "#viewer canvas").screenshot_as_png
  return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def _changed(driver, before: np.ndarray, script: str, *args) -> np.ndarray:
  """Runs `script` (JavaScript, with `args`) and returns the canvas once it differs from
  `before`."""
  driver.execute_script(script, *args)
  for _ in range(50):
    after = _canvas(driver)
    if np.abs(after - before).max() > 40:
      return after
    time.sleep(0.1)
  raise AssertionError(f"the canvas did not change after {script} {args}")


def _dominant(rgb: np.ndarray, channel: int) -> int:
  """Pixels where `channel` (0 red, 1 green) outweighs the other two by 40."""
  others = np.delete(rgb, channel, axis=-1)
  return int((rgb[..., channel] - others.max(-1) > 40).sum())


def _wait_state(driver, wanted: str) -> None:
  state = "loading"
  for _ in range(200):
    state = driver.execute_script("return document.getElementById('viewer').dataset.state")
    if state != "loading":
      break
    time.sleep(0.05)
  assert state == wanted


def _text(driver, selector: str) -> str:
  return driver.find_element("css selector", selector).text


_CHOOSE = """const s = document.querySelector(arguments[0]); s.value = arguments[1];
s.dispatchEvent(new Event(arguments[2]));"""
_CLICK = "document.querySelector(arguments[0]).click();"


@pytest.mark.slow  # a real browser
def test_niivue_draws_the_volumes_and_follows_the_controls_in_chromium(tmp_path):
  volumes = _tiny_slices()
  flipped = np.diag([-1.0, -1.0, -2.0, 1.0])  # stored in another order than NiiVue's RAS
  flipped[:3, 3] = [31.0, 31.0, 40.0]
  for v in volumes:
    v.affine = flipped
  page = viewer.write_viewer_page(tmp_path / "viewer.html", volumes, title="Tiny case",
                                  focus=[11, 19, 2], slice_names=[f"z {k}" for k in range(6)])
  driver = report_pages.browser(*report_pages.WEBGL2)  # or a skip: selenium is installed after
  from selenium.webdriver.common import action_chains  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.common.actions import wheel_input  # pylint: disable=g-import-not-at-top
  try:
    driver.get(page.resolve().as_uri())
    _wait_state(driver, "ready")
    shown = _canvas(driver)
    assert shown.std() > 20, "the canvas is blank"
    assert "voxel 11, 19, 2" in _text(driver, ".viewer-readout")
    assert "prediction = ET" in _text(driver, ".viewer-readout")
    driver.save_screenshot(str(tmp_path / "viewer.png"))
    assert (tmp_path / "viewer.png").stat().st_size > 20_000
    # The prediction's ED in green, the heat map in red to yellow: each goes with its control.
    assert _dominant(shown, 1) > 200 and _dominant(shown, 0) > 200
    off = _changed(driver, shown, _CLICK, ".viewer-labels")
    assert _dominant(off, 1) == 0
    on = _changed(driver, off, _CLICK, ".viewer-labels")
    assert np.abs(on - shown).max() <= 40  # the same picture again
    t2 = _changed(driver, on, _CHOOSE, ".viewer-background", "2", "change")
    cold = _changed(driver, t2, _CHOOSE, ".viewer-heat", "0", "change")
    assert _dominant(cold, 0) < 0.6 * _dominant(t2, 0)  # what is left is NCR/NET's red
    grey = _changed(driver, cold, _CLICK, ".viewer-labels")
    assert _dominant(grey, 0) == _dominant(grey, 1) == 0
    _changed(driver, grey, _CLICK, ".viewer-labels")
    # NiiVue's own slice scrolling, then the slice control.
    assert _text(driver, ".viewer-slice") == "slice 3 of 6 (z 2)"  # T2 shares the grid of T1
    canvas = driver.find_element("css selector", "#viewer canvas")
    action_chains.ActionChains(driver).scroll_from_origin(
        wheel_input.ScrollOrigin.from_element(canvas), 0, 120).perform()
    for _ in range(50):
      if not _text(driver, ".viewer-slice").startswith("slice 3 of 6"):
        break
      time.sleep(0.05)
    assert _text(driver, ".viewer-slice").split(" of ")[0] in ("slice 2", "slice 4")
    first = _changed(driver, _canvas(driver), _CHOOSE, ".viewer-slice-input", "0", "input")
    assert _text(driver, ".viewer-slice").startswith("slice 1 of 6")
    assert _dominant(first, 1) == 0  # the lesion is on slices 2 to 5
  finally:
    driver.quit()
  driver = report_pages.browser(*report_pages.NO_WEBGL)
  try:
    driver.get(page.resolve().as_uri())
    _wait_state(driver, "no-webgl2")
    assert "no WebGL2" in _text(driver, ".viewer-stage")
    assert not driver.find_elements("css selector", "#viewer canvas")
  finally:
    driver.quit()
