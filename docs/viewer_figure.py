"""The README's figure of the report's viewer (docs/images/viewer.png), from a finished run.

    python -m tracin_jax.data.synthetic --out /tmp/brats2023 --layout=brats2023
    cd /tmp && tracin-jax run --flagfile=demo --data_dir=/tmp/brats2023 --workdir=runs/brats2023
    python docs/viewer_figure.py --page=/tmp/runs/brats2023/report/images/val0022.html

Opens the image page in headless Chromium (Debian's chromium and chromium-driver, selenium
from the test extra), waits for its viewer, and takes two pictures of it: the prediction
over FLAIR as the page opens (heat map none), and the ET influence support alone (the
prediction switched off); both are the export stage's files read back. Writes them side by
side under the viewer's heading and controls.
"""

from __future__ import annotations

import io
import pathlib
import sys
import time

from absl import app
from absl import flags
import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402  pylint: disable=g-import-not-at-top
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "report"))
import report_pages  # noqa: E402  pylint: disable=g-import-not-at-top

_PAGE = flags.DEFINE_string("page", None, "The report's image page.", required=True)
_OUT = flags.DEFINE_string("out", str(pathlib.Path(__file__).parent / "images" / "viewer.png"),
                           "The figure.")
_HEAT = flags.DEFINE_string("heat", "TracIn support: ET", "The heat map of the second picture.")


def main(argv):
  del argv
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support.ui import Select  # pylint: disable=g-import-not-at-top

  driver = report_pages.browser(size="1300,1000")
  try:
    driver.get(pathlib.Path(_PAGE.value).resolve().as_uri())
    for _ in range(120):
      if driver.execute_script("return document.querySelector('.viewer').dataset.state") \
          == "ready":
        break
      time.sleep(0.5)
    section = driver.find_element(By.CSS_SELECTOR, ".viewer")
    driver.execute_script("arguments[0].scrollIntoView()", section)
    heat = Select(driver.find_element(By.CSS_SELECTOR, ".viewer-heat"))
    heat.select_by_visible_text("none")
    time.sleep(1.0)
    first = mpimg.imread(io.BytesIO(section.screenshot_as_png))
    driver.find_element(By.CSS_SELECTOR, ".viewer-labels").click()
    heat.select_by_visible_text(_HEAT.value)
    time.sleep(1.0)
    stage = driver.find_element(By.CSS_SELECTOR, ".viewer-stage")
    second = mpimg.imread(io.BytesIO(stage.screenshot_as_png))
    top = stage.location["y"] - section.location["y"]
  finally:
    driver.quit()
  height, width = second.shape[:2]
  left, right = int(width * 0.18), int(width * 0.84)
  fig = plt.figure(figsize=(first.shape[1] / 100, 6.6), dpi=100)
  head = fig.add_axes([0, 0.82, 1, 0.18])
  head.imshow(first[:top])
  panels = ((first[top:top + height, left:right], "prediction, read back from "
             "prediction.nii.gz"),
            (second[:, left:right], f"{_HEAT.value}, read back from its NIfTI file"))
  for k, (image, title) in enumerate(panels):
    ax = fig.add_axes([0.51 * k, 0.0, 0.49, 0.76])
    ax.imshow(image)
    ax.set_title(title, fontsize=11)
  for ax in fig.axes:
    ax.axis("off")
  fig.savefig(_OUT.value, dpi=100)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
