"""The files of a run's workdir, written the same way by every job.

  config.json       the config the run was started with (compared on reruns)
  checkpoints/      Orbax training checkpoints (`simclr_jax.checkpointing`)
  metrics.jsonl     one JSON object per logged step, beside TensorBoard events
  results.json      written last: a workdir with results holds a finished run
  export/           the encoder export (+ the trained head, for probes and fine-tunes)
  loss_curve.png, augmentations.png   pretraining's curves and the views it trained on

Only process 0 writes files; the others write nothing (their metric writer is empty).
"""
import json
import os
from typing import Any, Mapping

from absl import logging
from clu import metric_writers
import jax
import ml_collections
import numpy as np

from simclr_jax import errors

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
EXPORT_DIR = "export"
LOSS_CURVE_FILE = "loss_curve.png"
AUGMENTATIONS_FILE = "augmentations.png"


class JsonLinesWriter(metric_writers.MetricWriter):
  """Appends one JSON object per write_scalars call: {"step": s, "name": value, ...}.

  Only scalars have a JSON form here; images, histograms and the like go to TensorBoard.
  """

  def __init__(self, path: str):
    self._file = open(path, "a")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    record = {"step": int(step)}
    record.update({name: float(value) for name, value in scalars.items()})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()  # a line per log interval: cheap, and readable while the run goes on

  def write_summaries(self, step, values, metadata=None):
    self.write_scalars(step, {name: value for name, value in values.items()
                              if np.ndim(value) == 0})

  def write_images(self, step, images):
    del step, images

  def write_videos(self, step, videos):
    del step, videos

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate

  def write_texts(self, step, texts):
    del step, texts

  def write_histograms(self, step, arrays, num_buckets=None):
    del step, arrays, num_buckets

  def write_hparams(self, hparams):
    del hparams

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


# TensorBoard groups scalars by the part of their name before '/': one group per kind.
_OPTIMIZER_SCALARS = frozenset({"learning_rate", "grad_norm", "param_norm"})
_SPEED_SCALARS = frozenset({"examples_per_sec", "steps_per_sec", "uptime"})
_EVALUATION_PREFIXES = ("knn_", "linear_", "test_")
_RUN_PREFIXES = ("final_", "initial_")


def tensorboard_name(name: str) -> str:
  """'train/loss', 'eval/knn_top1', 'optim/learning_rate', 'speed/...', 'final/...' for the flat
  names of metrics.jsonl and results.json."""
  for prefix in _RUN_PREFIXES:
    if name.startswith(prefix):
      return f"{prefix[:-1]}/{name[len(prefix):]}"
  if name in _OPTIMIZER_SCALARS:
    return f"optim/{name}"
  if name in _SPEED_SCALARS:
    return f"speed/{name}"
  if name.startswith(_EVALUATION_PREFIXES):
    return f"eval/{name}"
  return f"train/{name}"


class TensorBoardWriter(metric_writers.SummaryWriter):
  """clu's TensorBoard writer with the scalars grouped by `tensorboard_name`."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    super().write_scalars(step, {tensorboard_name(name): value
                                 for name, value in scalars.items()})


def create_metric_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard + workdir/metrics.jsonl on process 0, nothing on the others; the console line
  is the training loop's."""
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  return metric_writers.AsyncMultiWriter([
      TensorBoardWriter(workdir), JsonLinesWriter(os.path.join(workdir, METRICS_FILE))])


def write_final_scalars(writer: metric_writers.MetricWriter, step: int,
                        results: Mapping[str, Any]) -> None:
  """final_<name> for every number of a run's results, beside its curves in TensorBoard."""
  writer.write_scalars(step, {f"final_{name}": value for name, value in results.items()
                              if isinstance(value, float)})


def config_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True)


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      f.write(config_json(config))


def write_results(workdir: str, results: Mapping[str, Any]) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, RESULTS_FILE), "w") as f:
      json.dump(dict(results), f, indent=2, sort_keys=True)


def finished_results(workdir: str, config: ml_collections.ConfigDict, *,
                     continuable: bool = False) -> dict | None:
  """The results of a finished run of this same config in `workdir`, or None.

  A finished run of another config is an error, so a rerun never returns stale numbers, unless
  `continuable` (pretraining: a longer schedule continues the run; the checkpoint's run record
  still has to agree, see `loop.check_resumable`). A run its time budget stopped is unfinished
  (None): rerunning continues it from its checkpoint, with any budget.
  """
  results_path = os.path.join(workdir, RESULTS_FILE)
  config_path = os.path.join(workdir, CONFIG_FILE)
  if not (os.path.exists(results_path) and os.path.exists(config_path)):
    return None
  with open(results_path) as f:
    results = json.load(f)
  if results.get("stopped_early_by_time_budget"):
    logging.info("%s holds a %s run its time budget stopped at step %s: continuing it", workdir,
                 config.mode, results.get("step"))
    return None
  with open(config_path) as f:
    finished_config = f.read()
  if finished_config != config_json(config):
    if continuable:
      return None
    raise errors.InvalidInput(
        f"{workdir} holds a finished {config.mode} run of another config (see its "
        f"{CONFIG_FILE}); use a new --workdir")
  logging.info("%s already holds this finished %s run; returning its results", workdir,
               config.mode)
  return results
