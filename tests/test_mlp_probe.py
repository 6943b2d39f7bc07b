"""The MLP probe evaluator and features taken with batch norm in training mode (batch statistics).

Batch-statistics features are checked against NumPy float64 batch norm on a tiny encoder, on 1
and 8 devices with padding in the batch; the probe on separable and on random labels; the
pretraining job with `evals.mlp` on; a bad `batch_norm` as a one-line user error.
"""
import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar10_linear_probe
from configs import common
from configs import smoke_pretrain
from simclr_jax import config_checks
from simclr_jax import errors
from simclr_jax import features
from simclr_jax import models
from simclr_jax import sharding
from simclr_jax import workdir_files
from simclr_jax.evaluators import from_config
from simclr_jax.evaluators import mlp
from simclr_jax.jobs import linear_probe
from simclr_jax.jobs import pretrain
from tests.helpers import set_fields

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPSILON = 1e-5
# Batch of 16 images (2 per device on 8), the last 5 padding.
BATCH, REAL = 16, 11


class TinyEncoder(nn.Module):
  """Flatten -> Dense -> the models' BatchNorm (+ ReLU): one batch-norm layer to check."""
  native: bool = False

  @nn.compact
  def __call__(self, images, *, train: bool):
    x = nn.Dense(6, use_bias=False)(images.reshape(len(images), -1))
    return models.BatchNorm(use_running_average=not train, epsilon=EPSILON, native=self.native)(
        x, relu=True)


def tiny_variables():
  """Non-trivial scale, bias and running statistics, so the two modes differ."""
  variables = TinyEncoder().init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)), train=False)
  rng = np.random.default_rng(1)
  params = dict(variables["params"])
  params["BatchNorm_0"] = {"scale": rng.uniform(0.5, 2.0, 6).astype(np.float32),
                           "bias": rng.normal(size=6).astype(np.float32)}
  batch_stats = {"BatchNorm_0": {"mean": rng.normal(size=6).astype(np.float32),
                                 "var": rng.uniform(0.5, 2.0, 6).astype(np.float32)}}
  return {"params": params, "batch_stats": batch_stats}


def numpy_batch_norm(variables, images, mask=None, running=False):
  """float64 reference: relu(scale * (x - mean) / sqrt(var + eps) + bias), the statistics those
  of the masked rows (biased variance) or the running averages."""
  x = images.reshape(len(images), -1).astype(np.float64) @ np.asarray(
      variables["params"]["Dense_0"]["kernel"], np.float64)
  bn = variables["params"]["BatchNorm_0"]
  if running:
    mean = np.asarray(variables["batch_stats"]["BatchNorm_0"]["mean"], np.float64)
    var = np.asarray(variables["batch_stats"]["BatchNorm_0"]["var"], np.float64)
  else:
    rows = x[np.ones(len(x), bool) if mask is None else mask]
    mean, var = rows.mean(axis=0), rows.var(axis=0)
  y = (x - mean) / np.sqrt(var + EPSILON) * bn["scale"] + bn["bias"]
  return np.maximum(y, 0.0)


def extract(batch_norm, images, mask, devices, native=False):
  function = features.representation_function(TinyEncoder(native=native).apply, batch_norm,
                                              sharding.create_mesh(devices))
  return np.asarray(function(tiny_variables(), images, mask))


@pytest.fixture(scope="module")
def padded_batch():
  images = np.random.default_rng(2).uniform(size=(BATCH, 4, 4, 3)).astype(np.float32)
  images[REAL:] = 0.0  # the eval pipeline pads with black images
  return images, np.arange(BATCH) < REAL


@pytest.mark.parametrize("num_devices", [1, 8])
def test_batch_statistics_features_are_batch_norm_over_the_real_examples(padded_batch,
                                                                          num_devices):
  images, mask = padded_batch
  batch = extract("batch_statistics", images, mask, jax.devices()[:num_devices])
  expected = numpy_batch_norm(tiny_variables(), images, mask)
  np.testing.assert_allclose(batch[:REAL], expected[:REAL], rtol=1e-5, atol=1e-5)
  with_padding = numpy_batch_norm(tiny_variables(), images)  # what counting the padding gives
  assert np.abs(with_padding[:REAL] - expected[:REAL]).max() > 1e-2
  running = extract("running_average", images, mask, jax.devices()[:num_devices])
  np.testing.assert_allclose(running, numpy_batch_norm(tiny_variables(), images, running=True),
                             rtol=1e-5, atol=1e-5)
  assert np.abs(running[:REAL] - batch[:REAL]).max() > 1e-2


def test_native_batch_norm_layers_take_the_mask_through_flax_and_agree(padded_batch):
  images, mask = padded_batch
  np.testing.assert_allclose(extract("batch_statistics", images, mask, jax.devices(), native=True),
                             extract("batch_statistics", images, mask, jax.devices()),
                             rtol=1e-6, atol=1e-6)


def test_an_images_batch_statistics_features_change_with_its_batch(padded_batch):
  images, mask = padded_batch
  other = images.copy()
  other[1:REAL] = np.random.default_rng(3).uniform(size=other[1:REAL].shape)
  for batch_norm, changes in (("batch_statistics", True), ("running_average", False)):
    first, second = (extract(batch_norm, batch, mask, jax.devices()[:1])[0]
                     for batch in (images, other))
    assert (np.abs(first - second).max() > 1e-3) == changes, batch_norm


def test_every_batch_norm_of_the_resnet_excludes_the_padding(padded_batch):
  """The smoke ResNet on 8 devices, padded batch, against the native kernels applied to the real
  images alone on one device (the reference implementation of training-mode batch norm)."""
  config = smoke_pretrain.get_config()
  images = np.random.default_rng(4).uniform(size=(BATCH, 32, 32, 3)).astype(np.float32)
  images[REAL:] = 0.0
  _, mask = padded_batch
  model = models.create_model(config.model, num_classes=10)
  variables = model.init(jax.random.key(0), images[:1], train=False)
  function = features.representation_function(
      functools.partial(model.apply, method=lambda module, x, **kwargs: module(x, **kwargs)["h"]),
      "batch_statistics", sharding.create_mesh())
  reference, _ = model.clone(norm_backend="native").apply(
      variables, images[:REAL], train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(np.asarray(function(variables, images, mask))[:REAL],
                             reference["h"], rtol=1e-4, atol=1e-5)


def test_unknown_batch_norm_mode_is_refused():
  with pytest.raises(ValueError, match="batch_norm='train'; allowed: running_average, "
                                       "batch_statistics"):
    features.representation_function(TinyEncoder().apply, "train",
                                     sharding.create_mesh(jax.devices()[:1]))


def clusters(num_examples, *, seed, num_classes=4, dim=16):
  """Gaussian blobs around well separated centres (the same centres for every seed)."""
  centres = np.random.default_rng(0).normal(scale=4.0, size=(num_classes, dim))
  rng = np.random.default_rng(seed)
  labels = rng.integers(num_classes, size=num_examples)
  return (centres[labels] + rng.normal(size=(num_examples, dim))).astype(np.float32), labels


PROBE = dict(num_classes=4, hidden_sizes=(32, 16), dropout_rate=0.5, learning_rate=1e-2,
             epochs=8, batch_size=64)


def test_mlp_probe_separates_clusters_and_stays_at_chance_on_random_labels():
  train, test = clusters(640, seed=1), clusters(320, seed=2)
  probe, params, loss = mlp.fit_mlp_probe(*train, seed=0, **PROBE)
  assert np.mean(mlp.predict(probe, params, test[0]) == test[1]) > 0.95 and loss < 0.5
  rng = np.random.default_rng(3)
  probe, params, _ = mlp.fit_mlp_probe(train[0], rng.integers(4, size=640), seed=0, **PROBE)
  assert np.mean(mlp.predict(probe, params, test[0]) == rng.integers(4, size=320)) < 0.4


def test_mlp_probe_is_deterministic_given_the_seed_and_dropout_is_off_at_eval():
  train_features, train_labels = clusters(256, seed=1)
  fits = [mlp.fit_mlp_probe(train_features, train_labels, seed=seed, **PROBE)
          for seed in (0, 0, 1)]
  jax.tree.map(np.testing.assert_array_equal, fits[0][1], fits[1][1])
  assert fits[0][2] == fits[1][2] and fits[0][2] != fits[2][2]
  probe, params, _ = fits[0]
  evaluate = lambda: probe.apply({"params": params}, train_features, train=False)
  np.testing.assert_array_equal(evaluate(), evaluate())
  dropped = [probe.apply({"params": params}, train_features, train=True,
                         rngs={"dropout": jax.random.key(key)}) for key in (0, 1)]
  assert np.abs(dropped[0] - dropped[1]).max() > 0  # ... while training, dropout is on


def test_mlp_block_has_the_reports_defaults_and_every_evaluator_has_a_check():
  block = common.pretrain_config().evals.mlp
  assert not block.enabled and block.batch_norm == "batch_statistics"
  assert (tuple(block.hidden_sizes), block.dropout_rate, block.learning_rate, block.epochs,
          block.batch_size) == ((512, 256), 0.5, 1e-3, 20, 256)
  assert set(config_checks.EVALUATOR_CHECKS) == set(from_config.REPRESENTATION_EVALUATORS)


@pytest.mark.parametrize("field, value, message", [
    ("batch_norm", "train", "evals.mlp.batch_norm='train'; allowed: running_average, "
                            "batch_statistics"),
    ("hidden_sizes", (512, 0), r"evals.mlp.hidden_sizes=\(512, 0\) must be a tuple of positive"),
    ("dropout_rate", 1.0, r"evals.mlp.dropout_rate=1.0 must be in \[0, 1\)"),
    ("learning_rate", 0.0, "evals.mlp.learning_rate=0.0 must be > 0"),
    ("epochs", 0, "evals.mlp.epochs=0 must be >= 1"),
    ("batch_size", 0, "evals.mlp.batch_size=0 must be >= 1"),
    ("eval_examples", -1, "evals.mlp.eval_examples=-1 must be >= 0"),
])
def test_bad_mlp_block_is_a_config_error(field, value, message):
  config = common.pretrain_config()
  config.evals.mlp.update(enabled=True, **{field: value})
  with pytest.raises(config_checks.ConfigError, match=message):
    config_checks.check_evals(config)


def test_bad_batch_norm_is_one_line_and_exit_status_2_before_compiling(data_dir, tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "simclr_jax.main", "--config=configs/smoke_pretrain.py",
       f"--config.data_dir={data_dir}", "--config.evals.mlp.enabled=True",
       "--config.evals.mlp.batch_norm=train", f"--workdir={tmp_path}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  output = result.stdout + result.stderr
  assert result.returncode == errors.EXIT_CODE and "Traceback" not in output, output[-3000:]
  error_lines = [line for line in output.splitlines() if line.startswith("error: ")]
  assert error_lines == ["error: invalid config: evals.mlp.batch_norm='train'; allowed: "
                         "running_average, batch_statistics"], output[-3000:]
  assert not os.listdir(tmp_path)


def test_pretraining_reports_the_mlp_probe_beside_knn(data_dir, tmp_path):
  config = set_fields(
      smoke_pretrain.get_config(), data_dir=data_dir, num_train_steps=2, log_every_steps=1,
      checkpoint_every_steps=2)
  config.evals.knn.update(every_steps=0, train_examples=128, eval_examples=64)
  config.evals.mlp.update(enabled=True, train_examples=128, eval_examples=64, hidden_sizes=(32,),
                          epochs=2, batch_size=32)
  results = pretrain.run(config, str(tmp_path))
  with open(tmp_path / workdir_files.RESULTS_FILE) as f:
    written = json.load(f)
  for name in ("mlp_top1", "mlp_train_loss", "knn_top1"):
    assert name in results and written[name] == results[name], name
  assert 0.0 <= written["mlp_top1"] <= 1.0 and np.isfinite(written["mlp_train_loss"])


def test_linear_probe_job_runs_the_mlp_probe_on_the_frozen_encoder(data_dir, tmp_path):
  """The probe job builds `config.evals` the same way: k-NN on running averages, the MLP on
  batch statistics, each from its own extraction of the frozen encoder."""
  encoder = pretrain.export_initialization(
      set_fields(smoke_pretrain.get_config(), data_dir=data_dir), str(tmp_path / "random"))
  config = set_fields(cifar10_linear_probe.get_config("smoke"), data_dir=data_dir,
                      init_from=encoder, probe_protocol="lbfgs", train_split="train[:256]",
                      eval_split="test[:128]", lbfgs__l2_num=2)
  config.evals.mlp = common.mlp_probe_config(enabled=True, hidden_sizes=(32,), epochs=2,
                                             batch_size=64)
  results = linear_probe.run(config, str(tmp_path / "probe"))
  for name in ("mlp_top1", "mlp_train_loss", "knn_top1", "linear_top1"):
    assert name in results, name
