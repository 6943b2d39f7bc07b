"""The wall-clock budget of a training run (`config.max_train_minutes`), and fitting the
learning-rate schedule to it (`config.schedule_fits_budget`, applied by `simclr_jax.loop`)."""
import time

import jax
from jax.experimental import multihost_utils
import numpy as np

# Run-record and results key of a schedule fitted to the time budget.
FITTED_TOTAL_STEPS = "fitted_total_steps"
# The schedule is fitted to the rate measured between the log points at these two shares of the
# budget (and over at least FIT_AFTER_STEPS steps), periodic evaluations included: the rate of
# the first few steps follows any passing load (10 steps once fitted 94 steps into a 1.5-minute
# budget), and a window from the start counts the input pipeline's warm-up (it fitted 5,358
# steps where 6,000 ran at the steady rate). The share of that rate counted on covers the final
# evaluation and a slower machine phase.
FIT_WINDOW = (0.05, 0.1)
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

  def share_spent(self) -> float:
    """The share of the budget spent so far (0 without a budget)."""
    return (time.monotonic() - self._start) / self._seconds if self._seconds > 0 else 0.0

  def spent(self, step: int) -> bool:
    if self._seconds <= 0:
      return False
    if jax.process_count() == 1:
      return time.monotonic() - self._start >= self._seconds
    if step % self._check_every_steps:
      return False
    spent = np.bool_(time.monotonic() - self._start >= self._seconds)
    return bool(multihost_utils.broadcast_one_to_all(spent))


class RateWindow:
  """The training rate to fit the schedule with (see FIT_WINDOW), asked for at log points."""

  def __init__(self, budget: TimeBudget):
    self._budget = budget
    self._start = None  # (step, time) at the window's first log point

  def steps_per_second(self, step: int) -> float | None:
    """None until the window has passed, then its steps per wall-clock second; process 0's
    answer on every process (every process asks at the same steps)."""
    now, share = time.monotonic(), self._budget.share_spent()
    rate = np.float64(np.nan)
    if self._start is None:
      if share >= FIT_WINDOW[0]:
        self._start = (step, now)
    elif share >= FIT_WINDOW[1] and step - self._start[0] >= FIT_AFTER_STEPS:
      rate = np.float64((step - self._start[0]) / (now - self._start[1]))
    if jax.process_count() > 1:
      rate = multihost_utils.broadcast_one_to_all(rate)
    return None if np.isnan(rate) else float(rate)


def fitted_total_steps(step: int, *, steps_per_second: float, seconds_left: float,
                       total_steps: int) -> int:
  """The schedule length that ends inside the budget at the measured rate: at least one more
  step, at most `total_steps`; process 0's value on every process."""
  fitted = step + int(FIT_RATE_SHARE * steps_per_second * max(seconds_left, 0.0))
  fitted = np.int64(min(max(fitted, step + 1), total_steps))
  if jax.process_count() > 1:
    fitted = multihost_utils.broadcast_one_to_all(fitted)
  return int(fitted)
