"""What the training loop is doing right now, and how long each kind of work has taken.

The loop wraps its work in `clock.phase(name, step)`: `data` (the next batch), `compile` (a
process's first step: trace, compile, run), `dispatch` (queueing a step), `device` (waiting
for the device to finish the queued steps: where a hung collective shows), `checkpoint`,
`eval`, `log` (a logging step's metrics), `init` or `restore` (the train state). Goodput
(train/goodput.py) sums the phases; the watchdog (train/watchdog.py) compares the phase in
progress with recent ones of its kind.

Test-only hook: VLM_JAX_INJECT_STALL="<phase>@<step>[@<process>]" (e.g. "device@8@1") makes
that phase stall (sleep for an hour) once, in every process or in process <process> only, so
the tests can show the watchdog catching a hang. A run that resumed from a checkpoint disarms
it (`disarm_stall`): the injected hang is one that a restart cures.
"""
import collections
import contextlib
import dataclasses
import os
import threading
import time

INJECT_STALL_ENV = "VLM_JAX_INJECT_STALL"
INTERRUPTED = "interrupted"  # the totals' name for time in phases that ended in an exception
HISTORY = 50  # recent phases of each kind kept for the watchdog's median


def process_start_time() -> float:
  """Unix time at which this process was launched (Linux /proc: 10 ms resolution), so start-up
  includes the interpreter and imports; elsewhere, when this module was first imported."""
  try:
    with open("/proc/self/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    started_after_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime
    running_for = time.clock_gettime(time.CLOCK_BOOTTIME) - started_after_boot
    return time.time() - running_for
  except (OSError, ValueError, IndexError, AttributeError):
    return _IMPORTED_AT


_IMPORTED_AT = time.time()


@dataclasses.dataclass(frozen=True)
class Phase:
  name: str
  step: int
  start: float  # time.monotonic()
  units: int  # steps it covers (a `device` wait covers every step queued since the last one)


class PhaseClock:
  """Totals per phase since launch; `current` is the phase in progress (None between phases,
  when `idle_since` tells how long the loop has been outside any phase)."""

  def __init__(self, launch_time: float | None = None, process_index: int = 0):
    self.launch_time = process_start_time() if launch_time is None else launch_time  # Unix
    self.launch = time.monotonic() - (time.time() - self.launch_time)  # on the monotonic clock
    self.first_phase = None  # when start-up ended
    self.totals = collections.defaultdict(float)
    self.current = None
    self.idle_since = time.monotonic()
    self._recent = collections.defaultdict(lambda: collections.deque(maxlen=HISTORY))
    self._lock = threading.Lock()
    self._stall = _parse_stall(os.environ.get(INJECT_STALL_ENV, ""), process_index)

  @contextlib.contextmanager
  def phase(self, name: str, step: int, units: int = 1):
    start = time.monotonic()
    if self.first_phase is None:
      self.first_phase = start
    units = max(units, 1)
    self.current = Phase(name, step, start, units)
    try:
      if self._stall == (name, step):
        self._stall = None
        _stall_for_test()
      yield
    except BaseException:
      # The process is failing (a peer died in a collective, a storage error): this phase's
      # time is the end of a failed attempt, not work of its kind.
      self._end(INTERRUPTED, start)
      raise
    self._end(name, start, units)

  def _end(self, name: str, start: float, units: int = 0) -> None:
    """Adds the phase to the totals, and to the recent durations (per unit) if `units`."""
    end = time.monotonic()
    with self._lock:
      self.totals[name] += end - start
      if units:
        self._recent[name].append((end - start) / units)
    self.current, self.idle_since = None, end

  def disarm_stall(self) -> None:
    self._stall = None

  def recent(self, name: str) -> list[float]:
    """Seconds per step (per unit) of the recent phases named `name`, oldest first."""
    with self._lock:
      return list(self._recent[name])

  def elapsed(self) -> float:
    """Seconds since launch."""
    return time.monotonic() - self.launch

  def startup(self) -> float:
    """Launch to the first phase (imports, jax and data start-up, model set-up)."""
    return (self.first_phase if self.first_phase is not None else time.monotonic()) - self.launch


def _parse_stall(text: str, process_index: int):
  """(phase, step) this process stalls at, or None."""
  if not text:
    return None
  name, *numbers = text.split("@")
  if len(numbers) not in (1, 2) or not all(n.isdigit() for n in numbers):
    raise ValueError(f"${INJECT_STALL_ENV}={text!r}: expected <phase>@<step>[@<process>], "
                     "e.g. device@8 or device@8@1.")
  if len(numbers) == 2 and int(numbers[1]) != process_index:
    return None
  return name, int(numbers[0])


def _stall_for_test():
  """The injected hang: the watchdog must end the process long before this returns."""
  time.sleep(3600)
