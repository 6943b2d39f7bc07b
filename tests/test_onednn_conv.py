"""oneDNN convolution gradients (the CPU default) equal XLA's, its bfloat16 convolutions equal
float32 ones of bfloat16-rounded operands, and the backend choice is safe.

Runs on CPU device 0 without collectives, which is safe in this 8-device process; the trainer
test (test_train) runs the whole step with them on a one-device mesh.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from simclr_jax import features
from simclr_jax import models
from simclr_jax.models import onednn_conv
from tests.helpers import relative_distance

NHWC = ("NHWC", "HWIO", "NHWC")
# Every padding route: equal to TF's SAME, none (VALID), symmetric with stride 2 (padded by
# jnp.pad first), TF's own asymmetric SAME, and the ImageNet stem.
CASES = {
    "3x3/1 symmetric = SAME": ((4, 8, 8, 3), (3, 3, 3, 5), (1, 1), ((1, 1), (1, 1))),
    "1x1/2 VALID": ((4, 8, 8, 6), (1, 1, 6, 4), (2, 2), ((0, 0), (0, 0))),
    "3x3/2 symmetric, padded first": ((4, 8, 8, 6), (3, 3, 6, 4), (2, 2), ((1, 1), (1, 1))),
    "3x3/2 TF SAME (0, 1)": ((2, 8, 8, 4), (3, 3, 4, 4), (2, 2), ((0, 1), (0, 1))),
    "7x7/2 stem on 15 px": ((2, 15, 15, 3), (7, 7, 3, 8), (2, 2), ((3, 3), (3, 3))),
    "uneven sides": ((2, 9, 6, 4), (3, 1, 4, 4), (1, 2), ((2, 0), (0, 0))),
}


def conv_loss(conv, x, kernel, weights, strides, padding, **kwargs):
  y = conv(x, kernel, strides, padding, dimension_numbers=NHWC, **kwargs)
  return jnp.sum(y * weights)


def value_and_grads(conv, x, kernel, strides, padding, **kwargs):
  weights = jax.random.normal(jax.random.key(2), jax.eval_shape(
      lambda: jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC,
                                           **kwargs)).shape, x.dtype)
  fn = lambda x, kernel: conv_loss(conv, x, kernel, weights, strides, padding, **kwargs)
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(x, kernel), fn


def random_inputs(x_shape, kernel_shape, dtype=jnp.float32):
  x = jax.random.normal(jax.random.key(0), x_shape, dtype)
  return x, jax.random.normal(jax.random.key(1), kernel_shape, dtype)


@pytest.mark.parametrize("case", CASES)
def test_gradients_equal_xla_in_every_padding_route(case):
  x_shape, kernel_shape, strides, padding = CASES[case]
  x, kernel = random_inputs(x_shape, kernel_shape)
  (value, (dx, dkernel)), fn = value_and_grads(onednn_conv.conv_general_dilated, x, kernel,
                                               strides, padding)
  (value_xla, (dx_xla, dkernel_xla)), _ = value_and_grads(jax.lax.conv_general_dilated, x,
                                                          kernel, strides, padding)
  assert "pure_callback" in str(jax.make_jaxpr(jax.grad(fn, argnums=(0, 1)))(x, kernel))
  np.testing.assert_array_equal(value, value_xla)  # the forward pass is XLA's own
  for grad, expected in ((dx, dx_xla), (dkernel, dkernel_xla)):
    assert np.abs(grad - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("dtype, kwargs", [
    (jnp.bfloat16, {}),
    (jnp.float32, {"rhs_dilation": (2, 2)}),
    (jnp.float32, {"feature_group_count": 2}),
])
def test_what_onednn_does_not_run_goes_to_xla_unchanged(dtype, kwargs):
  x, kernel = random_inputs((2, 8, 8, 4), (3, 3, 4 // kwargs.get("feature_group_count", 1), 4),
                            dtype)
  (value, grads), fn = value_and_grads(onednn_conv.conv_general_dilated, x, kernel, (1, 1),
                                       ((1, 1), (1, 1)), **kwargs)
  (value_xla, grads_xla), _ = value_and_grads(jax.lax.conv_general_dilated, x, kernel, (1, 1),
                                              ((1, 1), (1, 1)), **kwargs)
  assert "pure_callback" not in str(jax.make_jaxpr(jax.grad(fn, argnums=(0, 1)))(x, kernel))
  np.testing.assert_array_equal(value, value_xla)
  for grad, expected in zip(grads, grads_xla):
    np.testing.assert_array_equal(grad, expected)


def bfloat16_rounded(array):
  return array.astype(jnp.bfloat16).astype(jnp.float32)


@pytest.mark.parametrize("case", CASES)
def test_bfloat16_backend_is_a_float32_conv_of_bfloat16_operands(case):
  """'onednn_bf16' rounds the forward pass's and both gradients' operands to bfloat16 (as a TPU's
  default precision does), accumulates in float32 and rounds each result to bfloat16."""
  x_shape, kernel_shape, strides, padding = CASES[case]
  x, kernel = random_inputs(x_shape, kernel_shape)
  bf16_conv = onednn_conv.conv_function("onednn_bf16")
  conv = lambda x, kernel: bf16_conv(x, kernel, strides, padding, dimension_numbers=NHWC)
  assert "pure_callback" in str(jax.make_jaxpr(conv)(x, kernel))  # the forward pass is oneDNN's
  y, vjp = jax.vjp(conv, x, kernel)
  dy = jax.random.normal(jax.random.key(2), y.shape)
  exact_conv = lambda x, kernel: jax.lax.conv_general_dilated(
      x, kernel, strides, padding, dimension_numbers=NHWC, precision=jax.lax.Precision.HIGHEST)
  y_exact, vjp_exact = jax.vjp(exact_conv, bfloat16_rounded(x), bfloat16_rounded(kernel))
  for result, exact in zip((y, *vjp(dy)), (y_exact, *vjp_exact(bfloat16_rounded(dy)))):
    assert result.dtype == jnp.float32
    assert np.abs(result - exact).max() <= 2**-8 * np.abs(exact).max()
  y_float32 = exact_conv(x, kernel)  # the operands' rounding shows: this is not a float32 conv
  assert np.abs(y - y_float32).max() > 1e-4 * np.abs(y_float32).max()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_callbacks_hand_buffers_to_tensorflow_without_copying(dtype):
  """Arguments reach TensorFlow as their own buffers and results come back as views, bit for
  bit; what TensorFlow cannot use in place (here a NumPy array) is copied, with the same bits."""
  x = jax.device_put(jax.random.normal(jax.random.key(0), (4, 8, 8, 16), dtype),
                     jax.devices()[0])
  tensor = onednn_conv._to_tf(x)
  back = onednn_conv._from_tf(tensor)
  assert back.dtype == x.dtype
  np.testing.assert_array_equal(back.view(np.uint8), np.asarray(x).view(np.uint8))
  assert back.ctypes.data == x.unsafe_buffer_pointer()  # no copy either way
  host = np.asarray(x)[:, 1:]  # not a jax.Array, not contiguous
  copied = onednn_conv._from_tf(onednn_conv._to_tf(host))
  np.testing.assert_array_equal(copied.view(np.uint8), np.ascontiguousarray(host).view(np.uint8))
  assert copied.ctypes.data != host.ctypes.data


def test_auto_picks_onednn_only_for_one_cpu_device_per_process():
  assert jax.default_backend() == "cpu"
  assert models.resolve_conv_backend("auto", 1) == "onednn"
  assert models.resolve_conv_backend("auto", 8) == "xla"
  assert models.resolve_conv_backend("xla", 8) == "xla"
  assert models.resolve_conv_backend("onednn", 1) == "onednn"


@pytest.mark.parametrize("call, message", [
    (lambda: models.resolve_conv_backend("onednn", 8), "one device per process"),
    (lambda: models.resolve_conv_backend("onednn_bf16", 2), "one device per process"),
    (lambda: models.resolve_conv_backend("mkl", 1), "allowed: auto, xla, onednn"),
    (lambda: models.create_model({"depth": 18, "width_multiplier": 1}, num_classes=2,
                                 conv_backend="auto"), "resolve 'auto' first"),
    (lambda: features.create_classifier({"depth": 18, "width_multiplier": 1}, num_classes=2,
                                        conv_backend="mkl"), "'xla', 'onednn' or 'onednn_bf16'"),
])
def test_bad_conv_backends_are_refused_with_what_to_use(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_finetuning_classifier_gets_the_same_gradients_from_each_backend():
  """The fine-tune / supervised model (features.Classifier), partly frozen as fine-tuning does."""
  model_config = {"depth": 18, "width_multiplier": 0.125, "cifar_stem": True}
  images = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3))
  labels = jnp.arange(4) % 3
  grads = {}
  variables = jax.jit(functools.partial(
      features.create_classifier(model_config, num_classes=3, conv_backend="xla").init,
      train=False))(jax.random.key(1), images)  # the same variables for every backend
  for backend in ("xla", "onednn", "onednn_bf16"):
    classifier = features.create_classifier(model_config, num_classes=3, conv_backend=backend)

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
