"""The C++ augmentation kernels (the CPU default) give the JAX ops' views for the same keys.

The JAX ops are the reference: test_augment checks them against tf.image and the official
sampling. Each native view must equal the JAX view of the same key and image to float32
rounding, for every op with a kernel, in every combination the presets use, interleaved with
ops that stay in JAX, on odd and non-square sizes, and inside shard_map on 8 devices. Choosing
the backend: test_native_backends.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax import augment
from simclr_jax import native
from simclr_jax.native import augment as native_augment
from tests.helpers import CROP_AND_RESIZE_CASES, tf_crop_and_resize

# Measured: 3e-6 at most (sums in another order, a division where JAX multiplies). A wrong
# step (order, coin, box, flip axis) moves pixels by 0.05 or more.
TOLERANCE = 2e-5

CONFIGS = {
    "simclr_cifar 32 -> 24": (augment.get_preset("simclr_cifar"), (32, 32), 24),
    "simclr_imagenet 37x45 -> 29 (blur)": (augment.get_preset("simclr_imagenet"), (37, 45), 29),
    "jitter v1 brightness, fixed order": (augment.make_config(
        ("random_resized_crop", "color_jitter"),
        color_jitter={"brightness_impl": "simclrv1", "random_order": False, "p": 1.0}),
        (20, 28), 20),
    "JAX ops between native ones": (augment.make_config(
        ("center_crop", "flip", "rotate90", "color_jitter", "solarize", "grayscale", "blur"),
        flip={"p": 1.0}, grayscale={"p": 0.5}, blur={"p": (1.0, 0.0)}), (30, 30), 26),
    "no crop op: resized first": (augment.make_config(("flip", "color_jitter", "grayscale")),
                                  (24, 18), 16),
}


def views(config, images, size, backend, view=0):
  augment_view = augment.build_augmentation(config, size, backend=backend)
  keys = jax.random.split(jax.random.key(7), len(images))
  return np.asarray(jax.jit(jax.vmap(lambda k, x: augment_view(k, x, view=view)))(keys, images))


@pytest.mark.parametrize("name", CONFIGS)
def test_native_views_equal_jax_views(name):
  config, (height, width), size = CONFIGS[name]
  images = np.random.default_rng(0).integers(0, 256, (24, height, width, 3), dtype=np.uint8)
  # Black, white, a grey and pure primaries, where the HSV code branches; a flat grey image.
  images[0, 0, :6] = [[0, 0, 0], [255, 255, 255], [128, 128, 128], [255, 0, 0], [0, 255, 0],
                      [0, 0, 255]]
  images[1] = 128
  for view in (0, 1):
    native_views = views(config, images, size, "native", view)
    jax_views = views(config, images, size, "jax", view)
    assert native_views.shape == (24, size, size, 3)
    assert np.abs(native_views - jax_views).max() <= TOLERANCE, (name, view)
  assert np.abs(native_views[2:] - native_views[2:].mean(0)).max() > 0.1  # the views do vary


@pytest.mark.parametrize("case", CROP_AND_RESIZE_CASES)
def test_native_crop_equals_tf_crop_then_resize(case):
  """The crop step alone against the official crop then resize, as test_augment checks the JAX
  op, to tf.image's 1e-4 (the kernel clips its views to [0, 1])."""
  height, width, size, boxes = CROP_AND_RESIZE_CASES[case]
  images = np.random.default_rng(5).random((len(boxes), height, width, 3), dtype=np.float32)
  crop = jax.jit(jax.vmap(lambda x, box: native.run_augment_steps(
      x, [("random_resized_crop", (box,))], size)))
  views = np.asarray(crop(images, np.asarray(boxes, np.float32)))
  for image, box, view in zip(images, boxes, views):
    expected = np.clip(tf_crop_and_resize(image, box, size), 0.0, 1.0)
    assert np.abs(view - expected).max() <= 1e-4, box


def test_native_views_inside_shard_map_on_eight_devices_equal_one_device():
  config, _, size = CONFIGS["simclr_imagenet 37x45 -> 29 (blur)"]
  augment_view = augment.build_augmentation(config, size, backend="native")
  images = jnp.asarray(np.random.default_rng(1).random((16, 33, 33, 3), dtype=np.float32))
  keys = jax.random.key_data(jax.random.split(jax.random.key(3), 16))
  batched = lambda k, x: jax.vmap(augment_view)(jax.random.wrap_key_data(k), x)
  mesh = jax.make_mesh((8,), ("data",))
  sharded = jax.jit(jax.shard_map(batched, mesh=mesh, in_specs=jax.P("data"),
                                  out_specs=jax.P("data")))
  put = lambda a: jax.device_put(a, jax.NamedSharding(mesh, jax.P("data")))
  np.testing.assert_array_equal(sharded(put(keys), put(images)),
                                jax.jit(batched)(keys, images))


def test_gradients_flow_past_native_augmentation():
  """The views are constants for autodiff (as the JAX ops' are for the parameters)."""
  augment_view = augment.build_augmentation(augment.get_preset("simclr_cifar"), 8,
                                            backend="native")
  images = jnp.asarray(np.random.default_rng(2).random((4, 8, 8, 3), dtype=np.float32))
  keys = jax.random.split(jax.random.key(0), 4)

  def loss(weight):
    return jnp.sum(jax.vmap(augment_view)(keys, images) * weight)

  np.testing.assert_allclose(jax.jit(jax.grad(loss))(2.0),
                             jnp.sum(jax.vmap(augment_view)(keys, images)), rtol=1e-6)


def test_bad_backends_and_calls_are_refused_with_a_clear_message():
  with pytest.raises(ValueError, match="augment_backend='gpu'; allowed: auto, jax, native"):
    augment.build_augmentation(augment.get_preset("simclr_cifar"), 8, backend="gpu")
  image = jnp.zeros((8, 8, 3))
  call = lambda params, steps: jax.ffi.ffi_call(
      native_augment.TARGET, jax.ShapeDtypeStruct((8, 8, 3), jnp.float32))(
          image, jnp.asarray(params, jnp.float32), steps=np.asarray(steps, np.int64))
  native_augment.KERNELS.register()
  with pytest.raises(Exception, match="unknown step 9"):
    jax.block_until_ready(call([1.0], [9]))
  with pytest.raises(Exception, match="the number of params do not match"):
    jax.block_until_ready(call([1.0, 0.0], [1]))
