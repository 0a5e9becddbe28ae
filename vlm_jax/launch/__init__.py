"""vlm-launch: one command line for local, local multi-process, Cloud TPU and SLURM runs.

Each target turns launcher options plus the vlm-train arguments into a plan (commands, an
environment, a script); `--dry-run` prints the plan instead of running it. See docs/launch.md.
"""
