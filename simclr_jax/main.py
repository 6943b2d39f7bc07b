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
from simclr_jax import host_memory

host_memory.keep_freed_memory()  # before any import starts a thread: see host_memory

import importlib  # noqa: E402
import json  # noqa: E402
import logging as python_logging  # noqa: E402
import sys  # noqa: E402
from typing import Any, Callable  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from simclr_jax import sharding  # noqa: E402

# mode -> (module, function(config, workdir) -> results dict)
MODES = {
    "pretrain": ("simclr_jax.train", "pretrain"),
    "linear_probe": ("simclr_jax.evaluate", "linear_probe"),
    "finetune": ("simclr_jax.evaluate", "finetune"),
}

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


def resolve_mode(mode: str) -> Callable[[Any, str], dict]:
  """The function that runs `mode`, imported only when asked for."""
  if mode not in MODES:
    raise ValueError(f"unknown config.mode {mode!r}; allowed: {', '.join(MODES)}")
  module_name, function_name = MODES[mode]
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name != module_name:
      raise
    raise NotImplementedError(
        f"config.mode={mode!r} is not available yet: {module_name} is missing") from e
  if not hasattr(module, function_name):
    raise NotImplementedError(
        f"config.mode={mode!r} is not available yet: {module_name}.{function_name} is missing")
  return getattr(module, function_name)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_DropLibraryChatter())
  config = _CONFIG.value
  run = resolve_mode(config.mode)
  sharding.initialize_distributed(
      coordinator_address=_COORDINATOR_ADDRESS.value, num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value, force=_DISTRIBUTED.value)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")  # tf.data runs on the host; accelerators are JAX's.

  from simclr_jax import train  # pylint: disable=g-import-not-at-top
  try:
    results = run(config, _WORKDIR.value)
  except train.Preempted as e:
    logging.warning("%s", e)
    sys.exit(train.PREEMPTED_EXIT_CODE)
  logging.info("results: %s", json.dumps(results, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
