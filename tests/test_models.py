"""ResNet encoders and heads: sizes, official init, BN semantics, padding and freezing.

Parameter counts and shapes come from jax.eval_shape (no compute); everything that runs uses tiny
widths and images, and most variables are random (non-zero gammas, non-trivial statistics) so that
every layer matters in the comparisons.
"""
import functools

import flax.linen
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from simclr_jax import models

SMALL = dict(width_multiplier=0.0625, cifar_stem=True)  # ResNet channels 4..32 (x4 in bottlenecks)


def num_params(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def variable_shapes(module, image_size=32, batch=1, **call_kwargs):
  images = jnp.zeros((batch, image_size, image_size, 3))
  return jax.eval_shape(lambda: module.init(jax.random.key(0), images, train=False, **call_kwargs))


def random_variables(module, image_size=32, seed=0):
  """Variables with the model's structure: random kernels, gammas, betas and BN statistics."""
  return random_like(variable_shapes(module, image_size), seed)


def random_like(shapes, seed=0):
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "kernel":
      value = rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape)
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, shape)
    else:  # bias, mean
      value = rng.normal(0, 0.2, shape)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def images(batch, size, seed=1):
  return jnp.asarray(np.random.default_rng(seed).uniform(size=(batch, size, size, 3)), jnp.float32)


def flat(tree):
  return {"/".join(k.key for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


# --- sizes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth, width, cifar_stem, sk_ratio, expected, paper_millions", [
    (18, 1, False, 0.0, 11_176_512, None),
    (18, 1, True, 0.0, 11_168_832, None),
    (50, 1, False, 0.0, 23_508_032, 24),
    (50, 2, False, 0.0, 93_907_072, 94),  # SimCLR Table 6: R50 (2x) 94M
    (50, 4, False, 0.0, 375_378_176, 375),  # SimCLR Table 6: R50 (4x) 375M
    (50, 1, False, 0.0625, 35_215_584, 35),  # SimCLRv2 Table 1: R50 1x + SK 35M
    (152, 3, False, 0.0625, 794_704_160, 795),  # SimCLRv2: R152 3x + SK 795M
])
def test_backbone_parameter_counts(depth, width, cifar_stem, sk_ratio, expected, paper_millions):
  encoder = models.ResNet(depth, width, cifar_stem=cifar_stem, sk_ratio=sk_ratio)
  count = num_params(variable_shapes(encoder)["params"])
  assert count == expected
  if paper_millions:
    assert round(count / 1e6) == paper_millions


@pytest.mark.parametrize("depth", models.DEPTHS)
def test_feature_shapes_for_every_depth(depth):
  encoder = models.ResNet(depth, 0.125)
  features, _ = jax.eval_shape(lambda: encoder.init_with_output(
      jax.random.key(0), jnp.zeros((2, 64, 64, 3)), train=False))
  expansion = 1 if depth in (18, 34) else 4
  assert features["stem"].shape == (2, 16, 16, 8)
  for group, (size, channels) in enumerate([(16, 8), (8, 16), (4, 32), (2, 64)], start=1):
    assert features[f"block{group}"].shape == (2, size, size, expansion * channels)
  assert features["h"].shape == (2, 64 * expansion) and features["h"].dtype == jnp.float32
  config = models.ModelConfig(depth=depth, width_multiplier=0.125)
  assert config.representation_dim() == 64 * expansion


def test_cifar_stem_keeps_the_resolution_and_widths_round():
  encoder = models.ResNet(18, 0.3, cifar_stem=True)
  features, _ = jax.eval_shape(lambda: encoder.init_with_output(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  assert features["stem"].shape == (1, 32, 32, 19)  # round(64 * 0.3)
  assert features["block4"].shape == (1, 4, 4, 154)  # round(512 * 0.3)


def test_parameter_names():
  """The layout encoder exports and the TF1 converter are written against."""
  sk = flat(variable_shapes(models.ResNet(50, 0.125, sk_ratio=0.0625))["params"])
  assert {k.rsplit("/", 2)[0] for k in sk if k.startswith("stem")} == {
      "stem_conv1", "stem_bn1", "stem_conv2", "stem_bn2", "stem_conv", "stem_bn"}
  assert {k.split("/")[1] for k in sk if k.startswith("block1_0/")} == {
      "shortcut_conv", "shortcut_bn", "conv1", "bn1", "conv2", "bn2", "sk_reduce_conv",
      "sk_reduce_bn", "sk_mix_conv", "conv3", "bn3"}
  assert sk["block1_0/conv2/kernel"].shape == (3, 3, 8, 16)  # both SK streams in one conv
  plain = flat(variable_shapes(models.ResNet(18, 0.125))["params"])
  assert {k.split("/")[1] for k in plain if k.startswith("block2_0/")} == {
      "conv1", "bn1", "conv2", "bn2", "shortcut_conv", "shortcut_bn"}
  assert not any(k.startswith("block1_0/shortcut") for k in plain)  # same shape: identity
  assert sum(k.startswith("block3_") and k.endswith("conv1/kernel") for k in plain) == 2


# --- official init ----------------------------------------------------------------------------

def check_official_init(variables, last_bn_names):
  params = flat(variables["params"])
  assert all(leaf.dtype == jnp.float32 for leaf in params.values())
  assert not any(k.endswith("/bias") and "conv" in k for k in params)  # no conv biases
  for name, leaf in params.items():
    if name.endswith("/scale"):
      zero = name.rsplit("/", 2)[-2] in last_bn_names  # last BN of each residual block
      np.testing.assert_array_equal(leaf, 0 if zero else 1, err_msg=name)
    elif name.endswith("/bias"):
      np.testing.assert_array_equal(leaf, 0, err_msg=name)
  for name, leaf in flat(variables["batch_stats"]).items():
    np.testing.assert_array_equal(leaf, 0 if name.endswith("mean") else 1, err_msg=name)
  # Convs: truncated normal with std sqrt(1/fan_in) (TF variance_scaling_initializer()).
  conv_kernels = [(k, v) for k, v in params.items() if "conv" in k and v.size >= 2048]
  assert conv_kernels
  for name, kernel in conv_kernels:
    std = 1 / np.sqrt(np.prod(kernel.shape[:-1]))
    assert abs(np.std(kernel) / std - 1) < 0.1, name
    assert np.max(np.abs(kernel)) <= 2 * std / 0.87962566 + 1e-6, name  # truncated at 2 sigma
  return params


# The 'rbg' PRNG compiles several times faster than threefry here; the initialisers are the same.
INIT_KEY = jax.random.key(0, impl="rbg")


def test_official_initialisation_of_the_model():
  model = models.create_model({"depth": 18, "width_multiplier": 0.125, "cifar_stem": True},
                              num_classes=10)
  variables = jax.jit(functools.partial(model.init, train=False))(INIT_KEY, jnp.zeros((1, 8, 8, 3)))
  params = check_official_init(variables, last_bn_names={"bn2"})
  assert len([k for k in params if k.endswith("bn2/scale")]) == 8
  assert "bias" not in variables["params"]["projection_head"]["bn_1"]  # no beta on z
  # Dense layers: N(0, 0.01); the probe's bias starts at zero.
  dense = np.concatenate([np.ravel(params["projection_head/dense_0/kernel"]),
                          np.ravel(params["projection_head/dense_1/kernel"])])
  assert abs(np.std(dense) - 0.01) < 0.001 and abs(np.mean(dense)) < 0.001
  np.testing.assert_array_equal(params["linear_head/dense/bias"], 0)


def test_official_initialisation_of_a_selective_kernel_bottleneck():
  conv = functools.partial(flax.linen.Conv, use_bias=False,
                           kernel_init=models.resnet.conv_kernel_init)
  norm = functools.partial(models.BatchNorm, use_running_average=True)
  block = models.BottleneckBlock(32, 2, conv, norm, sk_ratio=0.0625)
  variables = jax.jit(block.init)(INIT_KEY, jnp.zeros((1, 8, 8, 64)))
  params = check_official_init(variables, last_bn_names={"bn3"})
  assert params["sk_reduce_conv/kernel"].shape == (1, 1, 32, 32)  # max(32 * 0.0625, 32)
  assert params["sk_mix_conv/kernel"].shape == (1, 1, 32, 64)


# --- batch norm: train vs eval, global statistics -----------------------------------------------

def test_train_mode_uses_batch_statistics_and_updates_running_ones():
  encoder = models.ResNet(18, **SMALL)
  variables = random_variables(encoder, image_size=8)
  x = images(6, 8)
  train = jax.jit(lambda v, x: encoder.apply(v, x, train=True, mutable=["batch_stats"]))
  evaluate = jax.jit(lambda v, x: encoder.apply(v, x, train=False))

  out, updates = train(variables, x)
  # Running statistics move 10% towards the batch statistics of the stem conv's output.
  stem = jax.lax.conv_general_dilated(x, variables["params"]["stem_conv"]["kernel"], (1, 1),
                                      "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  old, new = variables["batch_stats"]["stem_bn"], updates["batch_stats"]["stem_bn"]
  np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * stem.mean((0, 1, 2)),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * stem.var((0, 1, 2)), rtol=1e-4)
  # In training an example's output depends on the rest of the batch; in eval it does not.
  other_rest = x.at[3:].set(images(3, 8, seed=2))
  assert not np.allclose(out["h"][:3], train(variables, other_rest)[0]["h"][:3], atol=1e-3)
  np.testing.assert_allclose(evaluate(variables, x)["h"][:3],
                             evaluate(variables, other_rest)["h"][:3], rtol=1e-5, atol=1e-6)


def test_global_batch_norm_on_8_devices_equals_one_device():
  config = dict(depth=18, head_layers=3, projection_dim=8, **SMALL)
  single = models.create_model(config, num_classes=5)
  sharded = models.create_model(config, num_classes=5, axis_name="data")
  variables = random_variables(single, image_size=8)
  x = images(16, 8)

  def step(model, variables, x):
    out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return out["h"], out["z"], updates["batch_stats"]

  expected = jax.jit(functools.partial(step, single))(variables, x)
  mesh = jax.make_mesh((8,), ("data",))
  replicated, by_example = jax.NamedSharding(mesh, jax.P()), jax.NamedSharding(mesh, jax.P("data"))
  run = jax.jit(jax.shard_map(functools.partial(step, sharded), mesh=mesh,
                              in_specs=(jax.P(), jax.P("data")),
                              out_specs=(jax.P("data"), jax.P("data"), jax.P())))
  actual = run(jax.device_put(variables, replicated), jax.device_put(x, by_example))
  for got, want in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


# --- freezing ----------------------------------------------------------------------------------

def test_stop_gradient_after_block_freezes_everything_below_the_cut():
  encoder = models.ResNet(18, **SMALL)
  variables = random_variables(encoder, image_size=8)

  def loss(params, cut):
    out, updates = encoder.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                 images(4, 8), train=True, stop_gradient_after_block=cut,
                                 mutable=["batch_stats"])
    return jnp.sum(out["h"] ** 2), updates["batch_stats"]

  grad_fn = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
  grads, stats = grad_fn(variables["params"], 2)
  frozen = ("stem", "block1_", "block2_")
  for name, grad in flat(grads).items():
    if name.startswith(frozen):
      np.testing.assert_array_equal(grad, 0, err_msg=name)
    assert np.all(np.isfinite(grad))
  assert all(np.any(grad != 0) for name, grad in flat(grads).items()
             if name.startswith(("block3_", "block4_")))
  old_stats = flat(variables["batch_stats"])
  for name, value in flat(stats).items():
    if name.startswith(frozen):
      np.testing.assert_array_equal(value, old_stats[name], err_msg=name)  # BN in inference mode
    else:
      assert not np.allclose(value, old_stats[name]), name


def test_the_online_probe_does_not_train_the_encoder_or_the_head():
  model = models.create_model(dict(depth=18, projection_dim=8, **SMALL), num_classes=3)
  variables = random_variables(model, image_size=8)

  def probe_loss(params):
    out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                         images(4, 8), train=True, mutable=["batch_stats"])
    return jnp.sum(out["probe_logits"] ** 2)

  grads = jax.jit(jax.grad(probe_loss))(variables["params"])
  assert all(np.all(g == 0) for g in jax.tree.leaves(grads["encoder"]))
  assert all(np.all(g == 0) for g in jax.tree.leaves(grads["projection_head"]))
  assert np.all(grads["linear_head"]["dense"]["kernel"] != 0)


# --- heads -------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_layers", [2, 3])
def test_projection_head_matches_its_definition(num_layers):
  head = models.ProjectionHead(num_layers, hidden_dim=0, out_dim=4)
  h = jnp.asarray(np.random.default_rng(0).normal(size=(5, 6)), jnp.float32)
  variables = random_like(jax.eval_shape(lambda: head.init(jax.random.key(0), h, train=False)))
  z, hiddens = jax.jit(functools.partial(head.apply, train=False))(variables, h)

  x, expected = np.asarray(h), [np.asarray(h)]
  for i in range(num_layers):
    params, stats = variables["params"], variables["batch_stats"]
    x = x @ params[f"dense_{i}"]["kernel"]
    x = (x - stats[f"bn_{i}"]["mean"]) / np.sqrt(stats[f"bn_{i}"]["var"] + 1e-5)
    x = x * params[f"bn_{i}"]["scale"]
    if i < num_layers - 1:
      x = np.maximum(x + params[f"bn_{i}"]["bias"], 0)
      assert params[f"dense_{i}"]["kernel"].shape[1] == 6  # hidden_dim 0 = width of h
    else:
      assert set(params[f"bn_{i}"]) == {"scale"}
    expected.append(x)
  assert len(hiddens) == num_layers + 1 and z.shape == (5, 4)
  for got, want in zip(hiddens, expected):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(z, hiddens[-1])


def test_simclr_model_outputs_and_variable_groups():
  config = ml_collections.ConfigDict(dict(depth=18, head_layers=3, head_hidden_dim=12,
                                          projection_dim=8, **SMALL))
  model = models.create_model(config, num_classes=7)
  out, variables = jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), jnp.zeros((2, 16, 16, 3)), train=False))
  assert set(variables["params"]) == {"encoder", "projection_head", "linear_head"}
  assert set(variables["batch_stats"]) == {"encoder", "projection_head"}
  assert set(variables["params"]["linear_head"]) == {"dense"}
  assert set(out) == {"stem", "block1", "block2", "block3", "block4", "h", "z", "probe_logits",
                      "hiddens"}
  assert out["h"].shape == (2, 32) and out["z"].shape == (2, 8)
  assert [t.shape for t in out["hiddens"]] == [(2, 32), (2, 12), (2, 12), (2, 8)]
  assert out["probe_logits"].shape == (2, 7)


# --- padding: the official TF graph ------------------------------------------------------------

def tf_reference_forward(params, stats, x, *, depth, sk):
  """The official resnet.py graph (inference mode) in plain tf.nn ops on our variables."""
  def conv(x, layer, strides):  # conv2d_fixed_padding
    kernel = np.asarray(layer["kernel"])
    if strides > 1:
      pad_beg = (kernel.shape[0] - 1) // 2
      pad_end = kernel.shape[0] - 1 - pad_beg
      x = tf.pad(x, [[0, 0], [pad_beg, pad_end], [pad_beg, pad_end], [0, 0]])
    return tf.nn.conv2d(x, kernel, strides, "SAME" if strides == 1 else "VALID")

  def bn(x, scope, name, relu=True):
    p, s = scope[0][name], scope[1][name]
    x = tf.nn.batch_normalization(x, np.asarray(s["mean"]), np.asarray(s["var"]),
                                  np.asarray(p["bias"]), np.asarray(p["scale"]), 1e-5)
    return tf.nn.relu(x) if relu else x

  def shortcut(x, block, strides):
    if "shortcut_conv" not in block[0]:
      return x
    if sk:  # ResNet-D
      if strides > 1:
        x = tf.nn.avg_pool2d(tf.pad(x, [[0, 0], [0, 1], [0, 1], [0, 0]]), 2, strides, "VALID")
      else:
        x = tf.nn.avg_pool2d(x, 2, 1, "SAME")
      strides = 1
    return bn(conv(x, block[0]["shortcut_conv"], strides), block, "shortcut_bn", relu=False)

  def bottleneck(x, block, strides):
    residual = shortcut(x, block, strides)
    x = bn(conv(x, block[0]["conv1"], 1), block, "bn1")
    x = bn(conv(x, block[0]["conv2"], strides), block, "bn2")
    if sk:  # sk_conv2d
      streams = tf.stack(tf.split(x, 2, axis=3))
      summary = tf.reduce_mean(tf.reduce_sum(streams, 0), [1, 2], keepdims=True)
      summary = bn(conv(summary, block[0]["sk_reduce_conv"], 1), block, "sk_reduce_bn")
      mixing = tf.stack(tf.split(conv(summary, block[0]["sk_mix_conv"], 1), 2, axis=3))
      x = tf.reduce_sum(streams * tf.nn.softmax(mixing, axis=0), 0)
    x = bn(conv(x, block[0]["conv3"], 1), block, "bn3", relu=False)
    return tf.nn.relu(x + residual)

  def basic(x, block, strides):
    residual = shortcut(x, block, strides)
    x = bn(conv(x, block[0]["conv1"], strides), block, "bn1")
    x = bn(conv(x, block[0]["conv2"], 1), block, "bn2", relu=False)
    return tf.nn.relu(x + residual)

  top = (params, stats)
  x = tf.constant(np.asarray(x))
  if sk:
    x = bn(conv(x, params["stem_conv1"], 2), top, "stem_bn1")
    x = bn(conv(x, params["stem_conv2"], 1), top, "stem_bn2")
    x = conv(x, params["stem_conv"], 1)
  else:
    x = conv(x, params["stem_conv"], 2)
  x = tf.nn.max_pool2d(bn(x, top, "stem_bn"), 3, 2, "SAME")
  kind, groups = models.resnet.BLOCK_GROUPS[depth]
  for group, num_blocks in enumerate(groups, start=1):
    for index in range(num_blocks):
      name = f"block{group}_{index}"
      block_fn = bottleneck if kind == "bottleneck" else basic
      x = block_fn(x, (params[name], stats[name]), 2 if group > 1 and index == 0 else 1)
  return tf.reduce_mean(x, [1, 2]).numpy()


@pytest.mark.parametrize("depth, sk_ratio", [(50, 0.0625), (18, 0.0)])
def test_tf_same_padding_reproduces_the_official_tf_graph(depth, sk_ratio):
  # 40 px gives feature maps 20 -> 10 -> 10, 5, 3, 2: odd sizes exercise every padding rule.
  encoder = models.ResNet(depth, 0.0625, sk_ratio=sk_ratio, tf_same_padding=True)
  variables = random_variables(encoder, image_size=40)
  x = images(2, 40)
  ours = jax.jit(functools.partial(encoder.apply, train=False))(variables, x)
  reference = tf_reference_forward(variables["params"], variables["batch_stats"], x, depth=depth,
                                   sk=sk_ratio > 0)
  assert ours["block3"].shape[1:3] == (3, 3)
  np.testing.assert_allclose(ours["h"], reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())

  # The default pads the max-pool symmetrically: same shapes, different values.
  symmetric = encoder.clone(tf_same_padding=False)
  stem = jax.jit(lambda v, x: symmetric.apply(v, x, train=False)["stem"])(variables, x)
  assert stem.shape == ours["stem"].shape
  assert not np.allclose(stem, ours["stem"], atol=1e-3)


def test_tf_same_max_pool_equals_lax_same_padding():
  encoder = models.ResNet(18, 0.0625, tf_same_padding=True)
  variables = random_variables(encoder, image_size=16)
  x = images(2, 16)
  stem = jax.jit(lambda v, x: encoder.apply(v, x, train=False)["stem"])(variables, x)
  params, stats = variables["params"], variables["batch_stats"]["stem_bn"]
  y = jax.lax.conv_general_dilated(x, params["stem_conv"]["kernel"], (2, 2), ((3, 3), (3, 3)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y = (y - stats["mean"]) / jnp.sqrt(stats["var"] + 1e-5)
  y = jax.nn.relu(y * params["stem_bn"]["scale"] + params["stem_bn"]["bias"])
  pooled = jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")
  np.testing.assert_allclose(stem, pooled, rtol=1e-5, atol=1e-5)


# --- dtype -------------------------------------------------------------------------------------

def test_bfloat16_compute_with_float32_parameters():
  config = dict(depth=18, projection_dim=8, **SMALL)
  model32 = models.create_model(config, num_classes=3)
  model16 = models.create_model(config, num_classes=3, dtype=jnp.bfloat16)
  variables = random_variables(model32, image_size=8)
  shapes = variable_shapes(model16, image_size=8)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
  x = images(4, 8)
  out16 = jax.jit(functools.partial(model16.apply, train=False))(variables, x)
  out32 = jax.jit(functools.partial(model32.apply, train=False))(variables, x)
  assert out16["block4"].dtype == jnp.bfloat16
  for key in ("h", "z", "probe_logits"):
    assert out16[key].dtype == jnp.float32, key
    scale = np.abs(out32[key]).max()
    np.testing.assert_allclose(out16[key], out32[key], atol=0.05 * scale, err_msg=key)


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("build, message", [
    (lambda: models.ResNet(19), r"depth must be one of \(18, 34, 50, 101, 152, 200\), got 19"),
    (lambda: models.ResNet(50.0), r"depth must be one of .*got 50\.0"),
    (lambda: models.ResNet(18, 0), r"width_multiplier must be a finite number > 0, got 0"),
    (lambda: models.ResNet(18, -0.5), r"width_multiplier .* got -0\.5"),
    (lambda: models.ResNet(18, float("nan")), r"width_multiplier .* got nan"),
    (lambda: models.ResNet(18, sk_ratio=-1), r"sk_ratio must be .*>= 0.*got -1"),
    (lambda: models.ResNet(18, bn_momentum=1.0), r"bn_momentum must be in \[0, 1\), got 1\.0"),
    (lambda: models.ProjectionHead(0), r"\(head_layers\) must be an integer >= 1.*got 0"),
    (lambda: models.ProjectionHead(2.5), r"head_layers.*got 2\.5"),
    (lambda: models.ProjectionHead(2, hidden_dim=-1), r"head_hidden_dim.*>= 0.*got -1"),
    (lambda: models.ProjectionHead(2, out_dim=0), r"projection_dim.*>= 1, got 0"),
    (lambda: models.LinearHead(0), r"num_classes must be an integer >= 1, got 0"),
    (lambda: models.create_model({"depth": 18, "width_multiplier": 1, "widht": 2}, num_classes=2),
     r"unknown model config fields \['widht'\]; allowed: \["),
    (lambda: models.create_model({"width_multiplier": 1}, num_classes=2),
     r"model config lacks \['depth'\]"),
    (lambda: models.create_model({"depth": 18, "width_multiplier": 1, "cifar_stem": "yes"},
                                 num_classes=2), r"cifar_stem must be True or False, got 'yes'"),
    (lambda: models.ModelConfig(depth=51, width_multiplier=1), r"got 51"),
])
def test_bad_configuration_is_refused_with_what_is_allowed(build, message):
  with pytest.raises(ValueError, match=message):
    build()


def test_bad_call_arguments_are_refused():
  encoder = models.ResNet(18, **SMALL)
  with pytest.raises(ValueError, match=r"stop_gradient_after_block must be -1 .* or 0\.\.4.*got 5"):
    variable_shapes(encoder, image_size=8, stop_gradient_after_block=5)
  with pytest.raises(ValueError, match=r"NHWC images of rank 4, got shape \(8, 8, 3\)"):
    encoder.init(jax.random.key(0), jnp.zeros((8, 8, 3)), train=False)
