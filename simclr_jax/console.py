"""What a person running `simclr_jax.main` sees: a quiet start, short log lines, a summary.

Quiet by default: the libraries' start-up notices (TensorFlow's oneDNN notice and C++ INFO lines,
absl's "All log messages before absl::InitializeLog()", JAX's probe for libtpu, TFDS's INFO lines
and progress bars, Orbax's per-save lines) are dropped; every library's warnings and errors stay,
and this package's INFO lines show as `HH:MM:SS message`. absl's `--verbosity` (given at all)
keeps everything, in absl's own format. `quiet_native_libraries` must run before TensorFlow or
JAX is imported: their C++ loggers read the environment once; `native_notices_dropped` wraps
those imports.
"""
import contextlib
import logging
import os
import sys
import tempfile
from typing import Any, Iterator, Mapping

# TensorFlow's C++ INFO lines after start-up (tf.data's, for one); the notices printed while it is
# imported ignore it and are dropped by `native_notices_dropped`.
_NATIVE_LOG_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "1"}
# Lines the C++ libraries print at start-up that say nothing about the run.
_NATIVE_NOTICES = ("All log messages before absl::InitializeLog()",
                   "oneDNN custom operations are on")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
# Library warnings that are known to be harmless here, by a fragment of their message.
_HARMLESS_WARNINGS = (
    "dataset_info.json",   # TFDS looking at a variant folder the generated dataset does not use
)


@contextlib.contextmanager
def native_notices_dropped() -> Iterator[None]:
  """Drops the C++ start-up notices printed while the block imports TensorFlow and JAX.

  They are written to file descriptor 2 before any log setting applies (TensorFlow's oneDNN
  notice ignores TF_CPP_MIN_LOG_LEVEL), so the block's stderr is captured, and every line that is
  not a known notice is written back when it ends.
  """
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured.read().decode(errors="replace").splitlines(keepends=True):
        if not any(notice in line for notice in _NATIVE_NOTICES):
          sys.stderr.write(line)
      sys.stderr.flush()


def quiet_native_libraries() -> None:
  """Sets the C++ log levels (unless the caller's environment already does)."""
  for name, value in _NATIVE_LOG_ENVIRONMENT.items():
    os.environ.setdefault(name, value)


class QuietFilter(logging.Filter):
  """Keeps this package's records and every record at WARNING or above, minus known noise."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return not any(fragment in record.getMessage() for fragment in _HARMLESS_WARNINGS)
    return record.pathname.startswith(_PACKAGE_DIR)


class ShortFormatter(logging.Formatter):
  """`HH:MM:SS message`, with the level named for warnings and errors."""

  def __init__(self):
    super().__init__("%(asctime)s %(message)s", "%H:%M:%S")

  def format(self, record: logging.LogRecord) -> str:
    line = super().format(record)
    if record.levelno >= logging.WARNING:
      time, message = line.split(" ", 1)
      line = f"{time} {record.levelname.lower()}: {message}"
    return line


def quiet_python_logging(handler: logging.Handler) -> None:
  """The quiet console on `handler` (absl's), and no TFDS progress bars."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  handler.addFilter(QuietFilter())
  handler.setFormatter(ShortFormatter())


def duration(seconds: float) -> str:
  """'2m05s' / '45s'."""
  seconds = int(round(seconds))
  return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def interval_line(step: int, total_steps: int, metrics: Mapping[str, float], *,
                  examples_per_sec: float | None, batch_size: int, unit: str) -> str:
  """One line per log interval: step/total, loss, the training accuracy, throughput, ETA."""
  parts = [f"step {step}/{total_steps}"]
  if "loss" in metrics:
    parts.append(f"loss {metrics['loss']:.4f}")
  for name, label in (("contrastive_accuracy", "contrastive acc"), ("train_top1", "train top-1")):
    if name in metrics:
      parts.append(f"{label} {metrics[name]:.1%}")
  if examples_per_sec:
    parts.append(f"{examples_per_sec:.0f} {unit}")
    parts.append(f"ETA {duration((total_steps - step) * batch_size / examples_per_sec)}")
  return "  ".join(parts)


def evaluation_line(step: int, metrics: Mapping[str, float], seconds: float) -> str:
  values = ", ".join(f"{name} {value:.4g}" for name, value in metrics.items())
  return f"step {step}{' (initial state)' if step == 0 else ''}: {values} ({duration(seconds)})"


def pretrain_summary(results: Mapping[str, Any], workdir: str,
                     config: Mapping[str, Any] | None = None, *,
                     generated_data: bool = False) -> str:
  """The end of a pretraining run: what it did, pretrained vs random init, where things are,
  and what to run next: the recipe's probe (`config.probe_recipe`) on this run's export and data
  and, after a run on the generated data, the CIFAR-10 recipe."""
  from simclr_jax import workdir_files  # pylint: disable=g-import-not-at-top
  path = lambda name: os.path.join(workdir, name)
  lines = [f"pretrained {results['step']} steps ({results['epochs']:.1f} epochs of "
           f"{results['dataset']}) in {duration(results['train_seconds'])}, "
           f"{results['pairs_per_sec']:.0f} pairs/s"]
  for name, label in (("knn_top1", "k-NN top-1"), ("linear_top1", "linear-probe top-1")):
    if name in results:
      line = f"{label}: {results[name]:.1%} pretrained"
      if f"initial_{name}" in results:
        initial = results[f"initial_{name}"]
        line += (f", {initial:.1%} at random init "
                 f"({100 * (results[name] - initial):+.1f} points)")
      lines.append(line)
  export = path(workdir_files.EXPORT_DIR)
  lines += [
      f"export:   {export}  (the encoder, for probing)",
      f"curves:   {path(workdir_files.LOSS_CURVE_FILE)}, "
      f"or tensorboard --logdir {os.path.dirname(os.path.normpath(workdir)) or '.'}",
      f"views:    {path(workdir_files.AUGMENTATIONS_FILE)}  (the augmentations it trained on)",
  ]
  config = config or {}
  next_steps = []
  if config.get("probe_recipe"):
    data_dir = f" --config.data_dir={config['data_dir']}" if config.get("data_dir") else ""
    next_steps.append(f"probe it:  python -m simclr_jax.main --config={config['probe_recipe']}"
                      f"{data_dir} --config.init_from={export} "
                      f"--workdir={os.path.normpath(workdir)}_probe")
  if generated_data:
    next_steps.append("CIFAR-10:  python -m simclr_jax.main --config=configs/cifar10_pretrain.py:"
                      "cpu --config.data_dir=DIR --workdir=workdirs/cifar10_cpu")
  lines += [("next:     " if i == 0 else " " * 10) + step for i, step in enumerate(next_steps)]
  return "\n".join(lines)


def results_summary(results: Mapping[str, Any], workdir: str,
                    config: Mapping[str, Any] | None = None, *,
                    generated_data: bool = False) -> str:
  """The last lines of any job: the pretraining summary, or a probe's / fine-tune's accuracy."""
  if results.get("mode") == "pretrain":
    return pretrain_summary(results, workdir, config, generated_data=generated_data)
  numbers = ", ".join(f"{name} {results[name]:.1%}" for name in ("top1", "top5", "knn_top1")
                      if isinstance(results.get(name), float))
  return f"{results.get('mode')} on {results.get('dataset')}: {numbers}; results in {workdir}"
