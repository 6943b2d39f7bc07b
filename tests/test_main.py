"""The command line: recipes and --list, bad input as one line and exit status 2, the quickstart's
quiet console and summary, and a real run that is preempted and resumed.

The end-to-end tests launch `python -m simclr_jax.main` as a user would on a CPU (one device;
`conv_backend='auto'` is oneDNN) three times: uninterrupted and stopped by SIGTERM, side by
side, then restarted; the restarted run must end bitwise equal to the uninterrupted one. The runs
share a persistent XLA compilation cache, so the restart compiles nothing.
"""
import importlib
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
from configs import quickstart
from configs import smoke_pretrain
from simclr_jax import augment
from simclr_jax import checkpointing
from simclr_jax import console
from simclr_jax import input_pipeline
from simclr_jax import jobs
from simclr_jax import loop
from simclr_jax import errors
from simclr_jax import workdir_files
from simclr_jax.jobs import finetune
from simclr_jax.jobs import linear_probe
from simclr_jax.jobs import pretrain
from tests.helpers import set_fields

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {
    cifar10_pretrain: ("r18", "r50", "cpu", "smoke"),
    cifar100_pretrain: ("r18", "r50", "cpu", "smoke"),
    imagenet_pretrain: ("r50_100ep", "r50_1000ep", "smoke"),
    imagenette_pretrain: ("cpu", "smoke"),
    smoke_pretrain: ("cifar10", "cifar100", "imagenet"),
    quickstart: ("default",),
}
PREPARED_SPLITS = {"cifar10": ("train", "test"), "cifar100": ("train", "test"),
                   "imagenet2012": ("train", "validation"),
                   "imagenette/160px-v2": ("train", "validation")}


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


# Bad input -> (arguments after --workdir, the message its one line must hold). Flag errors
# are found before anything is imported; the others by the job, before anything is written.
BAD_INPUTS = {
    "misspelt field": (["--config=configs/smoke_pretrain.py", "--config.model.dpeth=50"],
                       "--config.model.dpeth: the config has no field 'dpeth'; did you mean "
                       "'depth'?"),
    "wrong type": (["--config=configs/smoke_pretrain.py", "--config.temperature=warm"],
                   "flag --config.temperature=warm: could not convert string to float"),
    "recipe file": (["--config=configs/cifar10_pretrian.py"],
                    "cannot load --config=configs/cifar10_pretrian.py: [Errno 2] No such file"),
    "recipe variant": (["--config=configs/cifar10_pretrain.py:r19"],
                       "unknown config variant 'r19'; allowed: cpu, r18, r50, smoke"),
    "mode": (["--config=configs/smoke_pretrain.py", "--config.mode=pretrian"],
             "unknown config.mode 'pretrian'; allowed: pretrain, linear_probe, finetune"),
    "value": (["--config=configs/smoke_pretrain.py", "--config.temperature=-1"],
              "invalid config: temperature=-1.0 must be positive"),
    "dataset": (["--config=configs/smoke_pretrain.py", "--config.dataset=shapes"],
                "Unknown dataset 'shapes'"),
    "split": (["--config=configs/smoke_pretrain.py", "--config.train_split=trian"],
              "split 'trian' is not in synthetic_shapes (splits: test, train)"),
    "augmentation": (["--config=configs/smoke_pretrain.py", "--config.augment.preset=strong"],
                     "unknown augmentation preset 'strong'"),
    "backend": (["--config=configs/smoke_pretrain.py", "--config.conv_backend=cuda"],
                "conv_backend='cuda'; allowed: auto, xla, onednn, onednn_bf16"),
    "data_dir": (["--config=configs/smoke_pretrain.py", "--config.dataset=cifar10",
                  "--config.data_dir=no_such_dir"], "Dataset 'cifar10' is not prepared"),
    "init_from": (["--config=configs/cifar10_linear_probe.py:smoke",
                   "--config.init_from=no_such_export"], "is not an encoder export"),
    "architecture": (["--config=configs/cifar10_linear_probe.py:smoke",
                      "--config.model.depth=34", "--config.init_from={export}"],
                     "does not match config.model (depth: config.model has 34, the export has "
                     "18)"),
}


@pytest.fixture(scope="module")
def bad_input_runs(data_dir, env, tmp_path_factory):
  """name -> (finished process, its workdir): every BAD_INPUTS command, run side by side (their
  imports are single-threaded)."""
  export = pretrain.export_initialization(
      set_fields(smoke_pretrain.get_config(), data_dir=data_dir),
      str(tmp_path_factory.mktemp("random_init")))
  processes = {}
  for name, (args, _) in BAD_INPUTS.items():
    workdir = str(tmp_path_factory.mktemp("bad_input"))
    args = [arg.format(export=export) for arg in args]
    if not any(arg.startswith("--config.data_dir") for arg in args):
      args.append(f"--config.data_dir={data_dir}")
    processes[name] = (run_main(args + [f"--workdir={workdir}"], env=env, wait=False), workdir)
  return {name: (process.communicate(timeout=600), process.returncode, workdir)
          for name, (process, workdir) in processes.items()}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_status_2(name, bad_input_runs):
  (output, _), returncode, workdir = bad_input_runs[name]
  assert returncode == errors.EXIT_CODE, output[-3000:]
  assert "Traceback" not in output, output[-3000:]
  error_lines = [line for line in output.splitlines() if line.startswith("error: ")]
  assert len(error_lines) == 1 and BAD_INPUTS[name][1] in error_lines[0], output[-3000:]
  assert not os.listdir(workdir)


def test_traceback_flag_shows_where_a_user_error_was_raised(tmp_path, env):
  result = run_main(["--config=configs/cifar10_pretrain.py:r19", f"--workdir={tmp_path}",
                     "--traceback"], env=env)
  assert result.returncode != 0 and "Traceback" in result.stderr


def test_list_shows_every_recipe_and_its_variants(env):
  result = run_main(["--list"], env=env)
  assert result.returncode == 0, result.stderr
  listing = result.stdout
  assert listing.startswith("configs/quickstart.py: ")
  recipes = sorted(name for name in os.listdir(os.path.join(REPO_ROOT, "configs"))
                   if name.endswith(".py") and name not in ("common.py", "__init__.py"))
  for recipe in recipes:
    assert f"configs/{recipe}: " in listing
  assert re.search(r"^  cpu +ResNet-18 at width 1/2", listing, re.MULTILINE)
  assert re.search(r"^  r18 +the official command.*\(default\)$", listing, re.MULTILINE)


# What the libraries print at start-up and the per-scalar console lines the run replaced.
NOISE = ("oneDNN custom operations", "absl::InitializeLog", "libtpu", "dataset_info.json",
         "Downloading and preparing", "Subsequent calls will reuse", "Load dataset info",
         "logging_writer", "steps_per_sec", "Setting work unit notes")
QUICKSTART_STEPS = 60
# k-NN top-1 (points) the quickstart recipe's encoder gains over its random init in
# QUICKSTART_STEPS steps (measured: 36.0% vs 18.3%; the full recipe's 600 steps reach ~75%).
QUICKSTART_MARGIN = 10.0


def test_quickstart_is_quiet_and_ends_with_pretrained_against_random_init(env, tmp_path):
  """The README's first command, shortened, on data generated on the spot."""
  workdir = str(tmp_path / "quickstart")
  result = run_main(["--config=configs/quickstart.py", f"--workdir={workdir}",
                     f"--config.data_dir={tmp_path / 'tfds'}",
                     f"--config.num_train_steps={QUICKSTART_STEPS}"], env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  for noise in NOISE:
    assert noise not in result.stdout + result.stderr, noise
  assert re.search(rf"step 20/{QUICKSTART_STEPS}  loss \d\.\d{{4}}  contrastive acc \d+\.\d%  "
                   r"\d+ pairs/s  ETA \d+s", result.stderr), result.stderr
  assert "step 0 (initial state): knn_top1" in result.stderr
  summary = result.stdout
  assert re.search(rf"^pretrained {QUICKSTART_STEPS} steps \(0\.8 epochs of synthetic_shapes\) "
                   r"in \d+s, \d+ pairs/s$", summary, re.MULTILINE), summary
  pretrained, random_init, gain = map(float, re.search(
      r"^k-NN top-1: (\d+\.\d)% pretrained, (\d+\.\d)% at random init \(\+(\d+\.\d) points\)$",
      summary, re.MULTILINE).groups())
  assert gain >= QUICKSTART_MARGIN and pretrained - random_init == pytest.approx(gain, abs=0.11)
  for name in (workdir_files.EXPORT_DIR, workdir_files.LOSS_CURVE_FILE,
               workdir_files.AUGMENTATIONS_FILE):
    assert f"{os.path.join(workdir, name)}" in summary
    assert os.path.exists(os.path.join(workdir, name)), name
  export = os.path.join(workdir, workdir_files.EXPORT_DIR)
  assert ("next:     probe it:  python -m simclr_jax.main --config=configs/cifar10_linear_probe"
          f".py:smoke --config.data_dir={tmp_path / 'tfds'} --config.init_from={export} "
          f"--workdir={workdir}_probe") in summary
  assert "CIFAR-10:  python -m simclr_jax.main --config=configs/cifar10_pretrain.py:cpu" in summary
  with open(os.path.join(workdir, workdir_files.RESULTS_FILE)) as f:
    results = json.load(f)
  assert results["initial_knn_top1"] == pytest.approx(random_init / 100, abs=5e-4)
  assert results["knn_top1"] == pytest.approx(pretrained / 100, abs=5e-4)


def checkpointed_state(workdir, step):
  return checkpointing.read_state_as_numpy(
      os.path.join(workdir, workdir_files.CHECKPOINT_DIR), step)


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
  for name in (workdir_files.METRICS_FILE, workdir_files.LOSS_CURVE_FILE,
               workdir_files.CONFIG_FILE, workdir_files.EXPORT_DIR):
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


def load_recipe(recipe):
  """`configs/FILE.py:VARIANT` as `python -m simclr_jax.main --config=` would load it."""
  path, _, variant = recipe.partition(":")
  module = importlib.import_module(path[:-len(".py")].replace("/", "."))
  return module.get_config(variant or None)


@pytest.mark.parametrize("recipe,probe", [
    ("configs/cifar10_pretrain.py:cpu", "configs/cifar10_linear_probe.py:cpu"),
    ("configs/cifar10_pretrain.py:r18", "configs/cifar10_linear_probe.py:r18"),
    ("configs/imagenette_pretrain.py:cpu", "configs/imagenette_linear_probe.py:cpu"),
    ("configs/imagenet_pretrain.py:r50_100ep", "configs/imagenet_linear_probe.py:r50"),
    ("configs/cifar100_pretrain.py:cpu", None),
])
def test_the_summary_suggests_the_probe_recipe_of_the_run(recipe, probe):
  """After a real-data run, the next command is the probe of that recipe's network, on its data;
  the CIFAR-10 suggestion is only for runs on the generated data."""
  config = load_recipe(recipe)
  config.data_dir = "DATA"
  results = {"step": 10, "epochs": 1.0, "dataset": config.dataset, "train_seconds": 5.0,
             "pairs_per_sec": 100.0}
  summary = console.results_summary({"mode": "pretrain", **results}, "runs/x", config)
  if probe is None:
    assert "probe it" not in summary
  else:
    assert (f"next:     probe it:  python -m simclr_jax.main --config={probe} "
            "--config.data_dir=DATA --config.init_from=runs/x/export --workdir=runs/x_probe"
            ) in summary
  assert "CIFAR-10:" not in summary
  if probe:  # the suggested probe recipe exists and describes the run's network
    probe_config = load_recipe(probe)
    for field in ("depth", "width_multiplier", "cifar_stem", "head_layers"):
      assert probe_config.model[field] == config.model[field], (probe, field)
