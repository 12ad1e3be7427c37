"""`python -m experiments.run`: the command `tracin-jax run` (`tracin_jax.cli.run`), from the
repository's root, where the console command is not installed."""

import sys

from tracin_jax.cli.run import cli  # noqa: F401  in this process, for tests
from tracin_jax.cli.run import main
from tracin_jax.cli.run import usage  # noqa: F401

if __name__ == "__main__":
  sys.exit(main(["python -m experiments.run", *sys.argv[1:]]))
