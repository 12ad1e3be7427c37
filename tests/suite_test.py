"""The suite's own scheduling: the worker groups name real modules, and every module that
builds on a group's shared fixtures is in that group (else a second worker rebuilds them)."""

import pathlib
import re

import shared_runs

TESTS = pathlib.Path(__file__).parent
# The fixtures each group exists to share, and the group that must hold their users.
SHARED_FIXTURES = {"full_run": "tiny_run", "shared": "reliability"}


def test_every_grouped_module_exists():
  for paths in shared_runs.WORKER_GROUPS.values():
    for path in paths:
      assert (TESTS.parent / path).is_file(), path


def test_every_module_using_a_shared_fixture_is_in_its_group():
  for module in sorted(TESTS.rglob("*_test.py")):
    text = module.read_text()
    path = str(module.relative_to(TESTS.parent))
    for fixture, group in SHARED_FIXTURES.items():
      if re.search(rf"^def test\w*\([^)]*\b{fixture}\b|^def \w+\([^)]*\b{fixture}\b", text,
                   re.M):
        assert shared_runs.worker_group(f"{path}::test") == group, (path, fixture)


def test_a_test_outside_the_groups_is_scheduled_with_its_module():
  assert shared_runs.worker_group("tests/influence/gram_test.py::test_x[a]") == \
      "tests/influence/gram_test.py"
  assert shared_runs.worker_group("tests/explain_test.py::test_x[a]") == "tiny_run"


# Fixtures that run the whole pipeline (every stage, retrainings, the smoke flagfile): a
# test that uses one is end to end, and so in the slow tier, off the edit loop's path.
END_TO_END_FIXTURES = ("staged", "lds_run", "smoke_run", "toy_run")


def test_every_test_of_a_whole_pipeline_run_is_in_the_slow_tier(request):
  unmarked = [item.nodeid for item in request.session.items
              if set(END_TO_END_FIXTURES) & set(getattr(item, "fixturenames", ()))
              and item.get_closest_marker("slow") is None]
  assert not unmarked, unmarked
