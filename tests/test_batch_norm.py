"""The native batch norm (simclr_jax/native/batch_norm.py; its Flax module models.BatchNorm): the
maths against NumPy float64 and against nn.BatchNorm's own autodiff, on float32 and bfloat16 maps,
on one device and on eight, and what it leaves to nn.BatchNorm. Choosing the backend:
test_native_backends."""
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
HALF_BFLOAT16_ULP = 2.0**-8  # of the value, at most: one rounding to nearest (8 significant bits)
MAPS = ("x", "residual", "weights")


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


def in_bfloat16(m):
  """The maps of `m` in bfloat16 (parameters stay float32), and those same values in float32."""
  rounded = {k: (v.astype(jnp.bfloat16) if k in MAPS else v) for k, v in m.items()}
  return rounded, {k: np.asarray(v, np.float32) for k, v in rounded.items()}


def assert_rounded_once(got, exact, name, atol_of_max=1e-5):
  """got (bfloat16) is exact rounded once, up to float32 arithmetic (atol_of_max of the largest
  value: the cancellation in batch norm's subtraction of the mean)."""
  assert got.dtype == jnp.bfloat16, name
  exact = np.asarray(exact, np.float64)
  error = np.abs(np.asarray(got, np.float64) - exact)
  bound = HALF_BFLOAT16_ULP * np.abs(exact) + atol_of_max * np.abs(exact).max()
  assert np.all(error <= bound), f"{name}: {np.sum(error > bound)} values beyond one rounding"


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


@pytest.mark.parametrize("relu, with_residual", CASES)
def test_bfloat16_maps_are_the_float64_batch_norm_of_their_values_rounded_once(relu,
                                                                             with_residual):
  """bfloat16 x, residual and output gradient (a model whose maps stay bfloat16): y, dx and the
  residual's gradient are bfloat16, each the float64 result for those values rounded once; the
  statistics and the parameters' gradients are float32, as from float32 maps of those values."""
  m, m_values = in_bfloat16(random_maps())
  residual = m["residual"] if with_residual else None
  y, mean, var = jax.jit(fused(relu))(m["x"], m["scale"], m["bias"], residual)
  y_64, mean_64, var_64 = numpy_batch_norm(m_values["x"], m["scale"], m["bias"],
                                           m_values["residual"] if with_residual else None, relu)
  assert_rounded_once(y, y_64, "y")
  assert mean.dtype == var.dtype == jnp.float32
  np.testing.assert_allclose(mean, mean_64, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(var, var_64, rtol=1e-5)

  loss = lambda *args: jnp.sum(fused(relu)(*args)[0].astype(jnp.float32) * m_values["weights"])
  grads = jax.jit(jax.grad(loss, (0, 1, 2, 3)))(m["x"], m["scale"], m["bias"], residual)
  dy = m_values["weights"].astype(np.float64) * ((y_64 > 0) if relu else 1.0)
  expected = numpy_batch_norm_grads(m_values["x"], m["scale"], dy)
  assert_rounded_once(grads[0], expected[0], "dx", atol_of_max=1e-4)
  for name, got, want in zip(("dscale", "dbias"), grads[1:3], expected[1:3]):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5, err_msg=name)
  if with_residual:
    assert_rounded_once(grads[3], expected[3], "dresidual")


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
  """Output, updated batch_stats and gradients of a BatchNorm module's training step, in the
  dtype of the maps `m`."""
  module = batch_norm.BatchNorm(use_running_average=False, momentum=0.9, epsilon=EPSILON,
                                native=native_kernels, axis_name=axis_name, dtype=m["x"].dtype)
  residual = m["residual"] if with_residual else None
  variables = module.init(jax.random.key(0), m["x"], residual=residual, relu=relu)

  def loss(params, x, residual):
    y, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                              residual=residual, relu=relu, mutable=["batch_stats"])
    return jnp.sum((y * m["weights"]).astype(jnp.float32)), (y, updates["batch_stats"])

  grads, (y, stats) = jax.grad(loss, (0, 1, 2), has_aux=True)(
      variables["params"], m["x"], residual)
  return variables, y, stats, grads


def reference_maps(m):
  """What the kernels' step on maps `m` is compared with: nn.BatchNorm on `m` for float32 maps;
  for bfloat16 maps, nn.BatchNorm in float32 on their values (the exact step the kernels round
  once: nn.BatchNorm in bfloat16 rounds between its normalisation and the residual sum and sums
  the parameters' gradients in bfloat16, and is further from it than the kernels are)."""
  return m if m["x"].dtype == jnp.float32 else in_bfloat16(m)[1]


def assert_same_step(outputs, reference, dtype):
  """Module outputs (y, batch_stats, grads) agree with the reference's: to float32 rounding;
  bfloat16 maps to one rounding of theirs, float32 statistics and parameter gradients to float32
  rounding."""
  (y, stats, (dparams, *dmaps)), (y_ref, stats_ref, (dparams_ref, *dmaps_ref)) = (
      outputs, reference)
  dmaps, dmaps_ref = ([d for d in maps if d is not None] for maps in (dmaps, dmaps_ref))
  assert y.dtype == dtype and all(d.dtype == dtype for d in dmaps)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats,
               stats_ref)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), dparams,
               dparams_ref)
  if dtype == jnp.float32:
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), dmaps,
                 dmaps_ref)
  else:
    for got, want in zip((y, *dmaps), (y_ref, *dmaps_ref)):
      assert relative_distance(got, want) < HALF_BFLOAT16_ULP


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("relu, with_residual", CASES)
def test_module_is_nn_batch_norm_with_relu_and_residual(relu, with_residual, dtype):
  """Same variables, outputs, running averages and gradients as nn.BatchNorm (+ residual, ReLU)."""
  m = random_maps()
  m = m if dtype == jnp.float32 else in_bfloat16(m)[0]
  variables, *outputs = jax.jit(lambda m: module_outputs(True, relu, with_residual, m))(m)
  variables_ref, *reference = jax.jit(lambda m: module_outputs(False, relu, with_residual, m))(
      reference_maps(m))
  assert jax.tree.structure(variables) == jax.tree.structure(variables_ref)
  jax.tree.map(np.testing.assert_array_equal, variables, variables_ref)
  assert_same_step(outputs, reference, dtype)
  assert not np.allclose(outputs[1]["mean"], variables["batch_stats"]["mean"])  # they moved


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_eight_devices_in_shard_map_equal_one(dtype):
  """Global batch norm: statistics and their gradients summed over the devices' shards."""
  m = random_maps((16, 4, 4, 24))
  m = m if dtype == jnp.float32 else in_bfloat16(m)[0]
  mesh = jax.make_mesh((8,), ("data",))
  specs = {"x": jax.P("data"), "residual": jax.P("data"), "weights": jax.P("data"),
           "scale": jax.P(), "bias": jax.P()}
  sharded = jax.jit(jax.shard_map(
      lambda m: module_outputs(True, True, True, m, axis_name="data")[1:], mesh=mesh,
      in_specs=(specs,),
      out_specs=(jax.P("data"), jax.P(), (jax.P(), jax.P("data"), jax.P("data")))))
  y, stats, grads = sharded(
      {k: jax.device_put(v, jax.NamedSharding(mesh, specs[k])) for k, v in m.items()})
  _, *reference = jax.jit(lambda m: module_outputs(False, True, True, m))(reference_maps(m))
  assert_same_step((y, stats, grads), reference, dtype)


@pytest.mark.parametrize("dtype, rtol", [
    (jnp.float32, 1e-4),
    # bfloat16 maps: nn.BatchNorm rounds at other points than the kernels do, and batch norm
    # over 4 images of 8-16 channels amplifies that; a wrong gradient would be O(1)
    (jnp.bfloat16, 5e-2)])
def test_resnet_with_native_batch_norm_is_the_same_network(dtype, rtol):
  """The encoder's variables, features and gradients do not depend on the norm backend."""
  images = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3))
  outputs = {}
  for backend in ("jax", "native"):
    model = models.ResNet(18, width_multiplier=0.125, cifar_stem=True, norm_backend=backend,
                          dtype=dtype)
    variables = model.init(jax.random.key(0), images, train=False)

    def loss(params, model=model, variables=variables):
      out, _ = model.apply(dict(variables, params=params), images, train=True,
                           mutable=["batch_stats"])
      return jnp.sum(out["block4"].astype(jnp.float32) ** 2) + jnp.sum(out["h"])

    outputs[backend] = (variables, jax.jit(jax.value_and_grad(loss))(variables["params"]))
  (variables, (value, grads)), (variables_native, (value_native, grads_native)) = (
      outputs["jax"], outputs["native"])
  jax.tree.map(np.testing.assert_array_equal, variables, variables_native)
  np.testing.assert_allclose(value_native, value, rtol=rtol / 10)
  distance = relative_distance(grads_native, grads)
  assert distance < rtol, f"gradients differ by {distance:.2e} (relative L2)"


@pytest.mark.parametrize("x_dtype, module_dtype, running", [
    (jnp.float16, jnp.float16, False),   # float16 maps
    (jnp.bfloat16, None, False),         # bfloat16 maps, float32 output
    (jnp.float32, jnp.bfloat16, False),  # float32 maps, bfloat16 output
    (jnp.float32, None, True),           # running averages
])
def test_what_the_kernels_do_not_run_is_nn_batch_norm(x_dtype, module_dtype, running):
  """Other dtypes, a change of dtype and running averages take nn.BatchNorm's code: no custom
  call at all."""
  x = random_maps()["x"].astype(x_dtype)
  module = batch_norm.BatchNorm(use_running_average=running, native=True, dtype=module_dtype)
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
