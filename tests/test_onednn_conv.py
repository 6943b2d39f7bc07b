"""oneDNN convolutions (the CPU default, simclr_jax/native/conv.py) equal XLA's, its bfloat16 ones
equal float32 convolutions of bfloat16-rounded operands, bfloat16 maps give bfloat16 results and
gradients rounded once, inside `shard_map` on 8 devices as on one, and what they do not run goes
to XLA. Choosing the backend: test_native_backends.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from simclr_jax import models
from simclr_jax import native
from simclr_jax.native import conv as onednn_conv
from tests.helpers import relative_distance

NHWC = ("NHWC", "HWIO", "NHWC")
# Every padding oneDNN is given: symmetric, none, TF's asymmetric SAME, the ImageNet stem,
# uneven sides and strides.
CASES = {
    "3x3/1 symmetric": ((4, 8, 8, 3), (3, 3, 3, 5), (1, 1), ((1, 1), (1, 1))),
    "1x1/2 none": ((4, 8, 8, 6), (1, 1, 6, 4), (2, 2), ((0, 0), (0, 0))),
    "3x3/2 symmetric": ((4, 8, 8, 6), (3, 3, 6, 4), (2, 2), ((1, 1), (1, 1))),
    "3x3/2 TF SAME (0, 1)": ((2, 8, 8, 4), (3, 3, 4, 4), (2, 2), ((0, 1), (0, 1))),
    "7x7/2 stem on 15 px": ((2, 15, 15, 3), (7, 7, 3, 8), (2, 2), ((3, 3), (3, 3))),
    "uneven sides": ((2, 9, 6, 4), (3, 1, 4, 4), (1, 2), ((2, 0), (0, 0))),
    # The batch is split over XLA's threads: parts of unequal size, and a batch of one.
    "batch of 3": ((3, 6, 6, 4), (3, 3, 4, 5), (1, 1), ((1, 1), (1, 1))),
    "batch of 1": ((1, 6, 6, 4), (3, 3, 4, 5), (2, 2), ((1, 1), (1, 1))),
}


def exact_conv(x, kernel, strides, padding):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC,
                                      precision=jax.lax.Precision.HIGHEST)


def random_inputs(x_shape, kernel_shape, dtype=jnp.float32):
  x = jax.random.normal(jax.random.key(0), x_shape, dtype)
  return x, jax.random.normal(jax.random.key(1), kernel_shape, dtype)


def output_and_gradients(conv, x, kernel, dy):
  """y = conv(x, kernel) and the gradients (dx, dkernel) of <y, dy>, jitted."""
  def run(x, kernel, dy):
    y, vjp = jax.vjp(conv, x, kernel)
    return (y, *vjp(dy))
  return jax.jit(run)(x, kernel, dy)


def assert_close(results, expected, rtol, dtype=jnp.float32):
  for name, result, exact in zip(("y", "dx", "dkernel"), results, expected):
    assert result.dtype == dtype, name
    result = np.asarray(result, np.float32)
    error = float(np.abs(result - exact).max() / np.abs(exact).max())
    assert error <= rtol, f"{name}: max error {error:.1e} of the largest value"


def calls_onednn(function, *args) -> bool:
  return "simclr_conv_" in str(jax.make_jaxpr(function)(*args))


@pytest.mark.parametrize("case", CASES)
def test_float32_passes_equal_xla(case):
  x_shape, kernel_shape, strides, padding = CASES[case]
  x, kernel = random_inputs(x_shape, kernel_shape)
  conv = functools.partial(native.conv_function("onednn"), window_strides=strides,
                           padding=padding, dimension_numbers=NHWC)
  dy = jax.random.normal(jax.random.key(2), jax.eval_shape(conv, x, kernel).shape)
  assert calls_onednn(jax.grad(lambda x, k: jnp.vdot(conv(x, k), dy), (0, 1)), x, kernel)
  expected = output_and_gradients(
      lambda x, k: exact_conv(x, k, strides, padding), x, kernel, dy)
  assert_close(output_and_gradients(conv, x, kernel, dy), expected, rtol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_bfloat16_backend_is_a_float32_conv_of_bfloat16_operands(case):
  """'onednn_bf16' rounds each pass's operands to bfloat16 (as a TPU's default precision does)
  and sums the products in float32; results are float32, not rounded again."""
  x_shape, kernel_shape, strides, padding = CASES[case]
  x, kernel = random_inputs(x_shape, kernel_shape)
  conv = functools.partial(native.conv_function("onednn_bf16"), window_strides=strides,
                           padding=padding, dimension_numbers=NHWC)
  dy = jax.random.normal(jax.random.key(2), jax.eval_shape(conv, x, kernel).shape)
  rounded = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)
  expected = output_and_gradients(lambda x, k: exact_conv(x, k, strides, padding), rounded(x),
                                  rounded(kernel), rounded(dy))
  results = output_and_gradients(conv, x, kernel, dy)
  assert_close(results, expected, rtol=1e-6)
  y_float32 = exact_conv(x, kernel, strides, padding)  # the rounding shows: not a float32 conv
  assert np.abs(results[0] - y_float32).max() > 1e-4 * np.abs(y_float32).max()


@pytest.mark.parametrize("backend", ["onednn", "onednn_bf16"])
@pytest.mark.parametrize("case", CASES)
def test_bfloat16_maps_give_their_float32_conv_rounded_once(case, backend):
  """A model with dtype=bfloat16 hands bfloat16 operands (and output gradients) over as they are:
  on either backend y, dx and dkernel are bfloat16, each the float32 convolution of those values
  rounded to bfloat16 once (half a bfloat16 ulp, at most 2^-8 of the value, plus float32 summation);
  the kernel gradient's parts are summed in float32 before that one rounding."""
  x_shape, kernel_shape, strides, padding = CASES[case]
  x, kernel = random_inputs(x_shape, kernel_shape, jnp.bfloat16)
  conv = functools.partial(native.conv_function(backend), window_strides=strides,
                           padding=padding, dimension_numbers=NHWC)
  dy = jax.random.normal(jax.random.key(2), jax.eval_shape(conv, x, kernel).shape, jnp.bfloat16)
  assert calls_onednn(jax.grad(lambda x, k: jnp.vdot(conv(x, k), dy).astype(jnp.float32),
                               (0, 1)), x, kernel)
  as_float32 = lambda a: a.astype(jnp.float32)
  expected = output_and_gradients(lambda x, k: exact_conv(x, k, strides, padding),
                                  as_float32(x), as_float32(kernel), as_float32(dy))
  results = output_and_gradients(conv, x, kernel, dy)
  for name, result, exact in zip(("y", "dx", "dkernel"), results, expected):
    assert result.dtype == jnp.bfloat16, name
    exact = np.asarray(exact)
    error = np.abs(np.asarray(result, np.float32) - exact)
    bound = 2.0**-8 * np.abs(exact) + 1e-6 * np.abs(exact).max()
    assert np.all(error <= bound), f"{name}: {np.sum(error > bound)} values beyond one rounding"


def test_forward_on_bfloat16_operands_is_their_float64_matmul():
  """native.conv.forward takes operands already in bfloat16 (the benchmarks' bfloat16 ceiling, a
  1x1 convolution shaped as a matmul): the product of those values, summed in float32."""
  x, kernel = random_inputs((3, 4, 4, 8), (1, 1, 8, 6), jnp.bfloat16)
  y = jax.jit(onednn_conv.forward)(x, kernel)
  assert y.dtype == jnp.float32 and y.shape == (3, 4, 4, 6)
  as_float64 = lambda a: np.asarray(a.astype(jnp.float32), np.float64)
  expected = as_float64(x).reshape(-1, 8) @ as_float64(kernel).reshape(8, 6)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 6), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, kwargs", [
    (jnp.float16, {}),
    (jnp.float32, {"rhs_dilation": (2, 2)}),
    (jnp.float32, {"feature_group_count": 2}),
])
def test_what_onednn_does_not_run_goes_to_xla_unchanged(dtype, kwargs):
  x, kernel = random_inputs((2, 8, 8, 4), (3, 3, 4 // kwargs.get("feature_group_count", 1), 4),
                            dtype)
  conv = lambda lax_conv: (lambda x, k: jnp.sum(lax_conv(x, k, (1, 1), ((1, 1), (1, 1)),
                                                         dimension_numbers=NHWC, **kwargs)))
  onednn = conv(onednn_conv.conv_general_dilated)
  assert not calls_onednn(jax.grad(onednn, (0, 1)), x, kernel)
  value_and_grads = jax.jit(jax.value_and_grad(onednn, (0, 1)))(x, kernel)
  expected = jax.jit(jax.value_and_grad(conv(jax.lax.conv_general_dilated), (0, 1)))(x, kernel)
  jax.tree.map(np.testing.assert_array_equal, value_and_grads, expected)


@pytest.mark.parametrize("backend, dtype, rtol", [
    ("onednn", jnp.float32, 1e-5), ("onednn_bf16", jnp.float32, 1e-5),
    # each device's kernel gradient is rounded to bfloat16 before the sum over devices
    ("onednn_bf16", jnp.bfloat16, 2e-2)])
def test_eight_devices_in_shard_map_equal_one(backend, dtype, rtol):
  """Each device convolves its own shard; the kernel's gradient is summed over devices, as for
  XLA's convolutions (global batch norm and the trainer: test_train)."""
  x, kernel = random_inputs((16, 8, 8, 4), (3, 3, 4, 6), dtype)
  conv = native.conv_function(backend)
  loss = lambda x, k: jnp.sum(jnp.tanh(conv(x, k, (2, 2), ((1, 1), (1, 1)),
                                            dimension_numbers=NHWC).astype(jnp.float32)))
  mesh = jax.make_mesh((8,), ("data",))
  sharded_grads = jax.jit(jax.shard_map(
      jax.grad(loss, (0, 1)), mesh=mesh, in_specs=(jax.P("data"), jax.P()),
      out_specs=(jax.P("data"), jax.P())))
  x_sharded = jax.device_put(x, jax.NamedSharding(mesh, jax.P("data")))
  kernel_replicated = jax.device_put(kernel, jax.NamedSharding(mesh, jax.P()))
  dx, dkernel = sharded_grads(x_sharded, kernel_replicated)
  dx_1, dkernel_1 = jax.jit(jax.grad(loss, (0, 1)))(x, kernel)
  assert dx.dtype == dkernel.dtype == dtype
  as_float32 = lambda a: np.asarray(a, np.float32)
  dx_rtol = 1e-6 if dtype == jnp.float32 else 2.0**-7  # a rounding may go the other way: one ulp
  np.testing.assert_allclose(as_float32(dx), as_float32(dx_1), rtol=dx_rtol, atol=1e-6)
  assert relative_distance(dkernel, dkernel_1) < rtol


def test_the_kernels_reject_other_dtypes_with_a_clear_error():
  x, kernel = random_inputs((2, 4, 4, 3), (3, 3, 3, 2), jnp.float16)
  with pytest.raises(Exception, match="operands and results must be F32 or BF16"):
    jax.block_until_ready(jax.jit(lambda x, k: onednn_conv._call(
        onednn_conv.FORWARD, (2, 4, 4, 2), x, k, strides=(1, 1),
        padding=((1, 1), (1, 1))))(x, kernel))


@pytest.mark.parametrize("call, message", [
    (lambda: models.ResNet(18, conv_backend="auto"), "resolve 'auto' first"),
    (lambda: models.ResNet(18, conv_backend="mkl"), "'xla', 'onednn' or 'onednn_bf16'"),
])
def test_bad_conv_backends_are_refused_with_what_to_use(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_finetuning_classifier_gets_the_same_gradients_from_each_backend():
  """The fine-tune / supervised model (models.Classifier), partly frozen as fine-tuning does."""
  model_config = models.ModelConfig(depth=18, width_multiplier=0.125, cifar_stem=True)
  images = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3))
  labels = jnp.arange(4) % 3
  grads = {}
  variables = jax.jit(functools.partial(
      models.Classifier(model_config, num_classes=3, conv_backend="xla").init,
      train=False))(jax.random.key(1), images)  # the same variables for every backend
  for backend in ("xla", "onednn", "onednn_bf16"):
    classifier = models.Classifier(model_config, num_classes=3, conv_backend=backend)

    def loss(params):
      logits, _ = classifier.apply({**variables, "params": params}, images, train=True,
                                   stop_gradient_after_block=1, mutable=["batch_stats"])[0]
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grads[backend] = jax.jit(jax.grad(loss))(variables["params"])
  frozen = grads["xla"]["encoder"]["block1_0"]
  assert all(np.all(leaf == 0) for leaf in jax.tree.leaves(frozen))
  assert relative_distance(grads["onednn"], grads["xla"]) < 1e-5
  # bfloat16 rounding, amplified by batch norm over 4 images; a wrong gradient would be O(1)
  assert 1e-4 < relative_distance(grads["onednn_bf16"], grads["xla"]) < 5e-2
