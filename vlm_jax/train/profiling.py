"""Profiles of chosen training steps: jax.profiler traces that TensorBoard's profile plugin and
xprof open.

config.profile.steps lists steps to trace (each run of consecutive steps is one trace), or
config.profile.every_steps = N traces config.profile.num_steps steps from every multiple of
N. Every process traces its own devices into its own directory,
<workdir>/tensorboard/profiles/process_<i>/plugins/profile/<time>/<host>.xplane.pb (the
profiler names a trace by host and second, so processes sharing a host would overwrite each
other's), beside the scalars: `tensorboard --logdir <workdir>/tensorboard` (Profile tab, one
run per process) or `xprof --logdir <workdir>/tensorboard`. Each step is annotated (`train`
with its step number) so the trace viewer separates steps. A trace waits for its last step
to finish on the device before it stops, so traced steps are synchronous.
"""
import os

import jax

from vlm_jax import storage
from vlm_jax.config import ConfigError


def profile_dir(workdir: str, process_index: int) -> str:
  """The directory `jax.profiler` is given; traces land in its plugins/profile/."""
  return storage.join(workdir, "tensorboard", "profiles", f"process_{process_index}")


def traces(workdir: str) -> list[str]:
  """Every process's trace files, oldest session first."""
  found = storage.glob(storage.join(profile_dir(workdir, "*"), "plugins", "profile", "*",
                                    "*.xplane.pb"))
  return sorted(found, key=lambda path: (os.path.basename(os.path.dirname(path)), path))


class StepProfiler:
  """`with profiler.step(n): <dispatch step n>`, then `profiler.after(n, outputs)`."""

  def __init__(self, profile_config, workdir: str, process_index: int = 0, log=print):
    self.steps = {int(s) for s in profile_config.steps}
    self.every, self.count = profile_config.every_steps, profile_config.num_steps
    if self.every < 0 or self.count < 1 or any(s < 1 for s in self.steps):
      raise ConfigError(f"config.profile: steps {sorted(self.steps)} must be >= 1, every_steps="
                       f"{self.every} >= 0 and num_steps={self.count} >= 1.")
    self.directory = profile_dir(workdir, process_index)
    self.active = False
    self._log = log

  def traced(self, step: int) -> bool:
    if step in self.steps:
      return True
    return self.every > 0 and step >= self.every and step % self.every < self.count

  def step(self, step: int):
    """Starts a trace at the first traced step of a run; annotates traced steps."""
    if not self.traced(step):
      return _NO_ANNOTATION
    if not self.active:
      jax.profiler.start_trace(self.directory)
      self.active = True
    return jax.profiler.StepTraceAnnotation("train", step_num=step)

  def after(self, step: int, outputs) -> None:
    """Stops the trace after the last traced step of a run, once the device finished it."""
    if self.active and not self.traced(step + 1):
      jax.block_until_ready(outputs)
      self.stop()
      self._log(f"Profiled up to step {step}: every process's trace is under "
                f"{os.path.dirname(self.directory)} (TensorBoard's Profile tab)")

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


class _NoAnnotation:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


_NO_ANNOTATION = _NoAnnotation()
