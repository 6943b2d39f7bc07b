"""Pretraining: 1 device == 8 devices, the probe cannot touch the encoder, exact resume, safe stops.

Everything runs the smoke recipe (ResNet-18 at width 1/8, 32 px, batch 32) on the generated
`synthetic_shapes`, prepared into a temporary data_dir.
"""
import json
import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import smoke_pretrain
from simclr_jax import augment
from simclr_jax import checkpointing
from simclr_jax import export
from simclr_jax import input_pipeline
from simclr_jax import models
from simclr_jax import optim
from simclr_jax import loop
from simclr_jax import sharding
from simclr_jax import time_budget
from simclr_jax import workdir_files
from simclr_jax.jobs import pretrain
from tests.helpers import relative_distance, set_fields

DATASET = "synthetic_shapes"
# 1 vs 8 devices in float32: the same maths summed in a different order (BN statistics, psum of
# gradient shares, all-gathered similarity rows). After three LARS steps each state part stays
# within this relative L2 distance of the 1-device value: measured 3.2e-6 (params), 3.8e-8 (BN
# statistics), 3.5e-5 (momentum). The BN parameters' untrusted `lr * g` steps amplify rounding in
# near-degenerate channels (at the paper's per-anchor loss scale, steps half as long: 5.0e-7,
# 3.6e-8, 5.6e-6). A wrong reduction (a missed or doubled device) is O(1).
DEVICE_COUNT_RTOL = 1e-4
# oneDNN's float32 convolutions on 8 devices against XLA's on one: also only the summation order
# differs, but inside every convolution too. Measured after three LARS steps: 1.5e-4 (parameter
# updates; 1.9e-6 before the loss took the official scale, whose untrusted BN steps are twice as
# long, and the crops their tf.image resize); other CPUs may get other oneDNN kernels, hence the
# margin. A wrong gradient is O(1).
ONEDNN_FLOAT32_RTOL = 1e-3
# oneDNN bfloat16 convolutions against XLA's float32 ones (each convolution's exactness is tested in
# test_onednn_conv): losses and gradient norms agree to ~2e-2 (~5e-3 before the official loss
# scale doubled the untrusted BN steps). After three LARS steps of this tiny network, whose batch
# norm divides by the spread of a few 8-16-channel maps, the rounding moves the parameter updates
# by 28% over all (10% before), within BFLOAT16_STATE_RTOL. A wrong gradient (zero, transposed,
# of the wrong view) moves them by 100% or more.
BFLOAT16_METRIC_RTOL = 4e-2
BFLOAT16_STATE_RTOL = 0.5


def smoke_config(data_dir: str, **overrides):
  config = smoke_pretrain.get_config()
  config.data_dir = data_dir
  config.evals.knn.enabled = False
  return set_fields(config, **overrides)


def build(config, mesh, conv_backend="xla", norm_backend="jax", dtype="float32"):
  """Model, optimizer, initial state and compiled step for `mesh`, as pretrain builds them."""
  info = input_pipeline.get_dataset_info(config.dataset, data_dir=config.data_dir)
  model = models.create_model(config.model, num_classes=info.num_classes,
                              axis_name=sharding.DATA_AXIS, conv_backend=conv_backend,
                              norm_backend=norm_backend, dtype=models.COMPUTE_DTYPES[dtype])
  total_steps, warmup_steps = 10, 2
  schedule = optim.learning_rate_schedule(
      config.optimizer.base_learning_rate, lr_scaling=config.optimizer.lr_scaling,
      global_batch_size=config.global_batch_size, total_steps=total_steps,
      warmup_steps=warmup_steps)
  optimizer = optim.create_optimizer("lars", schedule,
                                     weight_decay=config.optimizer.weight_decay)
  augment_view = augment.build_augmentation(config.augment, config.image_size)
  state = pretrain.create_train_state(model, optimizer, seed=config.seed,
                                   image_size=config.image_size, mesh=mesh)
  step = pretrain.make_train_step(model, optimizer, augment_view, temperature=config.temperature,
                               learning_rate_fn=schedule, mesh=mesh)
  batches = input_pipeline.create_train_iterator(
      config.dataset, data_dir=config.data_dir, split=config.train_split,
      global_batch_size=config.global_batch_size, image_size=config.image_size,
      host_crop_views=0, seed=config.seed, mesh=mesh)
  return state, step, batches


def run_steps(config, mesh, num_steps, conv_backend="xla", norm_backend="jax", dtype="float32"):
  state, step, batches = build(config, mesh, conv_backend, norm_backend, dtype)
  initial_state = jax.device_get(state)
  inputs, metrics = [], []
  for _ in range(num_steps):
    batch = next(batches)
    inputs.append(jax.device_get(batch))
    state, step_metrics = step(state, batch)
    metrics.append(jax.device_get(step_metrics))
  return jax.device_get(state), metrics, inputs, step, initial_state


@pytest.fixture(scope="module")
def one_and_eight_devices(data_dir):
  config = smoke_config(data_dir)
  one = run_steps(config, sharding.create_mesh(jax.devices()[:1]), 3)
  eight = run_steps(config, sharding.create_mesh(), 3)
  return config, one, eight


def test_three_steps_on_one_device_equal_three_steps_on_eight(one_and_eight_devices):
  _, (state_1, metrics_1, inputs_1, *_), (state_8, metrics_8, inputs_8, *_) = (
      one_and_eight_devices)
  for batch_1, batch_8 in zip(inputs_1, inputs_8):  # the same global batches ...
    for key in ("image", "label", "index"):
      np.testing.assert_array_equal(batch_1[key], batch_8[key])
  for step_1, step_8 in zip(metrics_1, metrics_8):  # ... give the same losses ...
    for name in ("loss", "probe_loss", "contrastive_accuracy", "grad_norm", "param_norm"):
      np.testing.assert_allclose(step_8[name], step_1[name], rtol=DEVICE_COUNT_RTOL)
  assert metrics_1[-1]["learning_rate"] > 0
  assert int(state_1.step) == int(state_8.step) == 3
  np.testing.assert_array_equal(state_1.rng, state_8.rng)
  # ... and the same params, BN statistics and optimizer state.
  for part in ("params", "batch_stats", "opt_state"):
    distance = relative_distance(getattr(state_8, part), getattr(state_1, part))
    assert distance < DEVICE_COUNT_RTOL, f"{part} differ by {distance:.2e} (relative L2)"
  moved_means = [np.any(leaf != 0) for path, leaf in jax.tree_util.tree_leaves_with_path(
      state_1.batch_stats) if "mean" in jax.tree_util.keystr(path)]
  assert moved_means and all(moved_means), "BN running means never moved"


@pytest.mark.parametrize("backend, dtype, metric_rtol, state_rtol", [
    ("onednn", "float32", ONEDNN_FLOAT32_RTOL, ONEDNN_FLOAT32_RTOL),
    ("onednn_bf16", "float32", BFLOAT16_METRIC_RTOL, BFLOAT16_STATE_RTOL),
    ("onednn_bf16", "bfloat16", BFLOAT16_METRIC_RTOL, BFLOAT16_STATE_RTOL),
])
def test_native_kernels_on_eight_devices_train_like_xla_on_one(one_and_eight_devices, backend,
                                                               dtype, metric_rtol, state_rtol):
  """The CPU defaults ('auto': oneDNN's convolutions, or the cpu recipe's bfloat16 ones, and the
  native batch norm with its cross-device statistics) on 8 devices against XLA on one; with
  dtype='bfloat16' the maps stay bfloat16 between the kernels (the cpu recipe)."""
  config, (state_xla, metrics_xla, _, _, initial), _ = one_and_eight_devices
  state, metrics, *_ = run_steps(config, sharding.create_mesh(), 3, backend, "native", dtype)
  for step_onednn, step_xla in zip(metrics, metrics_xla):
    for name in ("loss", "probe_loss", "grad_norm", "param_norm"):
      np.testing.assert_allclose(step_onednn[name], step_xla[name], rtol=metric_rtol)
  updates = lambda state: jax.tree.map(np.subtract, state.params, initial.params)
  parts = {"param updates": (updates(state), updates(state_xla)),
           "batch_stats": (state.batch_stats, state_xla.batch_stats),
           "opt_state": (state.opt_state, state_xla.opt_state)}
  for part, (value, expected) in parts.items():
    distance = relative_distance(value, expected)
    assert distance < state_rtol, f"{part} differ by {distance:.2e} (relative L2)"


def test_online_probe_cannot_change_the_encoder(one_and_eight_devices, data_dir):
  config, _, (trained, _, inputs, step, initial_state) = one_and_eight_devices
  mesh = sharding.create_mesh()
  batch = jax.device_put(inputs[0], sharding.batch_sharded(mesh))
  shuffled = dict(batch, label=jax.device_put((inputs[0]["label"] + 3) % 10,
                                              sharding.batch_sharded(mesh)))
  # From the state after 3 steps: the warmup's step 0 has learning rate 0 and would move nothing.
  after_true, _ = step(jax.device_put(trained, sharding.replicated(mesh)), batch)
  after_shuffled, _ = step(jax.device_put(trained, sharding.replicated(mesh)), shuffled)
  after_true, after_shuffled = jax.device_get((after_true, after_shuffled))
  for part in ("encoder", "projection_head"):  # labels reach only the probe ...
    jax.tree.map(np.testing.assert_array_equal, after_true.params[part],
                 after_shuffled.params[part])
    jax.tree.map(np.testing.assert_array_equal, after_true.batch_stats[part],
                 after_shuffled.batch_stats[part])
  assert not np.array_equal(after_true.params["linear_head"]["dense"]["kernel"],
                            after_shuffled.params["linear_head"]["dense"]["kernel"])

  # ... because the probe's loss has exactly zero gradient w.r.t. everything but its head.
  model = models.create_model(config.model, num_classes=10)
  loss_fn = pretrain.make_loss_fn(model, temperature=config.temperature, axis_name=None)
  views = jnp.asarray(inputs[0]["image"][:8], jnp.float32).repeat(2, axis=0)[:16] / 255
  probe_loss = lambda params: loss_fn(params, initial_state.batch_stats, views,
                                     jnp.asarray(inputs[0]["label"][:8]))[1][0]["probe_loss"]
  probe_grads = jax.jit(jax.grad(probe_loss))(initial_state.params)
  for part in ("encoder", "projection_head"):
    assert all(np.all(g == 0) for g in jax.tree.leaves(probe_grads[part])), part
  assert np.any(probe_grads["linear_head"]["dense"]["kernel"] != 0)


def state_at(workdir, step):
  return checkpointing.read_state_as_numpy(
      os.path.join(workdir, workdir_files.CHECKPOINT_DIR), step)


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  # 24 px views cropped on device from the 32 px images, as a low-resolution pretraining does
  config = smoke_config(data_dir, num_train_steps=4, checkpoint_every_steps=2, keep_checkpoints=3,
                        log_every_steps=2, image_size=24, evals__knn__enabled=True,
                        evals__knn__every_steps=2, evals__knn__train_examples=128,
                        evals__knn__eval_examples=64)
  return config, workdir, pretrain.run(config, workdir)


def test_pretrain_writes_metrics_checkpoints_export_and_results(finished_run):
  config, workdir, results = finished_run
  assert results["mode"] == "pretrain" and results["dataset"] == DATASET
  assert results["step"] == 4 and results["num_devices"] == 8
  for name in ("loss", "contrastive_accuracy", "contrastive_entropy", "probe_loss", "probe_top1",
               "knn_top1", "learning_rate", "grad_norm", "param_norm", "pairs_per_sec"):
    assert np.isfinite(results[name]), name
  with open(os.path.join(workdir, workdir_files.RESULTS_FILE)) as f:
    assert json.load(f) == results
  with open(os.path.join(workdir, workdir_files.METRICS_FILE)) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records if "loss" in r] == [2, 4]
  assert [r["step"] for r in records if "knn_top1" in r] == [2, 4]
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
  assert os.path.getsize(os.path.join(workdir, workdir_files.LOSS_CURVE_FILE)) > 10_000
  assert sorted(os.listdir(os.path.join(workdir, workdir_files.CHECKPOINT_DIR))) == ["2", "4"]
  encoder = export.load_encoder(os.path.join(workdir, workdir_files.EXPORT_DIR))
  assert set(encoder.params) == {"encoder", "projection_head"}
  assert encoder.model_config.width_multiplier == config.model.width_multiplier
  assert encoder.metadata["image_size"] == 24
  final = state_at(workdir, 4)
  jax.tree.map(np.testing.assert_array_equal, encoder.params["encoder"],
               final["params"]["encoder"])
  assert int(final["step"]) == 4
  # A finished workdir is not trained again.
  assert pretrain.run(config, workdir) == results


def test_any_checkpoint_can_be_exported_for_probing(finished_run):
  _, workdir, _ = finished_run
  directory = pretrain.export_checkpoint(workdir, step=2)
  assert directory == os.path.join(workdir, "export-2")
  exported = export.load_encoder(directory)
  checkpointed = state_at(workdir, 2)
  for part in ("encoder", "projection_head"):
    jax.tree.map(np.testing.assert_array_equal, exported.params[part],
                 checkpointed["params"][part])
    jax.tree.map(np.testing.assert_array_equal, exported.batch_stats[part],
                 checkpointed["batch_stats"][part])
  assert exported.metadata["step"] == 2 and exported.model_config.depth == 18
  with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 3; it has \[2, 4\]"):
    pretrain.export_checkpoint(workdir, step=3)


def test_random_init_export_is_the_state_pretraining_starts_from(data_dir, tmp_path):
  config = smoke_config(data_dir)
  directory = pretrain.export_initialization(config, str(tmp_path))
  assert directory == str(tmp_path / workdir_files.EXPORT_DIR)
  exported = export.load_encoder(directory)
  model = models.create_model(config.model, num_classes=10)
  initial = pretrain.create_train_state(model, optax.identity(), seed=config.seed, image_size=32,
                                     mesh=sharding.create_mesh(jax.devices()[:1]))
  for part in ("encoder", "projection_head"):
    jax.tree.map(np.testing.assert_array_equal, exported.params[part],
                 jax.device_get(initial.params[part]))
  running_variances = jax.tree.leaves(exported.batch_stats["encoder"])
  assert running_variances and all(np.all((v == 0) | (v == 1)) for v in running_variances)


def fake_state(model, optimizer, *, seed, image_size, mesh):
  """A tiny state for tests of the loop's control flow (no ResNet to initialise)."""
  del model, optimizer, image_size
  return jax.device_put(loop.TrainState(
      step=np.int32(0), params={"w": np.zeros(2, np.float32)}, batch_stats={}, opt_state={},
      rng=np.asarray(jax.random.PRNGKey(seed))), sharding.replicated(mesh))


class FakeStep:
  """Stands in for the compiled step: finite metrics, except what a test asks for at a step."""

  def __init__(self, on_step):
    self.on_step = on_step

  def __call__(self, state, batch):
    del batch
    step = int(state.step) + 1
    metrics = {name: jnp.float32(1.0) for name in (
        "loss", "probe_loss", "probe_top1", "contrastive_accuracy", "contrastive_entropy",
        "grad_norm", "param_norm", "learning_rate")}
    metrics.update(self.on_step(step))
    return state.replace(step=state.step + 1), metrics


def test_nan_stops_the_run_naming_step_and_metric_and_keeps_the_last_good_checkpoint(
    data_dir, tmp_path, monkeypatch):
  monkeypatch.setattr(pretrain, "create_train_state", fake_state)
  monkeypatch.setattr(pretrain, "make_train_step", lambda *args, **kwargs: FakeStep(
      lambda step: {"grad_norm": jnp.float32(np.nan)} if step == 5 else {}))
  config = smoke_config(data_dir, num_train_steps=8, checkpoint_every_steps=2, log_every_steps=4)
  with pytest.raises(FloatingPointError, match=r"grad_norm is nan at step 5.*step 4"):
    pretrain.run(config, str(tmp_path))
  checkpointer = checkpointing.TrainCheckpointer(str(tmp_path / workdir_files.CHECKPOINT_DIR),
                                                 keep=3)
  assert checkpointer.all_steps() == [2, 4]  # step 6 was never saved
  checkpointer.close()
  assert not os.path.exists(tmp_path / workdir_files.EXPORT_DIR)


def test_sigterm_checkpoints_the_current_step_then_stops(data_dir, tmp_path, monkeypatch):
  def send_sigterm(step):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return {}

  monkeypatch.setattr(pretrain, "create_train_state", fake_state)
  monkeypatch.setattr(pretrain, "make_train_step", lambda *args, **kwargs: FakeStep(send_sigterm))
  config = smoke_config(data_dir, num_train_steps=8, checkpoint_every_steps=100)
  with pytest.raises(loop.Preempted, match="after step 3") as stopped:
    pretrain.run(config, str(tmp_path))
  assert stopped.value.step == 3
  assert os.listdir(tmp_path / workdir_files.CHECKPOINT_DIR) == ["3"]
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was removed again


def test_time_budget_ends_the_run_with_checkpoint_export_and_results(data_dir, tmp_path,
                                                                     monkeypatch):
  monkeypatch.setattr(pretrain, "create_train_state", fake_state)
  monkeypatch.setattr(pretrain, "make_train_step", lambda *args, **kwargs: FakeStep(
      lambda step: time.sleep(0.25) or {}))
  exported_steps = []
  monkeypatch.setattr(pretrain, "export_state",
                      lambda workdir, config, state: exported_steps.append(int(state.step)))
  config = smoke_config(data_dir, num_train_steps=1000, checkpoint_every_steps=100,
                        max_train_minutes=1.0 / 60)
  results = pretrain.run(config, str(tmp_path))
  assert results["stopped_early_by_time_budget"]
  # ~1 s of 0.25 s steps, less the first step's setup (longer on a loaded machine)
  assert 1 <= results["step"] < 20
  assert results["epochs"] == pytest.approx(results["step"] * 32 / 5000)
  assert os.listdir(tmp_path / workdir_files.CHECKPOINT_DIR) == [str(results["step"])]
  assert exported_steps == [results["step"]]
  with open(tmp_path / workdir_files.RESULTS_FILE) as f:
    assert json.load(f)["step"] == results["step"]


def test_schedule_fitted_to_the_time_budget_decays_inside_it(data_dir, tmp_path, monkeypatch):
  """A step of 50 ms and a 3 s budget: after a tenth of the budget (and 10 timed steps) the
  schedule is shortened from 1000 steps to what fits, its cosine ending at the fitted step,
  which the run reaches."""
  schedules = []

  def slow_step_for(*args, learning_rate_fn, **kwargs):
    del args, kwargs
    schedules.append(learning_rate_fn)
    return FakeStep(lambda step: time.sleep(0.05) or {})

  monkeypatch.setattr(pretrain, "create_train_state", fake_state)
  monkeypatch.setattr(pretrain, "make_train_step", slow_step_for)
  monkeypatch.setattr(pretrain, "export_state", lambda workdir, config, state: None)
  config = smoke_config(data_dir, num_train_steps=1000, checkpoint_every_steps=1000,
                        log_every_steps=5, max_train_minutes=3.0 / 60, schedule_fits_budget=True)
  results = pretrain.run(config, str(tmp_path))
  fitted = results[loop.FITTED_TOTAL_STEPS]
  assert 15 < fitted < 100 and results["num_train_steps"] == fitted  # <= 20 steps/s for ~3 s
  assert len(schedules) == 2  # the configured schedule, then the fitted one
  assert float(schedules[1](fitted)) == 0 < float(schedules[1](fitted - 1))
  assert float(schedules[0](fitted)) > 0.5 * float(schedules[0](100))  # 1000 steps long
  # 5% of the rate is held back: the run ends at the fitted step, not at the budget's edge
  assert results["step"] == fitted and not results["stopped_early_by_time_budget"]
  checkpointer = checkpointing.TrainCheckpointer(str(tmp_path / workdir_files.CHECKPOINT_DIR),
                                                 keep=3)
  record = checkpointer.latest_record()  # a resume keeps the fitted length
  checkpointer.close()
  assert record[loop.FITTED_TOTAL_STEPS] == record["total_steps"] == fitted


def test_the_fitted_schedule_takes_the_rate_after_the_warm_up(monkeypatch):
  """A 100 s budget, 4 steps/s for the first 5 s (input warm-up, a load spike), then 10 steps/s:
  the rate is measured over the window from 5% to 10% of the budget, so it is 10, not the 7
  of the first 10 s, and it is given only at the window's end."""
  clock = [0.0]
  monkeypatch.setattr(time_budget.time, "monotonic", lambda: clock[0])
  window = time_budget.RateWindow(time_budget.TimeBudget(100 / 60, check_every_steps=5))
  rates = {}
  for step in range(5, 101, 5):  # the log points
    clock[0] = step / 4 if step <= 20 else 5 + (step - 20) / 10
    rates[step] = window.steps_per_second(step)
  fitted_at = min(step for step, rate in rates.items() if rate is not None)
  assert fitted_at == 70  # the first log point at 10 s, a tenth of the budget
  assert rates[fitted_at] == pytest.approx(10.0)
  assert time_budget.fitted_total_steps(70, steps_per_second=10.0, seconds_left=90.0,
                                        total_steps=10_000) == 70 + int(0.95 * 10 * 90)


def test_the_fitted_rate_ignores_a_passing_load_and_counts_evaluations(monkeypatch):
  """10 steps/s in a 100 s budget; inside the window another job takes 3 s of one log interval
  and an evaluation takes 2 s: the rate is what the steps and the evaluation cost without the
  passing load, 15 steps in 1.5 + 2 s, where the window's mean would give 15 in 6.5 s."""
  clock = [0.0]
  monkeypatch.setattr(time_budget.time, "monotonic", lambda: clock[0])
  window = time_budget.RateWindow(time_budget.TimeBudget(100 / 60, check_every_steps=5))
  window.add_evaluation(4.0)  # before the window (the start's evaluations): not counted
  rates = {}
  for step in range(5, 70, 5):  # the log points, then each evaluation the loop times
    clock[0] += 0.5 + (3.0 if step == 60 else 0.0)
    rates[step] = window.steps_per_second(step)
    if step == 60:
      clock[0] += 2.0
      window.add_evaluation(2.0)
  assert all(rate is None for step, rate in rates.items() if step < 65)
  assert rates[65] == pytest.approx(15 / 3.5)


def test_unreadable_checkpoint_falls_back_to_the_previous_one(tmp_path):
  mesh = sharding.create_mesh()
  state = jax.device_put({"w": np.arange(4.0), "step": np.int32(0)}, sharding.replicated(mesh))
  checkpointer = checkpointing.TrainCheckpointer(str(tmp_path), keep=3)
  for step in (1, 2):
    checkpointer.save(step, dict(state, step=np.int32(step)), {"step": step})
  checkpointer.wait_until_finished()
  shutil.rmtree(tmp_path / "2" / checkpointing.STATE)  # e.g. a disk that lost files
  restored, record = checkpointer.restore_latest(state)
  assert record == {"step": 1} and int(restored["step"]) == 1
  assert checkpointer.all_steps() == [1]
  assert any(name.startswith(checkpointing.CORRUPT_PREFIX + "2-") for name in os.listdir(tmp_path))
  shutil.rmtree(tmp_path / "1" / checkpointing.STATE)
  with pytest.raises(checkpointing.CheckpointError, match="no checkpoint .* can be restored"):
    checkpointer.restore_latest(state)
  checkpointer.close()


@pytest.mark.parametrize("field, value, message", [
    ("global_batch_size", 36, "multiple of the number of devices"),
    ("temperature", 0.0, "temperature"),
    ("model__depth", 19, "depth"),
    ("augment__ops", ("random_resized_crop", "sharpen"), "sharpen"),
    ("dtype", "float16", "dtype"),
    ("train_split", "validation", "split 'validation'"),
    ("optimizer__name", "adam", "optimizer.name"),
    ("optimizer__probe_learning_rate", -0.1, "probe_learning_rate"),
    ("max_train_minutes", -1.0, "max_train_minutes"),
    ("conv_backend", "mkl", "allowed: auto, xla, onednn"),
    ("norm_backend", "fused", "allowed: auto, jax, native"),
])
def test_bad_configs_fail_before_compiling(data_dir, tmp_path, field, value, message):
  with pytest.raises(ValueError, match=message):
    pretrain.run(smoke_config(data_dir, **{field: value}), str(tmp_path))
  assert not os.path.exists(tmp_path / workdir_files.CHECKPOINT_DIR)


def test_resuming_with_another_batch_size_is_refused_before_compiling(finished_run, tmp_path,
                                                                     monkeypatch):
  config, uninterrupted, _ = finished_run
  shutil.copytree(os.path.join(uninterrupted, workdir_files.CHECKPOINT_DIR, "2"),
                  os.path.join(tmp_path, workdir_files.CHECKPOINT_DIR, "2"))
  config = smoke_config(config.data_dir, num_train_steps=4, global_batch_size=64)
  monkeypatch.setattr(pretrain, "create_train_state", None)  # never reached
  with pytest.raises(ValueError, match="global_batch_size=32 but the config says"):
    pretrain.run(config, str(tmp_path))
