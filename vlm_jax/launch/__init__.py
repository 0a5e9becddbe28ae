"""vlm-launch: one command line for local, local multi-process, Cloud TPU and SLURM runs.

Each target turns launcher options plus the program's arguments into a plan (commands, an
environment, a script); `--dry-run` prints the plan instead of running it. See docs/launch.md.
"""

import shlex

from vlm_jax import storage

# What every process of a job runs (`--program`): the module, and its console script.
PROGRAMS = {"train": "vlm_jax.cli.train", "eval": "vlm_jax.cli.eval"}


def module(program: str) -> str:
  if program not in PROGRAMS:
    raise ValueError(f"--program={program!r}: expected one of {sorted(PROGRAMS)}.")
  return PROGRAMS[program]


def count_reports_command(reports: str) -> str:
  """A shell command that prints how many hang reports the directory `reports` holds (a gs://
  one through vlm_jax.storage, with the job's Python)."""
  if storage.is_gcs(reports):
    code = ("import sys; from vlm_jax import storage as s; d = sys.argv[1]; "
            "print(len(s.listdir(d)) if s.isdir(d) else 0)")
    return f"python -c {shlex.quote(code)} {shlex.quote(reports)}"
  return f"ls {shlex.quote(reports)} 2>/dev/null | wc -l"
