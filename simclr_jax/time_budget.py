"""The wall-clock budget of a training run (`config.max_train_minutes`), and fitting the
learning-rate schedule to it (`config.schedule_fits_budget`, applied by `simclr_jax.loop`)."""
import time

import jax
from jax.experimental import multihost_utils
import numpy as np

# Run-record and results key of a schedule fitted to the time budget.
FITTED_TOTAL_STEPS = "fitted_total_steps"
# Steps timed after the compiling first one before the schedule is fitted (at a log point), and
# the share of the measured rate counted on (later evaluations and a slower machine phase).
FIT_AFTER_STEPS = 10
FIT_RATE_SHARE = 0.95


class TimeBudget:
  """Wall-clock budget of one training invocation, counted from its creation (0 = none).

  Several processes must stop at the same step: there, process 0's clock decides, read at the
  log steps only (one small broadcast per log interval).
  """

  def __init__(self, minutes: float, *, check_every_steps: int):
    self._seconds = 60.0 * minutes
    self._check_every_steps = check_every_steps
    self._start = time.monotonic()

  def seconds_left(self) -> float:
    return self._seconds - (time.monotonic() - self._start)

  def spent(self, step: int) -> bool:
    if self._seconds <= 0:
      return False
    if jax.process_count() == 1:
      return time.monotonic() - self._start >= self._seconds
    if step % self._check_every_steps:
      return False
    spent = np.bool_(time.monotonic() - self._start >= self._seconds)
    return bool(multihost_utils.broadcast_one_to_all(spent))


def fitted_total_steps(step: int, *, steps_per_second: float, seconds_left: float,
                       total_steps: int) -> int:
  """The schedule length that ends inside the budget at the measured rate: at least one more
  step, at most `total_steps`; process 0's value on every process."""
  fitted = step + int(FIT_RATE_SHARE * steps_per_second * max(seconds_left, 0.0))
  fitted = np.int64(min(max(fitted, step + 1), total_steps))
  if jax.process_count() > 1:
    fitted = multihost_utils.broadcast_one_to_all(fitted)
  return int(fitted)
