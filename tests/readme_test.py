"""The README's code example runs as shown and gives what it says."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  assert blocks, "no python example in the README"
  namespace: dict = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
  scores, self_inf = namespace["scores"], namespace["self_inf"]
  assert scores.shape == (5, 1, 100, 1)
  assert self_inf.shape == (100, 1)
  # The example's proponents are the largest scores of each test row.
  np.testing.assert_array_equal(
      namespace["prop_idx"][:, 0], np.argmax(scores[:, 0, :, 0], axis=1))
