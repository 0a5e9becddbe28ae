"""vlm-launch: one command line for local, local multi-process, Cloud TPU and SLURM runs.

Each target turns launcher options plus the program's arguments into a plan (commands, an
environment, a script); `--dry-run` prints the plan instead of running it. See docs/launch.md.
"""

# What every process of a job runs (`--program`): the module, and its console script.
PROGRAMS = {"train": "vlm_jax.cli.train", "eval": "vlm_jax.cli.eval"}


def module(program: str) -> str:
  if program not in PROGRAMS:
    raise ValueError(f"--program={program!r}: expected one of {sorted(PROGRAMS)}.")
  return PROGRAMS[program]
