"""The SGD training loop the linear probe (protocol 'sgd') and fine-tuning share.

Both follow one recipe around their own step function: a warmup + cosine learning-rate schedule
over the labelled examples, a resume from the newest checkpoint of the same run, metrics averaged
and checked for NaN at log steps (before any checkpoint can hold a NaN state), test top-1 every
`eval_every_steps`, and the wall-clock budget `max_train_minutes` (as in pretraining: the step
that reaches it is the last, and it is checkpointed; rerunning the workdir continues).
"""
import os
from typing import Any, Callable, Mapping

from absl import logging
import jax
import ml_collections
import numpy as np
import optax

from simclr_jax import checkpointing
from simclr_jax import input_pipeline
from simclr_jax import optim
from simclr_jax import sharding
from simclr_jax import train

StepFn = Callable[[train.TrainState, Mapping[str, jax.Array]],
                  tuple[train.TrainState, Mapping[str, jax.Array]]]


def total_steps(config: ml_collections.ConfigDict, num_examples: int) -> int:
  if config.num_train_steps > 0:
    return config.num_train_steps
  return optim.steps_from_epochs(config.num_epochs, num_examples, config.global_batch_size)


def create_optimizer(config: ml_collections.ConfigDict, num_examples: int, *,
                     trainable_mask: Any = None
                     ) -> tuple[optax.GradientTransformation, optax.Schedule, int]:
  """(optimizer, its learning-rate schedule, total steps) of `config.optimizer`."""
  steps = total_steps(config, num_examples)
  warmup_steps = min(optim.steps_from_epochs(config.optimizer.warmup_epochs, num_examples,
                                             config.global_batch_size), steps - 1)
  schedule = optim.learning_rate_schedule(
      config.optimizer.base_learning_rate, lr_scaling=config.optimizer.lr_scaling,
      global_batch_size=config.global_batch_size, total_steps=steps, warmup_steps=warmup_steps)
  optimizer = optim.create_optimizer(
      config.optimizer.name, schedule, weight_decay=config.optimizer.weight_decay,
      momentum=config.optimizer.momentum, nesterov=config.optimizer.nesterov,
      trainable_mask=trainable_mask)
  return optimizer, schedule, steps


def run_record(config: ml_collections.ConfigDict, step: int, **extra) -> dict:
  """What a checkpoint records; a resume must agree on all of it but the step."""
  return {"step": step, "mode": config.mode, "seed": config.seed, "dataset": config.dataset,
          "init_from": config.init_from, "global_batch_size": config.global_batch_size, **extra}


def _restore(checkpointer: checkpointing.TrainCheckpointer, state: train.TrainState,
             expected: Mapping[str, Any], workdir: str) -> train.TrainState:
  """The newest checkpoint of this same run, or `state` when there is none."""
  restored = checkpointer.restore_latest(state)
  if restored is None:
    return state
  state, record = restored
  for key, value in expected.items():
    if key != "step" and record.get(key) != value:
      raise ValueError(f"{workdir} holds a run with {key}={record.get(key)!r}, the config says "
                       f"{value!r}: use a new --workdir")
  return state


def _mean_metrics(pending: list[Mapping[str, jax.Array]], step: int) -> dict[str, float]:
  """The interval's mean metrics; FloatingPointError when the loss is NaN or Inf."""
  fetched = sharding.to_host(pending)
  means = {name: float(np.mean([metrics[name] for metrics in fetched])) for name in fetched[0]}
  if not np.isfinite(means["loss"]):
    raise FloatingPointError(f"the loss is {means['loss']} at step {step}; the last good "
                             "checkpoint is kept. Lower optimizer.base_learning_rate")
  return means


def train_loop(config: ml_collections.ConfigDict, workdir: str, *, state: train.TrainState,
               step_fn: StepFn, total_steps: int, num_examples: int, mesh: jax.sharding.Mesh,
               writer, evaluate: Callable[[train.TrainState], float] | None = None,
               subset: np.ndarray | None = None, record: Mapping[str, Any] | None = None
               ) -> tuple[train.TrainState, dict[str, Any]]:
  """Resumes `state` from workdir's checkpoints and trains it on `config.train_split`.

  `step_fn(state, batch)` returns metrics with at least 'loss' and 'train_top1'; `evaluate(state)`
  gives the test top-1 written every eval_every_steps; `subset` restricts training to those
  `num_examples` example indices; `record` adds what a resume must agree with to `run_record`.
  Returns the trained state and what results.json records about the training.
  """
  record = dict(record or {})
  checkpointer = checkpointing.TrainCheckpointer(os.path.join(workdir, train.CHECKPOINT_DIR),
                                                 keep=config.keep_checkpoints)
  batches = None
  try:
    state = _restore(checkpointer, state, run_record(config, 0, **record), workdir)
    step = start_step = int(sharding.to_host(state.step))
    logging.info("%s on %s (%d examples): %d steps of %d images on %d device(s), starting at "
                 "step %d", config.mode, config.dataset, num_examples, total_steps,
                 config.global_batch_size, mesh.devices.size, start_step)
    batches = input_pipeline.create_train_iterator(
        config.dataset, data_dir=train.data_dir(config), split=config.train_split,
        global_batch_size=config.global_batch_size, image_size=config.image_size,
        host_crop_views=config.host_crop_views, seed=config.seed, start_step=start_step,
        mesh=mesh, subset=subset,
        host_crop=input_pipeline.HostCrop.from_augment_config(config.augment))
    budget = train.TimeBudget(config.max_train_minutes, check_every_steps=config.log_every_steps)
    report_progress = train.progress_reporter(total_steps, writer, config.log_every_steps)
    pending, metrics = [], {}
    for step in range(start_step + 1, total_steps + 1):
      state, step_metrics = step_fn(state, next(batches))
      pending.append(step_metrics)
      report_progress(step)
      last = step == total_steps or budget.spent(step)
      saving = last or step % config.checkpoint_every_steps == 0
      if saving or step % config.log_every_steps == 0:  # never save an unchecked state
        metrics = _mean_metrics(pending, step)
        pending.clear()
        writer.write_scalars(step, metrics)
      if evaluate and config.eval_every_steps and step % config.eval_every_steps == 0 and not last:
        writer.write_scalars(step, {"test_top1": evaluate(state)})
      if saving:
        checkpointer.save(step, state, run_record(config, step, **record))
      if last:
        break
  finally:
    if batches is not None:
      batches.close()  # stop the prefetch thread before the interpreter exits
    checkpointer.wait_until_finished()
    checkpointer.close()
  if step < total_steps:
    logging.warning("the %g-minute budget ended training at step %d of %d",
                    config.max_train_minutes, step, total_steps)
  report = {"num_train_steps": total_steps, "step": step,
            "epochs": step * config.global_batch_size / num_examples,
            "stopped_early_by_time_budget": step < total_steps}
  if metrics:  # the last logged means; none when a finished checkpoint was restored
    report.update(train_loss=metrics["loss"], train_top1=metrics["train_top1"])
  return state, report
