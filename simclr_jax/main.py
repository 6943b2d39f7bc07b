r"""Entry point: pretrain, linear-probe or fine-tune, as `config.mode` says.

  python -m simclr_jax.main --config=configs/quickstart.py --workdir=workdirs/quickstart
  python -m simclr_jax.main --list     # the recipes in configs/ and their variants
  python -m simclr_jax.main --config=configs/cifar10_pretrain.py:cpu --workdir=/tmp/c10 \
      --config.data_dir=DIR --config.num_train_steps=150

`--config.<field>=value` overrides any field of the (locked) config; a misspelt field is an
error. Rerunning a command on the same workdir resumes from its newest checkpoint.

The console is quiet (`simclr_jax.console`): a line per log interval, the evaluators' lines and a
summary at the end; `--verbosity=0` (or any value) shows every library's log. Input the person got
wrong (a flag, a config value, a dataset, split, path or export: `simclr_jax.errors.UserError`)
is one line `error: ...` and exit status 2; `--traceback` shows where it was raised. Other
exceptions are bugs and keep their traceback.

Several processes (one per host, or per GPU): the coordinator address, process count and id
come from --coordinator_address/--num_processes/--process_id, from JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID, or from SLURM / Open MPI / a TPU pod slice's environment
(--distributed forces JAX's own detection).
"""
import contextlib
import json
import logging as python_logging
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from simclr_jax import console
from simclr_jax import errors
from simclr_jax import host_memory

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Recipe file, e.g. configs/cifar10_pretrain.py:cpu (--list shows them)",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: checkpoints, metrics, export, results (resumed if present)")
_LIST = flags.DEFINE_bool("list", False, "List the recipes in configs/ and their variants, exit")
_TRACEBACK = flags.DEFINE_bool(
    "traceback", False, "Show the Python traceback of a user error (a bad flag, config value, "
    "dataset or path), not only its one-line message")
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with JAX's cluster auto-detection")


class _DropLibraryChatter(python_logging.Filter):
  """Orbax logs every step of every save at INFO; keep its warnings and errors only."""

  def filter(self, record: python_logging.LogRecord) -> bool:
    return record.levelno >= python_logging.WARNING or "/orbax/" not in record.pathname


def _exit_with_user_error(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(errors.EXIT_CODE)


def _unknown_field_message(error: AttributeError, argv: list[str]) -> str:
  """'--config.modle: the config has no field ...; did you mean ...' for a misspelt override."""
  text = str(error).replace("\\'", "'").replace("\\n", " ")
  name = re.search(r"'(\w+)'", text)
  suggestion = re.search(r'Did you mean "([\w.]+)"', text)
  if name is None:
    return text
  for arg in argv:
    path = arg.split("=", 1)[0].split(".")
    if path[0] == "--config" and name.group(1) in path[1:]:
      return (f"{arg.split('=', 1)[0]}: the config has no field {name.group(1)!r}"
              + (f"; did you mean {suggestion.group(1)!r}?" if suggestion else ""))
  return text


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a bad flag, override or recipe variant told in one line (exit 2).

  A recipe's own ValueError (an unknown variant) is the user's; any other exception a recipe
  raises while it is built is a bug in it and keeps its traceback.
  """
  try:
    return flags.FLAGS(argv)
  except OSError as error:  # the recipe file cannot be loaded, found by an override
    if "--traceback" in argv:
      raise
    _exit_with_user_error(_config_load_message(error))
  except (flags.Error, AttributeError) as error:
    if "--traceback" in argv:
      raise
    chain = [error]
    while chain[-1].__context__ is not None:
      chain.append(chain[-1].__context__)
    field_errors = [e for e in chain if isinstance(e, AttributeError)]
    if field_errors:  # a field the locked config does not have
      _exit_with_user_error(_unknown_field_message(field_errors[0], argv))
    if "Error whilst parsing config file" not in str(error):  # a flag's own value
      _exit_with_user_error(str(error))
    if isinstance(chain[-1], ValueError):  # the recipe's error; config_flags copies its traceback
      _exit_with_user_error(str(chain[-1]))
    raise
  return []


def _loaded_config():
  """The config, or a user error when its file cannot be loaded (config_flags reports that at
  the first access)."""
  config = _CONFIG.value
  try:
    config.mode  # pylint: disable=pointless-statement
  except OSError as error:
    if _TRACEBACK.value:
      raise
    _exit_with_user_error(_config_load_message(error))
  return config


def _config_load_message(error: OSError) -> str:
  path = next((arg.split("=", 1)[1] for arg in sys.argv if arg.startswith("--config=")), "")
  reason = str(error).strip().splitlines()[-1].strip()
  return f"cannot load --config={path}: {reason} (--list shows the recipes)"


def main(argv):
  if len(argv) > 1:
    _exit_with_user_error(f"unexpected arguments: {argv[1:]}")
  if _LIST.value:
    from configs import common  # pylint: disable=g-import-not-at-top
    print(common.recipe_catalogue())
    return
  if _CONFIG.value is None or _WORKDIR.value is None:
    _exit_with_user_error("--config and --workdir are required, e.g. --config=configs/"
                          "quickstart.py --workdir=workdirs/quickstart (--list shows the recipes)")
  config = _loaded_config()
  verbose = flags.FLAGS["verbosity"].present
  if not verbose:
    console.quiet_native_libraries()  # before TensorFlow and JAX are imported
  # The jobs import JAX and TensorFlow, which start threads: set malloc up before they do.
  host_memory.keep_freed_memory()
  with contextlib.nullcontext() if verbose else console.native_notices_dropped():
    import jax  # pylint: disable=g-import-not-at-top
    # pylint: disable-next=g-import-not-at-top
    from simclr_jax import input_pipeline, jobs, loop, sharding
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

  handler = logging.get_absl_handler()
  handler.addFilter(_DropLibraryChatter())
  if not verbose:
    console.quiet_python_logging(handler)
  try:
    if config.mode not in jobs.JOBS:
      raise errors.InvalidInput(f"unknown config.mode {config.mode!r}; allowed: "
                                f"{', '.join(jobs.JOBS)}")
    sharding.initialize_distributed(
        coordinator_address=_COORDINATOR_ADDRESS.value, num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value, force=_DISTRIBUTED.value)
    tf.config.set_visible_devices([], "GPU")  # tf.data runs on the host; accelerators are JAX's.
    results = jobs.JOBS[config.mode](config, _WORKDIR.value)
  except loop.Preempted as e:
    logging.warning("%s", e)
    sys.exit(loop.PREEMPTED_EXIT_CODE)
  except errors.UserError as e:
    if _TRACEBACK.value:
      raise
    _exit_with_user_error(str(e))
  logging.debug("results: %s", json.dumps(results, sort_keys=True))
  if jax.process_index() == 0:
    print(console.results_summary(
        results, _WORKDIR.value, config,
        generated_data=config.get("dataset") == input_pipeline.SYNTHETIC_DATASET), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
