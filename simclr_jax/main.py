r"""Entry point: pretrain, linear-probe or fine-tune, as `config.mode` says.

  python -m simclr_jax.main --config=configs/smoke_pretrain.py --workdir=/tmp/simclr_smoke
  python -m simclr_jax.main --config=configs/cifar10_pretrain.py:cpu --workdir=/tmp/c10 \
      --config.data_dir=DIR --config.num_train_steps=150

`--config.<field>=value` overrides any field of the (locked) config; a misspelt field is an
error. Rerunning a command on the same workdir resumes from its newest checkpoint.

Several processes (one per host, or per GPU): the coordinator address, process count and id
come from --coordinator_address/--num_processes/--process_id, from JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID, or from SLURM / Open MPI / a TPU pod slice's environment
(--distributed forces JAX's own detection).
"""
import json
import logging as python_logging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from simclr_jax import host_memory

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Recipe file, e.g. configs/cifar10_pretrain.py:cpu", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: checkpoints, metrics, export, results (resumed if present)")
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with JAX's cluster auto-detection")
flags.mark_flags_as_required(["config", "workdir"])


class _DropLibraryChatter(python_logging.Filter):
  """Orbax logs every step of every save at INFO; keep its warnings and errors only."""

  def filter(self, record: python_logging.LogRecord) -> bool:
    return record.levelno >= python_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # The jobs import JAX and TensorFlow, which start threads: set malloc up before they do.
  host_memory.keep_freed_memory()
  from simclr_jax import jobs, loop, sharding  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  logging.get_absl_handler().addFilter(_DropLibraryChatter())
  config = _CONFIG.value
  if config.mode not in jobs.JOBS:
    raise app.UsageError(f"unknown config.mode {config.mode!r}; allowed: {', '.join(jobs.JOBS)}")
  sharding.initialize_distributed(
      coordinator_address=_COORDINATOR_ADDRESS.value, num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value, force=_DISTRIBUTED.value)
  tf.config.set_visible_devices([], "GPU")  # tf.data runs on the host; accelerators are JAX's.
  try:
    results = jobs.JOBS[config.mode](config, _WORKDIR.value)
  except loop.Preempted as e:
    logging.warning("%s", e)
    sys.exit(loop.PREEMPTED_EXIT_CODE)
  logging.info("results: %s", json.dumps(results, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
