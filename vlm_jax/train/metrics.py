"""Metric writers (TensorBoard, metrics.jsonl), the progress line, and MFU.

Only process 0 writes. MFU = model FLOPs per second / peak. On CPU the peak is the f32
2048x2048 matmul throughput measured in this process (DESIGN.md); on accelerators it is the
device's published dense bf16 peak.
"""
import json
import statistics
import time

import jax
import jax.numpy as jnp

from vlm_jax import storage

# Dense bf16 peak FLOP/s per chip, from the vendors' spec sheets.
_ACCELERATOR_PEAKS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}


def measure_cpu_matmul_peak(n: int = 2048, repeats: int = 10) -> float:
  """Median FLOP/s of a warm, jitted n x n f32 matmul on the default device."""
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * n**3 / statistics.median(times)


def accelerator_peak(kind: str) -> tuple[float, str] | None:
  """(dense bf16 peak FLOP/s of one device of `kind`, its name in the table), or None."""
  for name, peak in _ACCELERATOR_PEAKS.items():
    if kind.startswith(name):
      return peak, name
  return None


def peak_flops(num_devices: int) -> tuple[float, str]:
  """(peak FLOP/s of a mesh of `num_devices` devices, how it was obtained)."""
  kind = jax.devices()[0].device_kind
  known = accelerator_peak(kind)
  if known:
    return known[0] * num_devices, f"{known[1]} bf16 spec"
  if jax.default_backend() == "cpu":
    # Simulated CPU devices share their host's cores, so a mesh of any number of them has
    # the host's peak (one host per process).
    return measure_cpu_matmul_peak() * jax.process_count(), "measured f32 matmul"
  return float("nan"), f"unknown device {kind!r}"


class MetricWriter:
  """Writes scalars to metrics.jsonl and TensorBoard event files (process 0 only)."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    storage.makedirs(workdir)
    # In gs://, each line is appended by composing objects (storage.AppendFile).
    self._jsonl = storage.AppendFile(storage.join(workdir, "metrics.jsonl"))
    from tensorboardX import SummaryWriter  # imported here: heavy, and process 0 only
    self._tb = SummaryWriter(storage.join(workdir, "tensorboard"))  # writes gs:// itself

  def write(self, step: int, scalars: dict) -> None:
    if not self.active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)

  def close(self) -> None:
    if self.active:
      self._jsonl.close()
      self._tb.close()


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
  """Throughput, ETA and MFU between logging steps; the timer excludes the first compile."""

  def __init__(self, total_steps: int, batch_size: int, flops_per_step: float, peak_total: float):
    self.total_steps, self.batch_size = total_steps, batch_size
    self.flops_per_step, self.peak_total = flops_per_step, peak_total
    self._last_step, self._last_time = None, None

  def update(self, step: int) -> dict:
    """Marks `step` as done now; returns throughput since the previous mark."""
    now = time.perf_counter()
    stats = {}
    if self._last_step is not None and step > self._last_step:
      steps_per_s = (step - self._last_step) / (now - self._last_time)
      stats = {"steps_per_s": steps_per_s, "examples_per_s": steps_per_s * self.batch_size,
               "mfu": steps_per_s * self.flops_per_step / self.peak_total}
    self._last_step, self._last_time = step, now
    return stats

  def line(self, step: int, metrics: dict) -> str:
    parts = [f"step {step}/{self.total_steps}", f"loss {metrics['loss']:.4f}"]
    if "steps_per_s" in metrics:
      eta = (self.total_steps - step) / metrics["steps_per_s"]
      parts += [f"{metrics['steps_per_s']:.2f} steps/s", f"{metrics['examples_per_s']:.1f} ex/s",
                f"ETA {_duration(eta)}", f"MFU {100 * metrics['mfu']:.1f}%"]
    if "goodput" in metrics:
      parts.append(f"goodput {100 * metrics['goodput']:.0f}%")
    if metrics.get("data/skipped_records"):
      parts.append(f"skipped records {int(metrics['data/skipped_records'])}")
    return " | ".join(parts)
