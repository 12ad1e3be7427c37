"""The command line, `tracin-jax run|explain [flags]`: an absl app over the library.

    tracin-jax run --flagfile=demo
    tracin-jax explain --flagfile=demo --image=<case>:<slice>

`config_flags` derives one flag per setting of the configs; `run` runs the stages
(`tracin_jax.experiment.run`); `explain` explains new images against a finished run's
gradient store; `__main__` dispatches the subcommands (the console command, and
`python -m tracin_jax`). A bad flag, file or run ends in one line on stderr and exit status 1.
`python -m experiments.run` and `python -m experiments.explain`, from the repository's root,
are the same commands.
"""
