"""The one training loop every job runs: pretraining, the SGD linear probe and fine-tuning.

A job hands `train` its initial state (built lazily, after the workdir was checked), its jitted
step and its input; the loop does the rest the same way for all of them:
- restore the newest good checkpoint, after checking its run record against this run's;
- step, fetching metrics only at log points, where every metric is checked for NaN/Inf before
  it is written and before any checkpoint could hold the state (the last good one is kept);
- SIGTERM (preemption): checkpoint the current step, then raise `Preempted` (exit 143);
- a wall-clock budget that ends training after the step reaching it, checkpointed like the end;
  with `config.schedule_fits_budget`, the learning-rate schedule is fitted to it instead: once a
  tenth of the budget has passed, total_steps becomes what the rate measured since the
  twentieth (the median time per step, plus periodic evaluations) fits in the rest (never more
  than the config's), the job's step is rebuilt for it (one more compile), and the run record
  keeps the fitted length, so a resume continues the same schedule;
- periodic evaluators (`simclr_jax.evaluators`), whose time is not counted as training time;
  those with `at_start` also score the initial state of a new run, kept as `initial_<metric>`
  in the checkpoints' run record and the results (the random-init baseline survives a resume);
- a console line per log interval (`simclr_jax.console`), checkpoints every
  `checkpoint_every_steps`.
"""
import os
import signal
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import flax
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax

from simclr_jax import checkpointing
from simclr_jax import console
from simclr_jax import errors
from simclr_jax import sharding
from simclr_jax import time_budget
from simclr_jax import workdir_files

# Exit status of a run stopped by SIGTERM (128 + SIGTERM), so schedulers see it did not finish.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM
# Prefix of the evaluators' scores of the initial state, in run records and results.
INITIAL_PREFIX = "initial_"
FITTED_TOTAL_STEPS = time_budget.FITTED_TOTAL_STEPS

StepFn = Callable[[Any, Mapping[str, jax.Array]], tuple[Any, Mapping[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the config: the input position is `step`."""
  step: jax.Array           # int32 updates done so far
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array            # uint32[2] base key of the augmentations

  def apply_gradients(self, optimizer: optax.GradientTransformation, grads: Any,
                      batch_stats: Any = None) -> "TrainState":
    """One optimizer update; `batch_stats` replaces the BN statistics when given."""
    updates, opt_state = optimizer.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state,
                        batch_stats=self.batch_stats if batch_stats is None else batch_stats)


class Preempted(Exception):
  """SIGTERM arrived; the state was checkpointed at `step` and the same command resumes it."""

  def __init__(self, step: int, workdir: str):
    super().__init__(f"stopped by SIGTERM after step {step}; checkpoint saved in "
                     f"{os.path.join(workdir, workdir_files.CHECKPOINT_DIR)}, rerun the same "
                     "command to resume")
    self.step = step


class StopRequest:
  """Whether SIGTERM (preemption) asked the run to stop; all processes agree on the step.

  One process: a SIGTERM handler sets a flag. Several: JAX's preemption service (started by
  `jax.distributed.initialize`) catches SIGTERM and picks a step every process reaches.
  """

  def __init__(self):
    self._requested = False
    self._previous_handler = None

  def __enter__(self):
    if jax.process_count() == 1:
      try:
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
      except ValueError:  # Not the main thread: leave signals to whoever owns them.
        logging.warning("not in the main thread: SIGTERM will not checkpoint before exiting")
    return self

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: checkpointing after the current step, then stopping")
    self._requested = True

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested

  def __exit__(self, *exc_info):
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)


def check_finite(step_metrics: Sequence[tuple[int, Mapping[str, float]]],
                 last_saved_step: int | None) -> None:
  """Raises FloatingPointError naming the first step and metric that is NaN or Inf."""
  for step, metrics in step_metrics:
    for name, value in metrics.items():
      if not np.isfinite(value):
        kept = (f"the last good checkpoint (step {last_saved_step}) is kept"
                if last_saved_step is not None else "no checkpoint was written")
        raise FloatingPointError(
            f"{name} is {value} at step {step}; stopping without saving this state ({kept}). "
            "Lower optimizer.base_learning_rate, check the data, or try dtype=float32")


class MetricLog:
  """Per-step metrics between log points: fetched in one go, checked, averaged and written.

  Fetching only at log points keeps the host from waiting on every step. Throughput is timed
  from the end of the first (compiling) step, without the time spent in evaluators.
  """

  def __init__(self, writer: metric_writers.MetricWriter, global_batch_size: int, *,
               total_steps: int, unit: str):
    self._writer = writer
    self._batch_size = global_batch_size
    self.total_steps = total_steps
    self._unit = unit
    self._pending: list[tuple[int, Any]] = []
    self._clock_start = self._interval_start = None
    self._first_step = self._interval_step = None
    self._excluded_seconds = 0.0
    self.summary: dict[str, float] = {}

  def add(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
    self._pending.append((step, metrics))
    if self._clock_start is None:
      jax.block_until_ready(metrics)
      self._clock_start = self._interval_start = time.monotonic()
      self._first_step = self._interval_step = step

  def flush(self, step: int, last_saved_step: int | None) -> None:
    """Raises FloatingPointError on NaN/Inf; otherwise writes the interval's means at `step`."""
    if not self._pending:
      return
    fetched = [(s, sharding.to_host(m)) for s, m in self._pending]
    self._pending.clear()
    check_finite(fetched, last_saved_step)
    self.summary.update({name: float(np.mean([metrics[name] for _, metrics in fetched]))
                         for name in fetched[0][1]})
    now = time.monotonic()
    if step > self._interval_step:
      self.summary["examples_per_sec"] = ((step - self._interval_step) * self._batch_size /
                                          (now - self._interval_start))
    examples_per_sec = self.summary.get("examples_per_sec") if step > self._interval_step else None
    self._interval_start, self._interval_step = now, step
    self._writer.write_scalars(step, {name: self.summary[name]
                                      for name in [*fetched[0][1], "examples_per_sec"]
                                      if name in self.summary})
    if jax.process_index() == 0:
      logging.info("%s", console.interval_line(
          step, self.total_steps, self.summary, examples_per_sec=examples_per_sec,
          batch_size=self._batch_size, unit=self._unit))

  def write_evaluation(self, step: int, metrics: Mapping[str, float], seconds: float) -> None:
    """An evaluator's metrics; its `seconds` do not count as training time."""
    self.summary.update(metrics)
    self._writer.write_scalars(step, metrics)
    if jax.process_index() == 0:
      logging.info("%s", console.evaluation_line(step, metrics, seconds))
    if self._clock_start is not None:  # an evaluation before the first step is not in the clock
      self._excluded_seconds += seconds
      self._interval_start += seconds

  def throughput(self, last_step: int) -> tuple[float, float]:
    """(training seconds, examples/s) from the end of the first step to `last_step`."""
    if self._clock_start is None:
      return 0.0, 0.0
    seconds = time.monotonic() - self._clock_start - self._excluded_seconds
    steps = last_step - self._first_step
    return seconds, (steps * self._batch_size / seconds if steps and seconds > 0 else 0.0)


def data_shards(config: ml_collections.ConfigDict) -> int:
  """Input streams of the global batch: `config.data_shards`, or one per process when 0."""
  return config.data_shards or jax.process_count()


def run_record(config: ml_collections.ConfigDict, *, step: int, total_steps: int,
               **identity) -> dict:
  """What a checkpoint records: a resume must agree on all of it but the step (the input order
  depends on it); `identity` adds what a job's run is also defined by (e.g. init_from)."""
  return {"step": step, "total_steps": total_steps, "mode": config.mode, "seed": config.seed,
          "dataset": config.dataset, "train_split": config.train_split,
          "global_batch_size": config.global_batch_size, "image_size": config.image_size,
          "data_shards": data_shards(config), **identity}


def check_resumable(record: Mapping[str, Any], expected: Mapping[str, Any], workdir: str) -> None:
  """Refuses a checkpoint of another run; warns where only the input order or schedule changes.

  Keys an older checkpoint did not record are not compared.
  """
  for key, value in expected.items():
    if key == "step" or key not in record or record[key] == value:
      continue
    if key == "total_steps" and FITTED_TOTAL_STEPS in record:
      continue  # the run's schedule was fitted to its time budget; it keeps that length
    if key == "data_shards":
      logging.warning("the checkpoint was written with data_shards=%s, this run uses %s: training "
                      "continues, but on a different (equally valid) order of batches than an "
                      "uninterrupted run; fix config.data_shards to keep it", record[key], value)
    elif key == "total_steps":
      logging.warning("the checkpoint was written by a run of %s steps; continuing to %s steps "
                      "(the learning-rate schedule changes)", record[key], value)
    else:
      raise errors.InvalidInput(
          f"{workdir} holds a run with {key}={record[key]!r} but the config says "
          f"{key}={value!r}; resuming would not continue the same run. Use a new "
          "--workdir or the original config")


def progress_reporter(total_steps: int, writer: metric_writers.MetricWriter,
                      every_steps: int) -> Callable[[int], Any]:
  """step -> None, logging steps/s and the ETA every `every_steps` (process 0 only)."""
  if jax.process_index() != 0:
    return lambda step: None
  return periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                         every_steps=every_steps)


def _restore(checkpointer: checkpointing.TrainCheckpointer, initialize: Callable[[], Any],
             record: Mapping[str, Any], latest: Mapping[str, Any] | None, workdir: str
             ) -> tuple[Any, Mapping[str, Any]]:
  """(the newest good checkpoint of this run, its run record), or (a fresh state, {}); `latest`
  (the newest record) was checked against `record` already."""
  state = initialize()
  restored = checkpointer.restore_latest(state)
  if restored is None:
    return state, {}
  state, restored_record = restored
  if restored_record != latest:  # fell back to an older checkpoint
    check_resumable(restored_record, record, workdir)
  return state, restored_record


def run(config: ml_collections.ConfigDict, workdir: str, *, initialize: Callable[[], Any],
        train_step_for: Callable[[int], StepFn], make_batches: Callable[[int], Iterator],
        total_steps: int,
        num_examples: int, finish: Callable[[Any, dict[str, Any]], dict[str, Any]],
        evaluators: Sequence[Any] = (), identity: Mapping[str, Any] | None = None
        ) -> dict[str, Any]:
  """Trains from the newest checkpoint (or `initialize()`) to `total_steps` or the time budget,
  then `finish(state, summary)` exports and draws what the job leaves and returns its results,
  which go to TensorBoard (as final_<name>) and, last, to results.json.

  `train_step_for(total_steps)` builds the job's step for a schedule of that length;
  `make_batches(start_step)` returns the input iterator positioned at `start_step`;
  `evaluators` run every `evaluator.every_steps` (0: only at the end) and at the last step;
  `identity` is what this job's checkpoints must also agree on (`run_record`). The summary holds
  the last logged metrics, steps, epochs and throughput.
  """
  record = run_record(config, step=0, total_steps=total_steps, **dict(identity or {}))
  checkpointer = checkpointing.TrainCheckpointer(
      os.path.join(workdir, workdir_files.CHECKPOINT_DIR), keep=config.keep_checkpoints)
  try:
    latest = checkpointer.latest_record()
    if latest is not None:  # refuse another run's workdir before anything is written or compiled
      check_resumable(latest, record, workdir)
    workdir_files.write_config(workdir, config)
    writer = workdir_files.create_metric_writer(workdir)
    try:
      state, restored_record = _restore(checkpointer, initialize, record, latest, workdir)
      state, summary = _train(config, workdir, checkpointer, writer, state,
                              train_step_for=train_step_for, make_batches=make_batches,
                              total_steps=total_steps, num_examples=num_examples,
                              evaluators=evaluators, record=record,
                              restored_record=restored_record)
      results = finish(state, summary)
      workdir_files.write_final_scalars(writer, summary["step"], results)
    finally:
      writer.close()
  finally:
    checkpointer.wait_until_finished()
    checkpointer.close()
  workdir_files.write_results(workdir, results)
  return results


def _train(config, workdir, checkpointer, writer, state, *, train_step_for, make_batches,
           total_steps, num_examples, evaluators, record, restored_record
           ) -> tuple[Any, dict[str, Any]]:
  """The step loop of `run`: (final state, summary)."""
  step = start_step = int(sharding.to_host(state.step))
  fitted = restored_record.get(FITTED_TOTAL_STEPS)
  total_steps = fitted or total_steps
  train_step = train_step_for(total_steps)
  logging.info("%s on %s: %d steps of %d images, starting at step %d", config.mode,
               config.dataset, total_steps, config.global_batch_size, start_step)
  log = MetricLog(writer, config.global_batch_size, total_steps=total_steps,
                  unit="pairs/s" if config.mode == "pretrain" else "images/s")
  initial = {name: value for name, value in restored_record.items()
             if name.startswith(INITIAL_PREFIX)}
  if start_step == 0:
    initial = {INITIAL_PREFIX + name: value for name, value in _evaluate(
        [e for e in evaluators if e.at_start], state, 0, log).items()}
  record = dict(record, **initial, **({FITTED_TOTAL_STEPS: fitted} if fitted else {}))
  batches = make_batches(start_step)
  report_progress = progress_reporter(total_steps, writer, config.log_every_steps)
  budget = time_budget.TimeBudget(config.max_train_minutes,
                                  check_every_steps=config.log_every_steps)
  fitting = fitted is None and config.get("schedule_fits_budget") and config.max_train_minutes > 0
  fit_window = time_budget.RateWindow(budget) if fitting else None  # None once fitted
  last_saved = checkpointer.latest_step()
  try:
    with StopRequest() as stop_request:
      for step in range(start_step + 1, total_steps + 1):
        state, metrics = train_step(state, next(batches))
        log.add(step, metrics)
        report_progress(step)
        stopping = stop_request.should_stop(step)
        last = step == total_steps or budget.spent(step)
        saving = stopping or last or step % config.checkpoint_every_steps == 0
        due = [e for e in evaluators if last or (e.every_steps and step % e.every_steps == 0)]
        if saving or due or step % config.log_every_steps == 0:
          log.flush(step, last_saved)  # before saving: a NaN state is never checkpointed
          rate = fit_window.steps_per_second(step) if fit_window and not last else None
          if rate is not None:
            fit_window = None
            fitted = time_budget.fitted_total_steps(
                step, steps_per_second=rate, seconds_left=budget.seconds_left(),
                total_steps=total_steps)
            logging.info("schedule fitted to the %g-minute budget: %d steps instead of %d "
                         "(%.2f steps/s with evaluations)", config.max_train_minutes, fitted,
                         total_steps, rate)
            total_steps = log.total_steps = fitted
            record.update(total_steps=fitted, **{FITTED_TOTAL_STEPS: fitted})
            train_step = train_step_for(fitted)
            report_progress = progress_reporter(fitted, writer, config.log_every_steps)
        evaluation_start = time.monotonic()
        _evaluate(due, state, step, log)
        if fit_window and due:
          fit_window.add_evaluation(time.monotonic() - evaluation_start)
        if saving:
          checkpointer.save(step, state, dict(record, step=step))
          last_saved = step
        if stopping:
          checkpointer.wait_until_finished()
          raise Preempted(step, workdir)
        if last:
          break
      else:  # no step left to run (a finished checkpoint): evaluate what it holds
        _evaluate(evaluators, state, step, log)
  finally:
    batches.close()  # stop the prefetch thread before the interpreter exits
  if step < total_steps:
    logging.warning("the %g-minute budget ended training at step %d of %d",
                    config.max_train_minutes, step, total_steps)
  train_seconds, examples_per_sec = log.throughput(step)
  summary = {name: value for name, value in log.summary.items() if name != "examples_per_sec"}
  summary.update(initial, **({FITTED_TOTAL_STEPS: fitted} if fitted else {}))
  summary.update(step=step, start_step=start_step, num_train_steps=total_steps,
                 train_seconds=train_seconds, examples_per_sec=examples_per_sec,
                 stopped_early_by_time_budget=step < total_steps,
                 epochs=step * config.global_batch_size / num_examples)
  return state, summary


def _evaluate(evaluators: Sequence[Any], state: Any, step: int, log: MetricLog
              ) -> dict[str, float]:
  """Runs `evaluators` on `state`; all their metrics."""
  results = {}
  for evaluator in evaluators:
    start = time.monotonic()
    metrics = evaluator.run(state)
    log.write_evaluation(step, metrics, time.monotonic() - start)
    results.update(metrics)
  return results
