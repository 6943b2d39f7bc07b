"""The native batch norm (simclr_jax/native/batch_norm.py; its Flax module models.BatchNorm): the
maths against NumPy float64 and against nn.BatchNorm's own autodiff, on one device and on eight,
and what it leaves to nn.BatchNorm. Choosing the backend: test_native_backends."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax import models, native
from simclr_jax.models import batch_norm
from simclr_jax.native import batch_norm as native_batch_norm
from tests.helpers import relative_distance

EPSILON = 1e-5
CASES = [(False, False), (True, False), (True, True), (False, True)]  # (relu, residual)


def random_maps(shape=(8, 5, 6, 24), seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape) * rng.uniform(0.5, 3, shape[-1]) + rng.uniform(-2, 2, shape[-1])
  return {"x": x.astype(np.float32),
          "scale": rng.uniform(0.5, 1.5, shape[-1]).astype(np.float32),
          "bias": rng.standard_normal(shape[-1]).astype(np.float32),
          "residual": rng.standard_normal(shape).astype(np.float32),
          "weights": rng.standard_normal(shape).astype(np.float32)}


def numpy_batch_norm(x, scale, bias, residual, relu):
  """Forward pass in float64 over all axes but the last, the textbook way (two passes)."""
  x = x.astype(np.float64)
  axes = tuple(range(x.ndim - 1))
  mean = x.mean(axes)
  var = ((x - mean) ** 2).mean(axes)
  y = (x - mean) / np.sqrt(var + EPSILON) * scale + bias
  if residual is not None:
    y = y + residual
  return (np.maximum(y, 0) if relu else y), mean, var


def numpy_batch_norm_grads(x, scale, dy):
  """Gradients in float64 given dy, the gradient at the normalised, scaled and shifted map (past
  the ReLU's mask): the textbook batch norm backward pass. The residual's gradient is dy."""
  x = x.astype(np.float64)
  axes = tuple(range(x.ndim - 1))
  count = x.size // x.shape[-1]
  mean, var = x.mean(axes), x.var(axes)
  x_hat = (x - mean) / np.sqrt(var + EPSILON)
  dscale = (dy * x_hat).sum(axes)
  dbias = dy.sum(axes)
  dx = scale / np.sqrt(var + EPSILON) / count * (count * dy - dbias - x_hat * dscale)
  return dx, dscale, dbias, dy


def fused(relu, axis_name=None):
  return lambda x, scale, bias, residual: native.batch_norm_train(
      x, scale, bias, residual, relu, EPSILON, axis_name)


@pytest.mark.parametrize("relu, with_residual", CASES)
def test_forward_equals_numpy_float64(relu, with_residual):
  m = random_maps()
  residual = m["residual"] if with_residual else None
  y, mean, var = jax.jit(fused(relu))(m["x"], m["scale"], m["bias"], residual)
  y_64, mean_64, var_64 = numpy_batch_norm(m["x"], m["scale"], m["bias"], residual, relu)
  np.testing.assert_allclose(y, y_64, rtol=1e-5, atol=2e-5)
  np.testing.assert_allclose(mean, mean_64, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(var, var_64, rtol=1e-5)
  if relu:
    assert np.mean(np.asarray(y) == 0) > 0.2  # the ReLU had something to do


@pytest.mark.parametrize("relu, with_residual", CASES)
def test_gradients_equal_numpy_float64(relu, with_residual):
  m = random_maps()
  residual = m["residual"] if with_residual else None
  loss = lambda *args: jnp.sum(fused(relu)(*args)[0] * m["weights"])
  grads = jax.jit(jax.grad(loss, (0, 1, 2, 3)))(m["x"], m["scale"], m["bias"], residual)
  y_64, _, _ = numpy_batch_norm(m["x"], m["scale"], m["bias"], residual, relu)
  dy = m["weights"].astype(np.float64) * ((y_64 > 0) if relu else 1.0)
  expected = numpy_batch_norm_grads(m["x"], m["scale"], dy)
  for name, got, want in zip(("dx", "dscale", "dbias", "dresidual"), grads, expected):
    if name == "dresidual" and not with_residual:
      assert got is None
      continue
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5, err_msg=name)


def test_gradients_through_the_returned_statistics_equal_autodiff():
  """mean and var are outputs too (for the running averages); their cotangents reach x."""
  m = random_maps()

  def reference(x):
    mean = x.mean((0, 1, 2))
    var = (x * x).mean((0, 1, 2)) - mean * mean
    y = nn.relu((x - mean) * jax.lax.rsqrt(var + EPSILON) * m["scale"] + m["bias"])
    return y, mean, var

  def loss(function):
    def value(x):
      y, mean, var = function(x)
      return jnp.sum(y * m["weights"]) + jnp.sum(jnp.sin(mean)) + jnp.sum(var**2)
    return value

  got = jax.jit(jax.grad(loss(lambda x: fused(True)(x, m["scale"], m["bias"], None))))(m["x"])
  want = jax.jit(jax.grad(loss(reference)))(m["x"])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def module_outputs(native_kernels: bool, relu: bool, with_residual: bool, m, axis_name=None):
  """Output, updated batch_stats and gradients of a BatchNorm module's training step."""
  module = batch_norm.BatchNorm(use_running_average=False, momentum=0.9, epsilon=EPSILON,
                                native=native_kernels, axis_name=axis_name)
  residual = m["residual"] if with_residual else None
  variables = module.init(jax.random.key(0), m["x"], residual=residual, relu=relu)

  def loss(params, x, residual):
    y, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                              residual=residual, relu=relu, mutable=["batch_stats"])
    return jnp.sum(y * m["weights"]), (y, updates["batch_stats"])

  grads, (y, stats) = jax.grad(loss, (0, 1, 2), has_aux=True)(
      variables["params"], m["x"], residual)
  return variables, y, stats, grads


@pytest.mark.parametrize("relu, with_residual", CASES)
def test_module_is_nn_batch_norm_with_relu_and_residual(relu, with_residual):
  """Same variables, outputs, running averages and gradients as nn.BatchNorm (+ residual, ReLU)."""
  m = random_maps()
  variables, y, stats, grads = jax.jit(
      lambda m: module_outputs(True, relu, with_residual, m))(m)
  variables_ref, y_ref, stats_ref, grads_ref = jax.jit(
      lambda m: module_outputs(False, relu, with_residual, m))(m)
  assert jax.tree.structure(variables) == jax.tree.structure(variables_ref)
  jax.tree.map(np.testing.assert_array_equal, variables, variables_ref)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats,
               stats_ref)
  assert not np.allclose(stats["mean"], variables["batch_stats"]["mean"])  # the averages moved
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads,
               grads_ref)


def test_eight_devices_in_shard_map_equal_one():
  """Global batch norm: statistics and their gradients summed over the devices' shards."""
  m = random_maps((16, 4, 4, 24))
  mesh = jax.make_mesh((8,), ("data",))
  specs = {"x": jax.P("data"), "residual": jax.P("data"), "weights": jax.P("data"),
           "scale": jax.P(), "bias": jax.P()}
  sharded = jax.jit(jax.shard_map(
      lambda m: module_outputs(True, True, True, m, axis_name="data")[1:], mesh=mesh,
      in_specs=(specs,),
      out_specs=(jax.P("data"), jax.P(), (jax.P(), jax.P("data"), jax.P("data")))))
  y, stats, grads = sharded(
      {k: jax.device_put(v, jax.NamedSharding(mesh, specs[k])) for k, v in m.items()})
  _, y_1, stats_1, grads_1 = jax.jit(lambda m: module_outputs(False, True, True, m))(m)
  np.testing.assert_allclose(y, y_1, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats,
               stats_1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads,
               grads_1)


def test_resnet_with_native_batch_norm_is_the_same_network():
  """The encoder's variables, features and gradients do not depend on the norm backend."""
  images = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3))
  outputs = {}
  for backend in ("jax", "native"):
    model = models.ResNet(18, width_multiplier=0.125, cifar_stem=True, norm_backend=backend)
    variables = model.init(jax.random.key(0), images, train=False)

    def loss(params, model=model, variables=variables):
      out, _ = model.apply(dict(variables, params=params), images, train=True,
                           mutable=["batch_stats"])
      return jnp.sum(out["block4"] ** 2) + jnp.sum(out["h"])

    outputs[backend] = (variables, jax.jit(jax.value_and_grad(loss))(variables["params"]))
  (variables, (value, grads)), (variables_native, (value_native, grads_native)) = (
      outputs["jax"], outputs["native"])
  jax.tree.map(np.testing.assert_array_equal, variables, variables_native)
  np.testing.assert_allclose(value_native, value, rtol=1e-5)
  distance = relative_distance(grads_native, grads)
  assert distance < 1e-4, f"gradients differ by {distance:.2e} (relative L2)"


def test_what_the_kernels_do_not_run_is_nn_batch_norm():
  """bfloat16 maps and running averages take nn.BatchNorm's code: no custom call at all."""
  m = random_maps()
  for x, running in ((m["x"].astype(jnp.bfloat16), False), (m["x"], True)):
    module = batch_norm.BatchNorm(use_running_average=running, native=True,
                                  dtype=x.dtype if x.dtype != np.float32 else None)
    variables = module.init(jax.random.key(0), x)
    hlo = jax.jit(lambda v, x: module.apply(v, x, relu=True, mutable=["batch_stats"])).lower(
        variables, x).as_text()
    assert "simclr_bn" not in hlo


def test_bad_backends_and_calls_are_refused_with_a_clear_message():
  with pytest.raises(ValueError, match="'jax' or 'native' \\(resolve 'auto' first\\)"):
    models.ResNet(18, norm_backend="auto")
  x = jnp.ones((4, 3, 3, 8))
  with pytest.raises(Exception, match="scale must have one value per channel"):
    jax.block_until_ready(native_batch_norm._call(
        native_batch_norm.APPLY, jax.ShapeDtypeStruct(x.shape, jnp.float32), x=x,
        scale=jnp.ones(7), shift=jnp.ones(8), relu=True))
  with pytest.raises(Exception, match="sums must be \\[2, C\\]"):
    jax.block_until_ready(native_batch_norm._call(
        native_batch_norm.MOMENTS, jax.ShapeDtypeStruct((3, 8), jnp.float32), x=x))
