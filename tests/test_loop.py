"""The one training loop, through every job: SIGTERM saves, exits 143 and resumes bitwise; a NaN
in any metric stops the run naming step and metric, with the last good checkpoint intact.

The jobs' real steps run (the smoke model on the generated synthetic_shapes); a wrapper around
each job's step factory sends SIGTERM, or poisons one metric, at a chosen step.
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar10_finetune
from configs import cifar10_linear_probe
from configs import smoke_pretrain
from simclr_jax import checkpointing
from simclr_jax import loop
from simclr_jax import workdir_files
from simclr_jax.jobs import finetune
from simclr_jax.jobs import linear_probe
from simclr_jax.jobs import pretrain
from tests.helpers import set_fields

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
SCHEDULE = dict(num_train_steps=STEPS, checkpoint_every_steps=2, log_every_steps=2,
                global_batch_size=32)
SPLITS = dict(train_split="train[:256]", eval_split="test[:64]")


@pytest.fixture(scope="module")
def random_export(data_dir, tmp_path_factory) -> str:
  config = set_fields(smoke_pretrain.get_config(), data_dir=data_dir)
  return pretrain.export_initialization(config, str(tmp_path_factory.mktemp("random")))


def job_config(job, data_dir, export):
  """(the job's run, its step factory's name, a small config) for `job`."""
  if job == "pretrain":
    config = set_fields(smoke_pretrain.get_config(), data_dir=data_dir, evals__knn__enabled=False,
                        **SCHEDULE)
    return pretrain, "make_train_step", config
  if job == "linear_probe":
    config = set_fields(cifar10_linear_probe.get_config("smoke"), data_dir=data_dir,
                        init_from=export, probe_protocol="sgd", eval_every_steps=0,
                        evals__knn__enabled=False, **SCHEDULE, **SPLITS)
    return linear_probe, "make_probe_step", config
  config = set_fields(cifar10_finetune.get_config("smoke"), data_dir=data_dir, init_from=export,
                      eval_every_steps=0, **SCHEDULE, **SPLITS)
  return finetune, "make_finetune_step", config


def wrap_steps(monkeypatch, module, factory_name, after_step):
  """Patches module.factory so that `after_step(step, metrics)` runs after each real step and
  may return replaced metrics."""
  factory = getattr(module, factory_name)

  def patched_factory(*args, **kwargs):
    step_fn = factory(*args, **kwargs)

    def step(state, *inputs):
      state, metrics = step_fn(state, *inputs)
      return state, after_step(int(jax.device_get(state.step)), metrics) or metrics
    return step

  monkeypatch.setattr(module, factory_name, patched_factory)


def checkpoint_steps(workdir):
  directory = os.path.join(workdir, workdir_files.CHECKPOINT_DIR)
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


@pytest.mark.parametrize("job", ["linear_probe", "finetune"])
def test_sigterm_saves_and_the_rerun_ends_bitwise_equal_to_an_uninterrupted_run(
    job, data_dir, random_export, tmp_path, monkeypatch):
  module, factory_name, config = job_config(job, data_dir, random_export)
  uninterrupted = module.run(config, str(tmp_path / "uninterrupted"))

  def sigterm_at_step_3(step, metrics):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  interrupted = str(tmp_path / "interrupted")
  with monkeypatch.context() as patch:
    wrap_steps(patch, module, factory_name, sigterm_at_step_3)
    with pytest.raises(loop.Preempted, match="after step 3") as stopped:
      module.run(config, interrupted)
  assert stopped.value.step == 3 and checkpoint_steps(interrupted) == [2, 3]
  assert not os.path.exists(os.path.join(interrupted, workdir_files.RESULTS_FILE))
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was removed again

  resumed = module.run(config, interrupted)
  assert resumed["start_step"] == 3 and resumed["step"] == STEPS
  for name in ("top1", "top5", "loss", "train_top1"):
    assert resumed[name] == uninterrupted[name], name
  jax.tree.map(np.testing.assert_array_equal,
               checkpointing.read_state_as_numpy(os.path.join(
                   interrupted, workdir_files.CHECKPOINT_DIR), STEPS),
               checkpointing.read_state_as_numpy(os.path.join(
                   tmp_path / "uninterrupted", workdir_files.CHECKPOINT_DIR), STEPS))


@pytest.mark.parametrize("job, metric", [("pretrain", "contrastive_entropy"),
                                         ("linear_probe", "grad_norm"),
                                         ("finetune", "train_top1")])
def test_nan_in_any_metric_of_any_job_stops_it_and_keeps_the_last_good_checkpoint(
    job, metric, data_dir, random_export, tmp_path, monkeypatch):
  module, factory_name, config = job_config(job, data_dir, random_export)
  config.log_every_steps = 4
  wrap_steps(monkeypatch, module, factory_name, lambda step, metrics: dict(
      metrics, **{metric: jnp.float32(np.nan)}) if step == 5 else None)
  with pytest.raises(FloatingPointError, match=rf"{metric} is nan at step 5.*\(step 4\) is kept"):
    module.run(config, str(tmp_path))
  assert checkpoint_steps(str(tmp_path)) == [2, 4]  # step 6 was never saved
  for name in (workdir_files.RESULTS_FILE, workdir_files.EXPORT_DIR):
    assert not os.path.exists(tmp_path / name)


def test_a_preempted_finetune_exits_143_on_the_command_line(data_dir, tmp_path):
  """SIGTERM as a scheduler sends it, to `python -m simclr_jax.main` (a supervised baseline)."""
  env = dict(os.environ, XLA_FLAGS="")
  args = [sys.executable, "-m", "simclr_jax.main",
          "--config=configs/cifar10_finetune.py:smoke_scratch", f"--workdir={tmp_path}",
          f"--config.data_dir={data_dir}", "--config.num_train_steps=500",
          "--config.log_every_steps=1", "--config.eval_every_steps=0",
          "--config.train_split=train[:256]", "--config.eval_split=test[:64]"]
  process = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  metrics = tmp_path / workdir_files.METRICS_FILE
  deadline = time.monotonic() + 300
  try:
    while not (metrics.exists() and '"loss"' in metrics.read_text()):
      assert process.poll() is None and time.monotonic() < deadline, (
          process.communicate()[0][-3000:])
      time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
  finally:
    if process.poll() is None:
      process.kill()
  assert process.returncode == loop.PREEMPTED_EXIT_CODE == 143, output[-3000:]
  stopped_at, = checkpoint_steps(str(tmp_path))
  assert f"stopped by SIGTERM after step {stopped_at}" in output
  with open(tmp_path / workdir_files.CONFIG_FILE) as f:
    assert json.load(f)["mode"] == "finetune"
