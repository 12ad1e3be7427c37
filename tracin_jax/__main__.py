"""`python -m tracin_jax run|explain [flags]`: the console command `tracin-jax`."""

import sys

from tracin_jax.cli.__main__ import main

if __name__ == "__main__":
  sys.exit(main(prog="python -m tracin_jax"))
