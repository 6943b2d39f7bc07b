"""On-device augmentations: tf.image equivalence, the official crop sampling, determinism, extras.

References are tf.image itself (colour ops, blur as the official depthwise convolution) and a
NumPy transcription of TF's SampleDistortedBoundingBox kernel for the crop sampler. Everything
runs on small images with few jit compilations, so the file stays well under a minute.
"""
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from simclr_jax import augment
from simclr_jax.augment import geometry
from tests.helpers import CROP_AND_RESIZE_CASES, tf_crop_and_resize

TOLERANCE = 1e-4  # max abs error against tf.image


def colour_images(seed=0, count=3, size=12):
  """Random images plus the pixels where HSV code has edge cases (greys, primaries, 0 and 1)."""
  rng = np.random.default_rng(seed)
  images = rng.random((count, size, size, 3), dtype=np.float32)
  special = np.array([[0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5], [1, 0, 0], [0, 1, 0], [0, 0, 1],
                      [1, 1, 0], [0.2, 0.7, 0.7], [0.9, 0.1, 0.9], [0.3, 0.3, 0.6]], np.float32)
  images[0].reshape(-1, 3)[:len(special)] = special
  return images


@pytest.mark.parametrize("name, factors, ours, reference", [
    ("brightness v1 (additive)", (-0.4, 0.3), augment.adjust_brightness,
     tf.image.adjust_brightness),
    ("brightness v2 (multiplicative)", (0.2, 1.7), augment.scale_brightness,
     lambda image, factor: tf.constant(image) * factor),
    ("contrast", (0.0, 0.2, 1.8), augment.adjust_contrast, tf.image.adjust_contrast),
    ("saturation", (0.0, 0.2, 1.0, 1.8), augment.adjust_saturation, tf.image.adjust_saturation),
    ("hue", (-0.5, -0.2, 0.0, 0.07, 0.2, 0.5), augment.adjust_hue, tf.image.adjust_hue),
])
def test_colour_op_matches_tf_image(name, factors, ours, reference):
  for image, factor in itertools.product(colour_images(), factors):
    error = np.abs(np.asarray(ours(jnp.asarray(image), factor)) - reference(image, factor).numpy())
    assert error.max() <= TOLERANCE, (name, factor, error.max())


def test_grayscale_matches_tf_image():
  image = colour_images()[0]
  expected = np.tile(tf.image.rgb_to_grayscale(image).numpy(), [1, 1, 3])
  np.testing.assert_allclose(augment.to_grayscale(jnp.asarray(image)), expected, atol=TOLERANCE)


def tf_jitter(image, order, brightness, contrast, saturation, hue, brightness_impl):
  """The official color_jitter_rand with fixed factors: ops in `order`, clip after each."""
  transforms = [
      (lambda x: x * brightness) if brightness_impl == "simclrv2"
      else (lambda x: tf.image.adjust_brightness(x, brightness)),
      lambda x: tf.image.adjust_contrast(x, contrast),
      lambda x: tf.image.adjust_saturation(x, saturation),
      lambda x: tf.image.adjust_hue(x, hue),
  ]
  for code in order:
    image = tf.clip_by_value(transforms[code](image), 0.0, 1.0)
  return image.numpy()


@pytest.mark.parametrize("brightness_impl, brightness", [("simclrv2", 1.5), ("simclrv1", 0.25)])
def test_color_jitter_matches_official_sequence_in_every_order(brightness_impl, brightness):
  image = colour_images(seed=1, count=1)[0]
  orders = np.array(list(itertools.permutations(range(4))), np.int32)
  factors = dict(brightness=brightness, contrast=1.6, saturation=0.4, hue=0.15)
  jitter = jax.jit(jax.vmap(lambda order: augment.apply_color_jitter(
      jnp.asarray(image), order, brightness_impl=brightness_impl, **factors)))
  ours = np.asarray(jitter(orders))
  outcomes = set()
  for order, result in zip(orders, ours):
    expected = tf_jitter(image, order, brightness_impl=brightness_impl, **factors)
    np.testing.assert_allclose(result, expected, atol=TOLERANCE, err_msg=str(order))
    outcomes.add(np.round(result, 4).tobytes())
  assert len(outcomes) > 12  # the order matters, so the test would see a wrong order


@pytest.mark.parametrize("brightness_impl, brightness_contrast", [
    ("simclrv2", [(1.8, 0.2), (0.2, 1.8)]), ("simclrv1", [(-0.6, 1.8), (0.6, 0.3)])])
def test_color_jitter_composition_holds_where_clipping_bites(brightness_impl,
                                                             brightness_contrast):
  """Strong factors, so every clip changes pixels: brightness/contrast runs composed into one
  clamp-affine pass and saturation merged with hue must still give the official sequence."""
  images = colour_images(seed=2, count=2)
  orders = np.array(list(itertools.permutations(range(4))), np.int32)

  @jax.jit
  def jitter(brightness, contrast):
    one = lambda image, order: augment.apply_color_jitter(
        image, order, brightness=brightness, contrast=contrast, saturation=1.8, hue=-0.3,
        brightness_impl=brightness_impl)
    return jax.vmap(jax.vmap(one, (None, 0)), (0, None))(jnp.asarray(images), orders)

  for brightness, contrast in brightness_contrast:
    ours = np.asarray(jitter(brightness, contrast))
    for image, results in zip(images, ours):
      clipped = 0
      for order, result in zip(orders, results):
        expected = tf_jitter(image, order, brightness, contrast, 1.8, -0.3, brightness_impl)
        np.testing.assert_allclose(result, expected, atol=TOLERANCE, err_msg=str(order))
        clipped += ((expected == 0.0) | (expected == 1.0)).mean()
      assert clipped / len(orders) > 0.05  # clipping really happens


def reference_crop_box(rng, height, width, area_range=(0.08, 1.0), ratio_range=(3 / 4, 4 / 3),
                       max_attempts=100, min_object_covered=0.1):
  """NumPy transcription of TF's SampleDistortedBoundingBox with the whole image as the box.

  An attempt draws an aspect ratio uniformly, then an integer height uniformly between the
  rounded heights of the minimum and maximum areas (capped so the rounded width fits), rounds
  the width, nudges the height once up/down for rounding, and is rejected outside the
  constraints. Offsets are uniform integers in [0, side - crop_side).
  """
  f32 = np.float32
  min_area, max_area = f32(area_range[0] * height * width), f32(area_range[1] * height * width)
  for _ in range(max_attempts):
    ratio = f32(rng.uniform(*ratio_range))
    crop_height = int(np.rint(np.sqrt(min_area / ratio)))
    max_height = int(np.rint(np.sqrt(max_area / ratio)))
    if np.rint(max_height * ratio) > width:
      max_height = int((width + 0.5 - 1e-7) / ratio)
      if np.rint(max_height * ratio) > width:
        max_height -= 1
    max_height = min(max_height, height)
    crop_height = min(crop_height, max_height)
    if crop_height < max_height:
      crop_height += int(rng.integers(0, max_height - crop_height + 1))
    crop_width = int(np.rint(crop_height * ratio))
    if crop_width * crop_height < min_area:
      crop_height += 1
      crop_width = int(np.rint(crop_height * ratio))
    if crop_width * crop_height > max_area:
      crop_height -= 1
      crop_width = int(np.rint(crop_height * ratio))
    area = crop_width * crop_height
    if (min_area <= area <= max_area and 0 < crop_width <= width and 0 < crop_height <= height
        and area / (height * width) >= min_object_covered):
      top = int(rng.integers(0, height - crop_height)) if crop_height < height else 0
      left = int(rng.integers(0, width - crop_width)) if crop_width < width else 0
      return top, left, crop_height, crop_width
  return 0, 0, height, width


def crop_statistics(boxes, height, width):
  boxes = np.asarray(boxes, np.float64)
  area = boxes[:, 2] * boxes[:, 3] / (height * width)
  ratio = boxes[:, 3] / boxes[:, 2]
  return area, ratio


@pytest.mark.parametrize("height, width", [(32, 32), (160, 224)])
def test_crop_sampler_matches_official_distribution(height, width):
  """10k draws: mean, quantiles and KS distance of area fraction and aspect ratio.

  Tolerances are ~4 standard errors of the difference of two independent 10k samples: 0.015 for
  means, 0.025 for the 10/25/50/75/90% quantiles, and 0.03 for the two-sample KS distance (its
  0.1% critical value is 0.028). The seeds are fixed, so the test is deterministic.
  """
  draws = 10_000
  keys = jax.random.split(jax.random.key(1), draws)
  ours = np.asarray(jax.jit(jax.vmap(lambda k: augment.sample_crop_box(k, height, width)))(keys))
  rng = np.random.default_rng(0)
  reference = np.array([reference_crop_box(rng, height, width) for _ in range(draws)])

  top, left, crop_height, crop_width = ours.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + crop_height <= height).all() and (left + crop_width <= width).all()
  for statistic, name in zip(zip(crop_statistics(ours, height, width),
                                 crop_statistics(reference, height, width)), ("area", "ratio")):
    mine, theirs = statistic
    assert abs(mine.mean() - theirs.mean()) < 0.015, name
    quantiles = [0.1, 0.25, 0.5, 0.75, 0.9]
    np.testing.assert_allclose(np.quantile(mine, quantiles), np.quantile(theirs, quantiles),
                               atol=0.025, err_msg=name)
    grid = np.linspace(min(mine.min(), theirs.min()), max(mine.max(), theirs.max()), 200)
    ks = np.abs(np.searchsorted(np.sort(mine), grid, "right") / draws
                - np.searchsorted(np.sort(theirs), grid, "right") / draws).max()
    assert ks < 0.03, (name, ks)
  area = crop_statistics(ours, height, width)[0]
  assert area.min() >= 0.08 - 1e-6 and 0.08 <= np.quantile(area, 0.01) < 0.15
  # Offsets: uniform in [0, side - crop_side), compare the mean relative position.
  movable = crop_height < height
  np.testing.assert_allclose((top[movable] / (height - crop_height[movable])).mean(),
                             (reference[:, 0] / np.maximum(height - reference[:, 2], 1))[
                                 reference[:, 2] < height].mean(), atol=0.02)


def test_reference_sampler_matches_tf_kernel():
  """The NumPy transcription against tf.image.sample_distorted_bounding_box itself (2k draws)."""
  draws, size = 2_000, 32

  @tf.function
  def tf_boxes(seeds):
    def one(seed):
      begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
          [size, size, 3], tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
          min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
          max_attempts=100)
      return tf.concat([begin[:2], crop_size[:2]], 0)
    return tf.map_fn(one, seeds, fn_output_signature=tf.int32)

  theirs = tf_boxes(tf.stack([tf.range(draws), tf.range(draws) * 7 + 1], 1)).numpy()
  rng = np.random.default_rng(2)
  reference = np.array([reference_crop_box(rng, size, size) for _ in range(draws)])
  for mine, tf_stat in zip(crop_statistics(reference, size, size),
                           crop_statistics(theirs, size, size)):
    assert abs(mine.mean() - tf_stat.mean()) < 0.03
    np.testing.assert_allclose(np.quantile(mine, [0.1, 0.5, 0.9]),
                               np.quantile(tf_stat, [0.1, 0.5, 0.9]), atol=0.05)


@pytest.fixture(params=["matmuls (CPU)", "gathers (accelerators)"])
def crop_formulation(request, monkeypatch):
  """crop_and_resize runs its CPU formulation here; the other one is tested by routing the CPU
  branch to it."""
  if request.param.startswith("gathers"):
    monkeypatch.setattr(geometry, "_resize_by_matmuls", geometry._resize_by_gathers)
  return request.param


@pytest.mark.parametrize("case", CROP_AND_RESIZE_CASES)
def test_crop_and_resize_equals_tf_crop_then_resize(case, crop_formulation):
  """The official crop then resize, for a different box per image under vmap; to 1e-4 (TF's
  bicubic table rounds sample positions to 1/1024 px, and so do we; measured: 5e-7)."""
  height, width, size, boxes = CROP_AND_RESIZE_CASES[case]
  images = np.random.default_rng(5).random((len(boxes), height, width, 3), dtype=np.float32)
  crop = jax.jit(jax.vmap(augment.crop_and_resize, in_axes=(0, 0, None)), static_argnums=2)
  ours = np.asarray(crop(images, jnp.array(boxes), size))
  for image, box, view in zip(images, boxes, ours):
    assert np.abs(view - tf_crop_and_resize(image, box, size)).max() <= TOLERANCE, box


@pytest.mark.parametrize("height, width, size", [(32, 32, 32), (48, 40, 24), (224, 224, 224)])
def test_crop_and_resize_on_sampled_crops(height, width, size, crop_formulation):
  """The presets' own crops (and downscaling ones), batched as the pipeline runs them."""
  images = np.random.default_rng(3).random((8, height, width, 3), dtype=np.float32)
  keys = jax.random.split(jax.random.key(4), 8)

  @jax.jit
  @jax.vmap
  def crop(key, image):
    box = augment.sample_crop_box(key, height, width)
    return augment.crop_and_resize(image, box, size), box

  views, boxes = crop(keys, images)
  for image, box, view in zip(images, np.asarray(boxes), np.asarray(views)):
    assert np.abs(view - tf_crop_and_resize(image, box, size)).max() <= TOLERANCE, box


def test_resize_equals_tf_resize_and_keeps_an_image_of_its_size():
  image = colour_images(count=1, size=20)[0][:, :17]
  for size in (9, 20, 31):
    expected = tf.image.resize(image, [size, size], method="bicubic", antialias=False).numpy()
    np.testing.assert_allclose(augment.resize(jnp.asarray(image), size), expected,
                               atol=TOLERANCE)
  square = colour_images(count=1, size=20)[0]
  np.testing.assert_allclose(augment.crop_and_resize(square, jnp.array([0, 0, 20, 20]), 20),
                             square, atol=1e-6)  # weights (0, 1, 0, 0): the identity


def test_blur_matches_official_depthwise_convolution():
  image = colour_images(count=1, size=24)[0]
  for sigma, kernel_size in [(0.1, 3), (1.3, 2), (2.0, 5)]:
    radius = kernel_size // 2
    taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma ** 2)).astype(np.float32)
    taps /= taps.sum()
    horizontal = np.tile(taps.reshape(1, -1, 1, 1), [1, 1, 3, 1])
    vertical = np.tile(taps.reshape(-1, 1, 1, 1), [1, 1, 3, 1])
    expected = tf.nn.depthwise_conv2d(image[None], horizontal, [1] * 4, "SAME")
    expected = tf.nn.depthwise_conv2d(expected, vertical, [1] * 4, "SAME")[0].numpy()
    blur = jax.jit(augment.blur_with_sigma, static_argnums=2)
    np.testing.assert_allclose(blur(jnp.asarray(image), sigma, kernel_size),
                               expected, atol=1e-5)


EVERYTHING = augment.make_config(
    ("random_resized_crop", "flip", "rotate90", "color_jitter", "grayscale", "blur", "solarize",
     "cutout", "gaussian_noise", "sobel"),
    color_jitter={"strength": 0.5}, grayscale={"p": 0.5}, sobel={"p": 0.2})


def test_pipeline_is_pure_jittable_vmappable_and_in_range():
  """Every op in one pipeline (one compilation): shape, range, determinism, batch independence."""
  augment_view = augment.build_augmentation(EVERYTHING, 16)
  images = np.random.default_rng(0).integers(0, 256, (6, 24, 20, 3), dtype=np.uint8)
  images[1] = images[0]
  keys = jax.random.split(jax.random.key(0), 6)
  batched = jax.jit(jax.vmap(augment_view))
  views = np.asarray(batched(keys, images))
  assert views.shape == (6, 16, 16, 3) and views.dtype == np.float32
  assert views.min() >= 0.0 and views.max() <= 1.0
  np.testing.assert_array_equal(views, batched(keys, images))  # same keys, same views
  other = np.asarray(batched(jax.random.split(jax.random.key(1), 6), images))
  assert all(np.abs(a - b).max() > 0.05 for a, b in zip(views, other))  # new keys, new views
  assert np.abs(views[0] - views[1]).max() > 0.05  # two keys, two views of one image
  shuffle = np.array([3, 5, 0, 1, 4, 2])
  np.testing.assert_allclose(batched(keys[shuffle], images[shuffle]), views[shuffle], atol=1e-5)


def test_probabilities_are_applied_at_their_rates():
  config = augment.make_config(("flip", "grayscale"))
  augment_view = jax.jit(jax.vmap(augment.build_augmentation(config, 4), in_axes=(0, None)))
  image = jnp.asarray(np.random.default_rng(0).random((4, 4, 3), dtype=np.float32))
  views = np.asarray(augment_view(jax.random.split(jax.random.key(0), 4000), image))
  gray = np.abs(views - views[..., :1]).max(axis=(1, 2, 3)) < 1e-6
  flipped = np.abs(views - np.asarray(image)[:, ::-1]).max(axis=(1, 2, 3)) < 1e-6
  unchanged = np.abs(views - np.asarray(image)).max(axis=(1, 2, 3)) < 1e-6
  assert (flipped | unchanged)[~gray].all()
  assert abs(gray.mean() - 0.2) < 0.025  # binomial standard errors: 0.006 and 0.009
  assert abs(flipped[~gray].mean() - 0.5) < 0.035


def test_per_view_probabilities():
  """SimCLRv2/BYOL-style asymmetric blur: always on the first view, never on the second."""
  config = augment.make_config(("flip", "blur"), blur={"p": (1.0, 0.0)})
  augment_view = jax.jit(augment.build_augmentation(config, 20), static_argnames="view")
  image = np.asarray(colour_images(count=1, size=20)[0])
  not_blurred = lambda view: min(np.abs(view - image).max(), np.abs(view - image[:, ::-1]).max())
  for key in jax.random.split(jax.random.key(3), 4):
    assert not_blurred(np.asarray(augment_view(key, image, view=0))) > 0.01
    assert not_blurred(np.asarray(augment_view(key, image, view=1))) < 1e-6
  with pytest.raises(ValueError, match="view=2"):
    augment_view(jax.random.key(0), image, view=2)


def test_rotate90_rotates_exactly():
  image = jnp.asarray(colour_images(count=1, size=8)[0])
  seen = set()
  keys = jax.random.split(jax.random.key(0), 12)
  for rotated in np.asarray(jax.jit(jax.vmap(augment.rotate90, in_axes=(0, None)))(keys, image)):
    turns = [k for k in (1, 2, 3) if np.array_equal(rotated, np.rot90(image, k, axes=(0, 1)))]
    assert len(turns) == 1
    seen.add(turns[0])
  assert seen == {1, 2, 3}
  with pytest.raises(ValueError, match="square"):
    augment.rotate90(jax.random.key(0), jnp.zeros((4, 6, 3)))


def test_cutout_zeroes_a_square():
  image = jnp.ones((20, 20, 3))
  inside = np.asarray(augment.cutout(image, 10, 8, 6))
  zeroed = np.argwhere(inside[..., 0] == 0)
  assert len(zeroed) == 36 and (inside[..., 0] == 0).sum() * 3 == (inside == 0).sum()
  np.testing.assert_array_equal(zeroed.min(0), [7, 5])
  np.testing.assert_array_equal(zeroed.max(0), [12, 10])
  at_corner = np.asarray(augment.cutout(image, 0, 19, 6))
  assert (at_corner == 0).sum() == 3 * 4 * 3  # rows 0-2, columns 16-19: clipped at the borders
  keys = jax.random.split(jax.random.key(0), 5)
  cuts = jax.jit(jax.vmap(lambda key: augment.random_cutout(key, image, size=0.25)))(keys)
  for cut in np.asarray(cuts)[..., 0]:
    rows, cols = np.nonzero(cut == 0)
    assert rows.size == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)  # a box
    assert rows.max() - rows.min() < 5 and cols.max() - cols.min() < 5


def test_gaussian_noise_has_its_std():
  image = jnp.full((64, 64, 3), 0.5)
  noisy = np.asarray(augment.gaussian_noise(jax.random.key(0), image, std=0.05)) - 0.5
  assert abs(noisy.std() - 0.05) < 0.002 and abs(noisy.mean()) < 0.002


def test_sobel_on_a_step_edge():
  image = np.zeros((8, 10, 3), np.float32)
  image[:, 5:] = 0.8
  edges = np.asarray(augment.sobel(jnp.asarray(image)))
  expected = np.zeros_like(image)
  expected[:, 4:6] = 0.8  # |gradient| / 4 is the step height, on both sides of the edge
  np.testing.assert_allclose(edges, expected, atol=1e-6)


def test_center_crop_solarize_and_flip():
  image = jnp.asarray(colour_images(count=1, size=16)[0])
  config = augment.make_config(("center_crop", "solarize", "flip"), solarize={"p": 1.0},
                               flip={"p": 1.0}, center_crop={"proportion": 0.5})
  view = jax.jit(augment.build_augmentation(config, 8))(jax.random.key(0), image)
  expected = np.asarray(image)[4:12, 4:12, :][:, ::-1]
  expected = np.where(expected < 0.5, expected, 1.0 - expected)
  np.testing.assert_allclose(view, expected, atol=1e-6)


def test_without_crop_ops_images_are_resized_and_host_crops_are_kept():
  image = jnp.asarray(colour_images(count=1, size=16)[0])
  none = augment.build_augmentation(augment.get_preset("none"), 16)
  np.testing.assert_allclose(none(jax.random.key(0), image), image, atol=1e-6)
  assert augment.build_augmentation(augment.get_preset("none"), 8)(
      jax.random.key(0), image).shape == (8, 8, 3)
  host_cropped = augment.build_augmentation(augment.get_preset("crop_flip"), 16,
                                            crop_on_device=False)
  for index in range(4):
    view = np.asarray(host_cropped(jax.random.key(index), image))
    assert np.allclose(view, image) or np.allclose(view, np.asarray(image)[:, ::-1])


def test_presets():
  imagenet, cifar = augment.get_preset("simclr_imagenet"), augment.get_preset("simclr_cifar")
  assert imagenet.ops == ("random_resized_crop", "flip", "color_jitter", "grayscale", "blur")
  assert cifar.ops == ("random_resized_crop", "flip", "color_jitter", "grayscale")
  assert (imagenet.color_jitter.strength, cifar.color_jitter.strength) == (1.0, 0.5)
  assert (imagenet.color_jitter.p, imagenet.grayscale.p, imagenet.blur.p) == (0.8, 0.2, 0.5)
  assert imagenet.random_resized_crop.area_min == 0.08 and imagenet.flip.p == 0.5
  assert augment.get_preset("crop_flip").ops == ("random_resized_crop", "flip")
  assert augment.get_preset("none").ops == ()
  assert isinstance(cifar, ml_collections.ConfigDict)
  with pytest.raises(ValueError, match="unknown augmentation preset 'simclr'"):
    augment.get_preset("simclr")


def with_change(path, value, preset="simclr_imagenet"):
  config = augment.get_preset(preset).to_dict()
  op, name = path
  config[op][name] = value
  return ml_collections.ConfigDict(config)


@pytest.mark.parametrize("config, message", [
    (ml_collections.ConfigDict({"ops": ("random_resized_crop", "mixup")}),
     r"unknown augmentation ops \['mixup'\]"),
    (ml_collections.ConfigDict({"ops": ("flip", "flip")}), "more than once"),
    (ml_collections.ConfigDict({"flip": {"p": 0.5}}), "needs 'ops'"),
    (ml_collections.ConfigDict({"ops": "flip"}), "tuple of op names"),
    (ml_collections.ConfigDict({"ops": ("flip",), "flip": {"p": 0.5}, "flips": {}}),
     "unknown augmentation config keys"),
    (with_change(("flip", "p"), 1.5), r"flip.p=1.5"),
    (with_change(("blur", "p"), (1.0, -0.1)), r"blur.p=\(1.0, -0.1\)"),
    (with_change(("grayscale", "p"), True), "grayscale.p=True"),
    (with_change(("color_jitter", "strength"), 2.0), r"strength=2.0 .* \(0.0, 1.25\]"),
    (with_change(("color_jitter", "strength"), 0.0), "strength=0.0"),
    (with_change(("color_jitter", "brightness_impl"), "v3"), "brightness_impl='v3'"),
    (with_change(("color_jitter", "hue"), 0.1), r"unknown parameters \['hue'\]"),
    (with_change(("random_resized_crop", "area_min"), 0.0), "area_min=0.0"),
    (with_change(("random_resized_crop", "area_max"), 0.05), "area_max=0.05"),
    (with_change(("random_resized_crop", "max_attempts"), 0), "max_attempts=0"),
    (with_change(("blur", "sigma_max"), 0.05), "sigma_max=0.05"),
])
def test_validate_rejects_bad_configs(config, message):
  with pytest.raises(ValueError, match=message):
    augment.validate(config)
  with pytest.raises(ValueError, match=message):
    augment.build_augmentation(config, 32)


def test_config_errors_outside_validate():
  with pytest.raises(ValueError, match="image_size=0"):
    augment.build_augmentation(augment.get_preset("none"), 0)
  with pytest.raises(ValueError, match="not in ops"):
    augment.make_config(("flip",), blur={"p": 1.0})
  with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
    augment.build_augmentation(augment.get_preset("none"), 8)(jax.random.key(0), jnp.zeros((8, 8)))
  augment.validate(augment.make_config(("cutout", "gaussian_noise", "sobel", "center_crop")))
