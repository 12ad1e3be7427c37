"""`python -m experiments.explain`: the command `tracin-jax explain` (`tracin_jax.cli.explain`),
from the repository's root, where the console command is not installed."""

import sys

from tracin_jax.cli.explain import cli  # noqa: F401  in this process, for tests
from tracin_jax.cli.explain import main
from tracin_jax.cli.explain import usage  # noqa: F401

if __name__ == "__main__":
  sys.exit(main(["python -m experiments.explain", *sys.argv[1:]]))
