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
# steps where 6,000 ran at the steady rate). Inside the window the time per step is the median
# over log intervals, so a few seconds of other work on the machine do not shorten the schedule
# (their mean once fitted 3.76 steps/s where 4.2 ran). The share of that rate counted on covers
# the final evaluation and a slower machine phase.
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
    self._points = []  # (step, time, evaluation seconds since the last point) in the window
    self._evaluation_seconds = 0.0

  def add_evaluation(self, seconds: float) -> None:
    """Counts `seconds` of periodic evaluation: part of the rate, but not of the step time."""
    if self._points:
      self._evaluation_seconds += seconds

  def steps_per_second(self, step: int) -> float | None:
    """None until the window has passed, then the steps per wall-clock second it measured (the
    median time per step, plus its evaluations); process 0's answer on every process (every
    process asks at the same steps)."""
    now, share = time.monotonic(), self._budget.share_spent()
    rate = np.float64(np.nan)
    if self._points or share >= FIT_WINDOW[0]:
      self._points.append((step, now, self._evaluation_seconds))
      self._evaluation_seconds = 0.0
    first_step = self._points[0][0] if self._points else step
    if share >= FIT_WINDOW[1] and step - first_step >= FIT_AFTER_STEPS:
      points = np.asarray(self._points)
      steps, seconds, evaluations = np.diff(points[:, 0]), np.diff(points[:, 1]), points[1:, 2]
      seconds_per_step = np.median((seconds - evaluations) / steps)
      rate = np.float64(steps.sum() / (seconds_per_step * steps.sum() + evaluations.sum()))
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
