"""The command line: recipes, config errors, and a real run that is preempted and resumed.

The end-to-end test launches `python -m simclr_jax.main` as a user would on a CPU (one device;
`conv_backend='auto'` is oneDNN) three times: uninterrupted and stopped by SIGTERM, side by
side, then restarted; the restarted run must end bitwise equal to the uninterrupted one. The runs
share a persistent XLA compilation cache, so the restart compiles nothing.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import cifar100_pretrain
from configs import cifar10_pretrain
from configs import imagenet_pretrain
from configs import imagenette_pretrain
from configs import smoke_pretrain
from simclr_jax import augment
from simclr_jax import checkpointing
from simclr_jax import input_pipeline
from simclr_jax import jobs
from simclr_jax import loop
from simclr_jax import workdir_files
from simclr_jax.jobs import finetune
from simclr_jax.jobs import linear_probe
from simclr_jax.jobs import pretrain

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {
    cifar10_pretrain: ("r18", "r50", "cpu", "smoke"),
    cifar100_pretrain: ("r18", "r50", "cpu", "smoke"),
    imagenet_pretrain: ("r50_100ep", "r50_1000ep", "smoke"),
    imagenette_pretrain: ("cpu", "smoke"),
    smoke_pretrain: ("cifar10", "cifar100", "imagenet"),
}
PREPARED_SPLITS = {"cifar10": ("train", "test"), "cifar100": ("train", "test"),
                   "imagenet2012": ("train", "validation"),
                   "imagenette/160px-v2": ("train", "validation")}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
  directory = str(tmp_path_factory.mktemp("tfds"))
  input_pipeline.get_dataset_info("synthetic_shapes", data_dir=directory)
  return directory


def run_main(args, *, env, wait=True, output=subprocess.PIPE):
  """The finished run, or (`wait=False`) the running process, its log going to `output`."""
  command = [sys.executable, "-m", "simclr_jax.main"] + args
  if not wait:
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=output,
                            stderr=subprocess.STDOUT, text=True)
  return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=600)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """The CLI as users run it on a laptop CPU: one device."""
  cache = str(tmp_path_factory.mktemp("xla_cache"))
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  return dict(os.environ, XLA_FLAGS=flags.strip(), JAX_COMPILATION_CACHE_DIR=cache,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


@pytest.mark.parametrize("recipe, variant", [
    (recipe, variant) for recipe, variants in RECIPES.items() for variant in variants])
def test_every_recipe_variant_is_a_valid_config(recipe, variant, data_dir):
  config = recipe.get_config(variant)
  with open(recipe.__file__) as f:
    assert "python -m simclr_jax.main --config=configs/" in f.read(2000)  # opens with its command
  if config.dataset == "synthetic_shapes":
    info = input_pipeline.get_dataset_info(config.dataset, data_dir=data_dir)
  else:
    splits = PREPARED_SPLITS[config.dataset]
    info = input_pipeline.DatasetInfo(name=config.dataset, num_classes=10, class_names=(),
                                      split_sizes=dict.fromkeys(splits, 50_000),
                                      image_shape=None)
  pretrain.validate_config(config, num_devices=8, info=info)


def test_recipes_carry_the_official_numbers():
  cifar = cifar10_pretrain.get_config()
  assert (cifar.global_batch_size, cifar.num_epochs, cifar.temperature) == (512, 1000, 0.5)
  assert cifar.model.cifar_stem and cifar.model.depth == 18 and cifar.image_size == 32
  cifar_augment = augment.resolve_config(cifar.augment)
  assert "blur" not in cifar_augment["ops"] and cifar_augment["color_jitter"]["strength"] == 0.5
  assert (cifar.optimizer.name, cifar.optimizer.base_learning_rate,
          cifar.optimizer.lr_scaling) == ("lars", 1.0, "linear")
  assert cifar.optimizer.weight_decay == 1e-4 and cifar.model.head_layers == 3  # the v2 command
  assert imagenet_pretrain.get_config().optimizer.weight_decay == 1e-6  # v1, official scale
  imagenet = imagenet_pretrain.get_config()
  assert (imagenet.model.depth, imagenet.global_batch_size, imagenet.temperature,
          imagenet.dtype) == (50, 4096, 0.1, "bfloat16")
  assert (imagenet.optimizer.base_learning_rate, imagenet.optimizer.lr_scaling) == (0.3, "linear")
  imagenet_augment = augment.resolve_config(imagenet.augment)
  assert "blur" in imagenet_augment["ops"] and imagenet_augment["color_jitter"]["strength"] == 1.0
  assert imagenet_pretrain.get_config("r50_1000ep").num_epochs == 1000
  cpu = cifar10_pretrain.get_config("cpu")
  assert cpu.model.width_multiplier == 0.5 and cpu.optimizer.lr_scaling == "sqrt"
  with pytest.raises(ValueError, match="unknown config variant 'r19'; allowed: cpu, r18, r50"):
    cifar10_pretrain.get_config("r19")


def test_modes_dispatch_to_the_jobs():
  assert jobs.JOBS == {"pretrain": pretrain.run, "linear_probe": linear_probe.run,
                       "finetune": finetune.run}


@pytest.mark.parametrize("override, message", [
    ("--config.modle.depth=50", "modle"),              # misspelt field: the config is locked
    ("--config.temperature=warm", "temperature"),      # wrong type
    ("--config.mode=pretrian", "unknown config.mode 'pretrian'; allowed: pretrain, linear_probe, "
     "finetune"),
])
def test_bad_overrides_fail_before_anything_runs(override, message, tmp_path, env):
  result = run_main(["--config=configs/smoke_pretrain.py", f"--workdir={tmp_path}", override],
                    env=env)
  assert result.returncode != 0
  assert message in result.stdout + result.stderr
  assert not os.listdir(tmp_path)


def checkpointed_state(workdir, step):
  return checkpointing.read_state_as_numpy(os.path.join(workdir, workdir_files.CHECKPOINT_DIR), step)


def test_cli_run_preempted_by_sigterm_resumes_to_the_uninterrupted_result(data_dir, tmp_path,
                                                                          env):
  args = ["--config=configs/smoke_pretrain.py", f"--config.data_dir={data_dir}",
          "--config.num_train_steps=24", "--config.log_every_steps=1",
          "--config.checkpoint_every_steps=100", "--config.evals.knn.enabled=False"]
  uninterrupted, interrupted = str(tmp_path / "uninterrupted"), str(tmp_path / "interrupted")
  # The uninterrupted run and the one to interrupt run side by side (2 cores), then the resume.
  with open(tmp_path / "uninterrupted.log", "w+") as reference_log:
    reference = run_main(args + [f"--workdir={uninterrupted}"], env=env, wait=False,
                         output=reference_log)
    try:
      process = run_main(args + [f"--workdir={interrupted}"], env=env, wait=False)
      metrics_path = os.path.join(interrupted, workdir_files.METRICS_FILE)
      deadline = time.monotonic() + 300
      while not (os.path.exists(metrics_path) and '"loss"' in open(metrics_path).read()):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0]
        time.sleep(0.05)
      process.send_signal(signal.SIGTERM)
      output = process.communicate(timeout=300)[0]
      assert process.returncode == loop.PREEMPTED_EXIT_CODE, output[-3000:]
      reference.wait(timeout=600)
    finally:
      if reference.poll() is None:
        reference.kill()
    reference_log.seek(0)
    reference_output = reference_log.read()
  assert reference.returncode == 0, reference_output[-3000:]
  assert "onednn convolutions" in reference_output  # the CPU default
  with open(os.path.join(uninterrupted, workdir_files.RESULTS_FILE)) as f:
    results = json.load(f)
  assert results["step"] == 24 and np.isfinite(results["loss"])
  for name in (workdir_files.METRICS_FILE, workdir_files.LOSS_CURVE_FILE, workdir_files.CONFIG_FILE, workdir_files.EXPORT_DIR):
    assert os.path.exists(os.path.join(uninterrupted, name)), name
  stopped_at, = [int(step) for step in os.listdir(os.path.join(interrupted,
                                                               workdir_files.CHECKPOINT_DIR))]
  assert 1 <= stopped_at < 24 and f"stopped by SIGTERM after step {stopped_at}" in output
  assert not os.path.exists(os.path.join(interrupted, workdir_files.RESULTS_FILE))

  resumed = run_main(args + [f"--workdir={interrupted}"], env=env)
  assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
  with open(os.path.join(interrupted, workdir_files.RESULTS_FILE)) as f:
    assert json.load(f)["start_step"] == stopped_at
  jax.tree.map(np.testing.assert_array_equal, checkpointed_state(interrupted, 24),
               checkpointed_state(uninterrupted, 24))
