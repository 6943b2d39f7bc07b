"""The TF1 converter against checkpoints written here with the official names, order and maths.

`OfficialTF1Net` restates the official resnet.py / model_util.py at inference with plain tf.nn ops
and names its tensors the way tf.layers does (per-scope counters, in creation order), so the files
it writes read like the published ones; its outputs are the reference our converted model must
reproduce.
"""
import collections
import functools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf

from configs import official_checkpoint_probe
from simclr_jax import export
from simclr_jax import models
from simclr_jax.interop import convert_tf1

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKS = {18: ("basic", (2, 2, 2, 2)), 50: ("bottleneck", (3, 4, 6, 3))}
EPSILON = 1e-5
TOLERANCE = 1e-5  # max |ours - TF| relative to max |TF|; measured 2e-7..6e-7 (float32 rounding)


class OfficialTF1Net:
  """Official SimCLR network at inference (is_training=False), creating its tensors as it goes."""

  def __init__(self, *, depth, width, sk_ratio=0.0, head_layers=2, projection_dim=16,
               num_classes=0, supervised_head_input=0, seed=0):
    self.depth, self.width, self.sk_ratio = depth, width, sk_ratio
    self.head_layers, self.projection_dim = head_layers, projection_dim
    self.num_classes = num_classes
    self.supervised_head_input = supervised_head_input  # official --ft_proj_selector
    self.variables = {}
    self._counts = collections.Counter()
    self._rng = np.random.default_rng(seed)

  def _name(self, scope, layer):
    index = self._counts[scope, layer]
    self._counts[scope, layer] += 1
    return f"{scope}/{layer}" + (f"_{index}" if index else "")

  def _tensor(self, name, value):
    self.variables[name] = value.astype(np.float32)
    return tf.constant(self.variables[name])

  def conv(self, x, filters, kernel_size, strides, *, fixed_padding=True):
    """conv2d_fixed_padding: strided convs pad (k-1)//2 before, k-1-(k-1)//2 after, then VALID."""
    shape = (kernel_size, kernel_size, x.shape[-1], filters)
    kernel = self._tensor(self._name("base_model", "conv2d") + "/kernel",
                          self._rng.normal(size=shape) * (2 / np.prod(shape[:3])) ** .5)
    if strides > 1 and fixed_padding:
      before = (kernel_size - 1) // 2
      after = kernel_size - 1 - before
      x = tf.pad(x, [[0, 0], [before, after], [before, after], [0, 0]])
    return tf.nn.conv2d(x, kernel, strides, "SAME" if strides == 1 else "VALID")

  def batch_norm(self, x, *, scope="base_model", relu=True, center=True, last_in_block=False):
    name = self._name(scope, "batch_normalization")
    channels = x.shape[-1]
    low, high = (0.1, 0.4) if last_in_block else (0.6, 1.4)
    gamma = self._tensor(name + "/gamma", self._rng.uniform(low, high, channels))
    beta = self._tensor(name + "/beta", self._rng.normal(0, 0.2, channels)) if center else None
    mean = self._tensor(name + "/moving_mean", self._rng.normal(0, 0.2, channels))
    variance = self._tensor(name + "/moving_variance", self._rng.uniform(0.5, 2.0, channels))
    x = tf.nn.batch_normalization(x, mean, variance, beta, gamma, EPSILON)
    return tf.nn.relu(x) if relu else x

  def sk_conv(self, x, filters, strides):
    x = self.batch_norm(self.conv(x, 2 * filters, 3, strides))
    streams = tf.stack(tf.split(x, 2, axis=3))
    mid_dim = max(int(filters * self.sk_ratio), 32)
    summary = tf.reduce_mean(tf.reduce_sum(streams, axis=0), [1, 2], keepdims=True)
    summary = self.batch_norm(self.conv(summary, mid_dim, 1, 1))
    mixing = tf.stack(tf.split(self.conv(summary, 2 * filters, 1, 1), 2, axis=3))
    return tf.reduce_sum(streams * tf.nn.softmax(mixing, axis=0), axis=0)

  def basic_block(self, x, filters, strides, projection):
    shortcut = x
    if projection:
      shortcut = self.batch_norm(self.conv(x, filters, 1, strides), relu=False)
    x = self.batch_norm(self.conv(x, filters, 3, strides))
    x = self.batch_norm(self.conv(x, filters, 3, 1), relu=False, last_in_block=True)
    return tf.nn.relu(x + shortcut)

  def bottleneck_block(self, x, filters, strides, projection):
    shortcut = x
    if projection:
      if self.sk_ratio > 0:  # ResNet-D: average-pool, then a stride-1 1x1 conv
        if strides > 1:
          shortcut = tf.nn.avg_pool2d(tf.pad(x, [[0, 0], [0, 1], [0, 1], [0, 0]]), 2, strides,
                                      "VALID")
        else:
          shortcut = tf.nn.avg_pool2d(x, 2, 1, "SAME")
        shortcut = self.conv(shortcut, 4 * filters, 1, 1)
      else:
        shortcut = self.conv(x, 4 * filters, 1, strides)
      shortcut = self.batch_norm(shortcut, relu=False)
    x = self.batch_norm(self.conv(x, filters, 1, 1))
    if self.sk_ratio > 0:
      x = self.sk_conv(x, filters, strides)
    else:
      x = self.batch_norm(self.conv(x, filters, 3, strides))
    x = self.batch_norm(self.conv(x, 4 * filters, 1, 1), relu=False, last_in_block=True)
    return tf.nn.relu(x + shortcut)

  def dense(self, x, scope, units, use_bias):
    kernel = self._tensor(f"{scope}/dense/kernel",
                          self._rng.normal(size=(x.shape[-1], units)) / x.shape[-1] ** .5)
    x = tf.matmul(x, kernel)
    if use_bias:
      x += self._tensor(f"{scope}/dense/bias", self._rng.normal(0, 0.1, units))
    return x

  def __call__(self, images):
    """Returns h, block outputs, z, the head's hiddens and the supervised logits, as NumPy."""
    out = {}
    width = self.width
    x = tf.constant(images, tf.float32)
    if self.sk_ratio > 0:
      x = self.batch_norm(self.conv(x, int(64 * width) // 2, 3, 2))
      x = self.batch_norm(self.conv(x, int(64 * width) // 2, 3, 1))
      x = self.conv(x, int(64 * width), 3, 1)
    else:
      x = self.conv(x, int(64 * width), 7, 2)
    x = tf.nn.max_pool2d(self.batch_norm(x), 3, 2, "SAME")
    kind, groups = BLOCKS[self.depth]
    block = self.basic_block if kind == "basic" else self.bottleneck_block
    for group, num_blocks in enumerate(groups, start=1):
      filters = int(64 * 2 ** (group - 1) * width)
      x = block(x, filters, 2 if group > 1 else 1, projection=True)
      for _ in range(1, num_blocks):
        x = block(x, filters, 1, projection=False)
      out[f"block{group}"] = x.numpy()
    h = tf.reduce_mean(x, [1, 2])
    hiddens = [h]
    for i in range(self.head_layers):  # model_util.projection_head, 'nonlinear'
      last = i == self.head_layers - 1
      scope = f"head_contrastive/nl_{i}"
      units = self.projection_dim if last else h.shape[-1]
      y = self.batch_norm(self.dense(hiddens[-1], scope, units, use_bias=False), scope=scope,
                          relu=not last, center=not last)
      hiddens.append(y)
    if self.num_classes:  # model_util.supervised_head on hiddens[ft_proj_selector]
      out["logits"] = self.dense(hiddens[self.supervised_head_input],
                                 "head_supervised/linear_layer", self.num_classes,
                                 use_bias=True).numpy()
    out.update(h=h.numpy(), hiddens=[t.numpy() for t in hiddens])
    return out


def training_run_extras(variables, rng):
  """What published files hold besides the model: EMA copies, Momentum slots, the step."""
  extras = {"global_step": np.array(250228, np.int64)}
  for name, value in variables.items():
    extras[f"{name}/Momentum"] = rng.normal(size=value.shape).astype(np.float32)
    if not name.startswith("head_supervised"):
      extras[f"ema_model/{name}"] = rng.normal(size=value.shape).astype(np.float32)
  return extras


def write_tf1_checkpoint(prefix, tensors):
  """Writes `tensors` in the TF1 (V2 bundle) format under exactly these names.

  SaveV2 is the op tf.compat.v1.train.Saver runs; calling it directly skips building a graph of
  hundreds of variables.
  """
  names = list(tensors)
  tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                    tensors=[tf.constant(tensors[name]) for name in names])
  return prefix


def official_checkpoint(tmp_path, net, image_size, *, keep=lambda name: True, extra=None):
  """Builds `net` on random images, writes its checkpoint; returns (prefix, reference outputs)."""
  images = np.random.default_rng(1).uniform(size=(2, image_size, image_size, 3))
  reference = net(images)
  reference["images"] = images.astype(np.float32)
  tensors = {name: value for name, value in net.variables.items() if keep(name)}
  tensors.update(training_run_extras(tensors, np.random.default_rng(2)), **(extra or {}))
  prefix = write_tf1_checkpoint(str(tmp_path / "ckpt" / "model.ckpt-250228"), tensors)
  assert set(tf.train.load_checkpoint(prefix).get_variable_to_shape_map()) == set(tensors)
  return prefix, reference


def flat_leaves(tree):
  return {"/".join(str(k.key) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_every_tensor_placed(prefix, loaded, num_model_tensors):
  """Each model tensor of the checkpoint sits in the export exactly once, bit for bit."""
  reader = tf.train.load_checkpoint(prefix)
  leaves = {**{f"params/{k}": v for k, v in flat_leaves(loaded.params).items()},
            **{f"batch_stats/{k}": v for k, v in flat_leaves(loaded.batch_stats).items()}}
  assert len(leaves) == num_model_tensors
  by_bytes = {value.tobytes(): key for key, value in leaves.items()}
  assert len(by_bytes) == len(leaves)
  placed = {}
  for name in reader.get_variable_to_shape_map():
    training_run = name == "global_step" or name.startswith("ema_model/") or name.endswith(
        "/Momentum")
    if not training_run:
      placed[name] = by_bytes[reader.get_tensor(name).astype(np.float32).tobytes()]
  assert sorted(placed.values()) == sorted(leaves)
  return placed


def our_outputs(loaded, images, *, supervised_head_input="h", **config_overrides):
  config = dict(loaded.model_config.to_dict(), **config_overrides)
  params, batch_stats = dict(loaded.params), dict(loaded.batch_stats)
  num_classes = loaded.metadata["num_classes"]
  params["linear_head"] = params.pop("supervised_head")
  model = models.create_model(config, num_classes=num_classes)
  apply = jax.jit(functools.partial(model.apply, train=False))
  out = apply({"params": params, "batch_stats": batch_stats}, images)
  if supervised_head_input == "hidden1":
    out["probe_logits"] = models.LinearHead(num_classes).apply(
        {"params": params["linear_head"]}, out["hiddens"][1])
  return out


def max_relative_error(ours, reference):
  return float(np.max(np.abs(np.asarray(ours) - reference)) / np.max(np.abs(reference)))


def test_resnet50_imports_exactly(tmp_path):
  net = OfficialTF1Net(depth=50, width=0.125, head_layers=2, num_classes=5)
  prefix, reference = official_checkpoint(tmp_path, net, image_size=64)
  conversion = convert_tf1.convert_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "export"))
  assert conversion.checkpoint_prefix == prefix
  loaded = export.load_encoder(str(tmp_path / "export"))
  assert loaded.model_config.to_dict() == dict(
      depth=50, width_multiplier=0.125, cifar_stem=False, sk_ratio=0.0, tf_same_padding=True,
      head_layers=2, head_hidden_dim=0, projection_dim=16, bn_momentum=0.9, bn_epsilon=1e-5)
  assert loaded.metadata["has_projection_head"] and loaded.metadata["num_classes"] == 5

  placed = check_every_tensor_placed(prefix, loaded, len(net.variables))
  # Creation order: stem, then in each first block the projection shortcut before the main path.
  assert placed["base_model/conv2d/kernel"] == "params/encoder/stem_conv/kernel"
  assert placed["base_model/conv2d_1/kernel"] == "params/encoder/block1_0/shortcut_conv/kernel"
  assert placed["base_model/conv2d_2/kernel"] == "params/encoder/block1_0/conv1/kernel"
  assert placed["base_model/conv2d_5/kernel"] == "params/encoder/block1_1/conv1/kernel"
  assert placed["base_model/conv2d_11/kernel"] == "params/encoder/block2_0/shortcut_conv/kernel"
  assert placed["base_model/conv2d_52/kernel"] == "params/encoder/block4_2/conv3/kernel"
  assert placed["base_model/batch_normalization_1/moving_variance"] == (
      "batch_stats/encoder/block1_0/shortcut_bn/var")
  assert placed["head_contrastive/nl_1/batch_normalization/gamma"] == (
      "params/projection_head/bn_1/scale")
  assert placed["head_supervised/linear_layer/dense/bias"] == "params/supervised_head/dense/bias"

  ours = our_outputs(loaded, reference["images"])
  for key in ("block1", "block2", "block3", "block4", "h"):
    assert max_relative_error(ours[key], reference[key]) < TOLERANCE, key
  assert max_relative_error(ours["z"], reference["hiddens"][-1]) < TOLERANCE
  assert max_relative_error(ours["probe_logits"], reference["logits"]) < TOLERANCE
  # The comparison is sensitive to the max-pool padding: symmetric padding gives other features.
  symmetric = our_outputs(loaded, reference["images"], tf_same_padding=False)
  assert max_relative_error(symmetric["h"], reference["h"]) > 1000 * TOLERANCE


def test_selective_kernel_resnet50_with_odd_feature_maps(tmp_path):
  # 50 px makes every stage odd-sized (25, 13, 13, 7, 4, 2), where TF 'SAME' and the official fixed
  # padding part ways; the ResNet-D stem, SK blocks and a 3-layer v2 head are all exercised.
  net = OfficialTF1Net(depth=50, width=0.125, sk_ratio=0.0625, head_layers=3, num_classes=4,
                       supervised_head_input=1)
  prefix, reference = official_checkpoint(tmp_path, net, image_size=50)
  convert_tf1.convert_checkpoint(prefix, str(tmp_path / "export"), supervised_head_input="hidden1")
  loaded = export.load_encoder(str(tmp_path / "export"))
  config = loaded.model_config
  assert (config.depth, config.sk_ratio, config.head_layers) == (50, 0.0625, 3)
  assert loaded.metadata["supervised_head_input"] == "hidden1"

  placed = check_every_tensor_placed(prefix, loaded, len(net.variables))
  assert placed["base_model/conv2d/kernel"] == "params/encoder/stem_conv1/kernel"
  assert placed["base_model/conv2d_2/kernel"] == "params/encoder/stem_conv/kernel"
  assert placed["base_model/conv2d_3/kernel"] == "params/encoder/block1_0/shortcut_conv/kernel"
  assert placed["base_model/conv2d_6/kernel"] == "params/encoder/block1_0/sk_reduce_conv/kernel"
  assert placed["base_model/conv2d_7/kernel"] == "params/encoder/block1_0/sk_mix_conv/kernel"
  assert placed["base_model/batch_normalization_6/beta"] == (
      "params/encoder/block1_0/sk_reduce_bn/bias")
  assert placed["base_model/batch_normalization_7/beta"] == "params/encoder/block1_0/bn3/bias"

  ours = our_outputs(loaded, reference["images"], supervised_head_input="hidden1")
  for key in ("block1", "block2", "block3", "block4", "h"):
    assert max_relative_error(ours[key], reference[key]) < TOLERANCE, key
  for ours_hidden, reference_hidden in zip(ours["hiddens"], reference["hiddens"]):
    assert max_relative_error(ours_hidden, reference_hidden) < TOLERANCE
  assert max_relative_error(ours["probe_logits"], reference["logits"]) < TOLERANCE


def test_simclr_v1_release_without_projection_head(tmp_path):
  net = OfficialTF1Net(depth=50, width=0.125, head_layers=0, num_classes=3)
  official_checkpoint(tmp_path, net, image_size=32)
  convert_tf1.convert_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "export"))
  loaded = export.load_encoder(str(tmp_path / "export"))
  assert set(loaded.params) == {"encoder", "supervised_head"}
  assert set(loaded.batch_stats) == {"encoder"}
  assert not loaded.metadata["has_projection_head"]
  # The probe recipe's model config fits the export; asking for a projection-head layer fails.
  model = official_checkpoint_probe.official_model_config("simclrv1_r50_1x")
  model.width_multiplier = 0.125
  export.load_encoder_variables(str(tmp_path / "export"), model, projection_layer=0,
                                  image_size=32)
  with pytest.raises(ValueError, match=r"has no \['projection_head'\] parameters"):
    export.load_encoder_variables(str(tmp_path / "export"), model, projection_layer=1,
                                    image_size=32)


def test_official_resnet18_layout_is_refused_with_the_reason(tmp_path):
  net = OfficialTF1Net(depth=18, width=0.25, num_classes=3)
  official_checkpoint(tmp_path, net, image_size=32)
  with pytest.raises(ValueError, match=r"ResNet-18/34.*base_model/conv2d_1"):
    convert_tf1.convert_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "export"))


def test_mismatches_are_listed_and_nothing_is_written(tmp_path):
  net = OfficialTF1Net(depth=50, width=0.125, head_layers=2, num_classes=3)
  dropped = "base_model/batch_normalization_7/moving_variance"
  extra = {"head_contrastive/nl_0/dense/bias": np.zeros(64, np.float32)}
  prefix, _ = official_checkpoint(tmp_path, net, image_size=32, keep=lambda n: n != dropped,
                                  extra=extra)
  out = tmp_path / "export"
  with pytest.raises(ValueError) as error:
    convert_tf1.convert_checkpoint(prefix, str(out))
  message = str(error.value)
  assert f"1 missing from the checkpoint: {dropped} (-> batch_stats/encoder/block1_1/bn3/var)" in (
      message)
  assert "1 in the checkpoint but not in the official layout of this model: " \
         "head_contrastive/nl_0/dense/bias [64]" in message
  assert not out.exists()

  with pytest.raises(ValueError, match=r"wrong shape.*base_model/conv2d/kernel \[7, 7, 3, 8\] -> "
                     r"params/encoder/stem_conv/kernel \[7, 7, 3, 16\]"):
    convert_tf1.plan_conversion(prefix, width_multiplier=0.25)
  with pytest.raises(FileNotFoundError, match="no TF checkpoint"):
    convert_tf1.convert_checkpoint(str(tmp_path / "nowhere"), str(out))


def test_command_line_converts_a_directory(tmp_path):
  net = OfficialTF1Net(depth=50, width=0.125, sk_ratio=0.0625, head_layers=3, num_classes=0)
  official_checkpoint(tmp_path, net, image_size=32)
  # A subprocess, as users run it (the tool defines absl flags at import).
  command = subprocess.run(
      [sys.executable, "-m", "simclr_jax.tools.convert_tf1_checkpoint",
       f"--checkpoint={tmp_path / 'ckpt'}", f"--out={tmp_path / 'export'}"],
      capture_output=True, text=True, cwd=REPO_ROOT, check=False)
  assert command.returncode == 0, command.stderr
  assert "'sk_ratio': 0.0625" in command.stdout
  loaded = export.load_encoder(str(tmp_path / "export"))
  assert set(loaded.params) == {"encoder", "projection_head"}


@pytest.mark.parametrize("name,selective_kernels,head_layers", [
    ("simclrv1_r50_1x", False, 0), ("simclrv2_r50_1x_sk1", True, 3)])
def test_full_size_architectures_are_inferred_as_the_recipe_expects(name, selective_kernels,
                                                                    head_layers):
  # At 1x every SK mixing bottleneck sits at the 32-channel floor: sk_ratio falls back to 0.0625.
  net = OfficialTF1Net(depth=50, width=1.0, sk_ratio=0.0625 if selective_kernels else 0.0,
                       head_layers=head_layers, projection_dim=128, num_classes=1000)
  net(np.zeros((1, 32, 32, 3), np.float32))
  shapes = {tf_name: value.shape for tf_name, value in net.variables.items()}
  assert convert_tf1.infer_model_config(shapes) == official_checkpoint_probe.official_model_config(
      name)
