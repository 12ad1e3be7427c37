"""The report's pages in tests (a helper module): their script elements and viewer data, and
headless Chromium to open them.

WebGL2, which the viewer needs, comes from SwiftShader, Chromium's software renderer: with
Debian's Chromium 156 in a container without a GPU, `--use-angle=swiftshader` and
`--enable-unsafe-swiftshader` give a WebGL 2.0 context ("ANGLE (Google, Vulkan 1.3.0
(SwiftShader Device (Subzero)))"). This Chromium still falls back to SwiftShader on its own,
even with `--disable-gpu`, but that automatic fallback is deprecated, so the flags ask for it
explicitly. `--disable-3d-apis` takes WebGL away (the viewer's fallback message).
"""

import html.parser
import json
import shutil
from typing import Any

import pytest

WEBGL2 = ("--use-angle=swiftshader", "--enable-unsafe-swiftshader")
NO_WEBGL = ("--disable-3d-apis",)


def browser(*flags: str, size: str = "1366,900"):
  """A headless Chromium WebDriver with `flags` (e.g. `WEBGL2`), or a skip naming what is
  missing."""
  webdriver = pytest.importorskip(
      "selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
  driver_path = shutil.which("chromedriver")
  binary = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(b)), None)
  if not driver_path or not binary:
    pytest.skip("no headless Chromium found (Debian: apt-get install chromium "
                "chromium-driver)")
  from selenium.webdriver.chrome.service import Service  # pylint: disable=g-import-not-at-top

  options = webdriver.ChromeOptions()
  options.binary_location = binary
  for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
              f"--window-size={size}", "--allow-file-access-from-files", *flags):
    options.add_argument(arg)
  return webdriver.Chrome(service=Service(driver_path), options=options)


class _Scripts(html.parser.HTMLParser):
  """Collects every script element: its attributes and its text."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.scripts: list[dict[str, Any]] = []
    self._open: dict[str, Any] | None = None

  def handle_starttag(self, tag, attrs):
    if tag == "script":
      self._open = {"attrs": dict(attrs), "text": ""}
      self.scripts.append(self._open)

  def handle_endtag(self, tag):
    if tag == "script":
      self._open = None

  def handle_data(self, data):
    if self._open is not None:
      self._open["text"] += data


def scripts(page: str) -> list[dict[str, Any]]:
  """The page's script elements as an HTML parser finds them: {"attrs", "text"} each."""
  parser = _Scripts()
  parser.feed(page)
  parser.close()
  return parser.scripts


def viewer_data(page: str) -> list[dict[str, Any]]:
  """The JSON of each viewer data block of the page."""
  return [json.loads(s["text"]) for s in scripts(page)
          if s["attrs"].get("type") == "application/json"
          and "viewer-data" in s["attrs"].get("class", "")]
