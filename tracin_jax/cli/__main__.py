"""The console command `tracin-jax`: its subcommands `run` and `explain`, from any directory.

    tracin-jax run --flagfile=demo                      # the demo, under ./runs/demo
    tracin-jax explain --flagfile=demo --image=<case>:<slice>
    tracin-jax run --help                               # every setting, by stage

`python -m tracin_jax` is the same command; `python -m experiments.run` and
`python -m experiments.explain`, from the repository's root, are its subcommands.
"""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
from typing import Sequence

# Each subcommand: its module (imported only when it runs) and one line of what it does.
COMMANDS = {
    "run": ("tracin_jax.cli.run", "Run the experiment's stages (train, influence, ...) into a "
            "run's directory."),
    "explain": ("tracin_jax.cli.explain", "Explain new images against a finished run's "
                "gradient store."),
}
_HELP = ("--help", "-help", "-h", "--helpshort", "--helpfull", "-?", "help")


def usage(prog: str = "tracin-jax") -> str:
  """`tracin-jax --help`: the subcommands, and where each one's help is."""
  width = max(map(len, COMMANDS))
  lines = [f"usage: {prog} <command> [--flag=value ...]", "", "Commands:"]
  lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
  lines += ["", textwrap.fill(f"{prog} <command> --help lists a command's flags. The demo (a "
                             "synthetic cohort; about 7 minutes on 2 CPU cores, its outputs "
                             "under ./runs/demo):", 100),
            f"  {prog} run --flagfile=demo", ""]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
  """The command line `prog <command> [flags]`; the exit status.

  Args:
    argv: the arguments, argv[0] the program (default `sys.argv`).
    prog: the program's name in the help and errors (default: argv[0]'s file name).
  """
  argv = list(sys.argv if argv is None else argv)
  prog = prog or os.path.basename(argv[0] if argv else "") or "tracin-jax"
  if len(argv) < 2:
    sys.stderr.write(f"error: give a command, {' or '.join(COMMANDS)}; to run the demo: "
                     f"{prog} run --flagfile=demo ({prog} --help lists the commands)\n")
    return 1
  if argv[1] in _HELP:
    sys.stdout.write(usage(prog))
    return 0
  name = argv[1]
  if name not in COMMANDS:
    sys.stderr.write(f"error: unknown command {name!r}; the commands are "
                     f"{', '.join(COMMANDS)} ({prog} --help)\n")
    return 1
  module = importlib.import_module(COMMANDS[name][0])
  return module.main([f"{prog} {name}", *argv[2:]])


if __name__ == "__main__":
  sys.exit(main(prog="python -m tracin_jax.cli"))
