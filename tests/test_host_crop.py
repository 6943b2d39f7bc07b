"""Host random resized crops follow the augmentation config's random_resized_crop (HostCrop).

The windows are checked against the device sampler (augment.sample_crop_box, a separate JAX
implementation of the same algorithm) and end to end on a generated image folder whose pixels
encode their coordinates, so a crop's pixels tell which window it came from.
"""
import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from simclr_jax import augment
from simclr_jax import input_pipeline

_SHAPE = (48, 64)  # height, width of the sampled images


def _host_windows(crop: input_pipeline.HostCrop, count: int) -> np.ndarray:
  """[count, 4] windows (top, left, height, width) of view 0 for seeds 0..count-1."""
  sample = lambda index: input_pipeline._crop_window(  # pylint: disable=protected-access
      tf.constant(_SHAPE + (3,)), tf.stack([index, tf.constant(7, tf.int64)]), crop, view=0)
  windows = tf.data.Dataset.range(count).map(sample).batch(count)
  return next(iter(windows)).numpy()


def _device_windows(params: dict, count: int) -> np.ndarray:
  box = lambda key: augment.sample_crop_box(
      key, *_SHAPE, area_range=(params["area_min"], params["area_max"]),
      aspect_ratio_range=(params["aspect_ratio_min"], params["aspect_ratio_max"]),
      max_attempts=params["max_attempts"], min_object_covered=params["min_object_covered"])
  return np.asarray(jax.vmap(box)(jax.random.split(jax.random.key(0), count)))


def test_a_recipe_s_preset_and_override_reach_the_host_crops():
  """Recipes name a preset and override what they change (configs/common.augment_config)."""
  recipe = {"preset": "simclr_imagenet", "ops": (), "random_resized_crop": {"area_min": 0.5}}
  assert input_pipeline.HostCrop.from_augment_config(recipe) == input_pipeline.HostCrop(
      area_min=0.5)
  assert input_pipeline.HostCrop.from_augment_config(
      {"preset": "simclr_imagenet", "ops": ("flip", "blur")}) is None


@pytest.mark.parametrize("overrides", [{}, {"area_min": 0.5}, {"area_max": 0.3},
                                       {"aspect_ratio_min": 2.0, "aspect_ratio_max": 3.0},
                                       {"min_object_covered": 0.6, "max_attempts": 3}])
def test_host_windows_follow_the_config_like_the_device_sampler(overrides):
  config = augment.make_config(("random_resized_crop", "flip"), random_resized_crop=overrides)
  crop = input_pipeline.HostCrop.from_augment_config(config)
  assert crop == input_pipeline.HostCrop(**overrides)
  params = {**augment.OP_DEFAULTS["random_resized_crop"], **overrides}
  host, device = _host_windows(crop, 2000), _device_windows(params, 2000)
  host_area, device_area = [w[:, 2] * w[:, 3] / np.prod(_SHAPE) for w in (host, device)]
  np.testing.assert_allclose(host_area.mean(), device_area.mean(), atol=0.02)
  np.testing.assert_allclose(np.mean(host_area == 1), np.mean(device_area == 1), atol=0.02)
  cropped = host_area < 1  # the whole image is the fallback when no attempt fits
  assert cropped.mean() > 0.3
  tolerance = 0.02  # one pixel of rounding on a 48 x 64 image
  assert (host_area[cropped] >= params["area_min"] - tolerance).all()
  assert (host_area[cropped] <= params["area_max"] + tolerance).all()
  assert (host_area[cropped] >= params["min_object_covered"] - tolerance).all()
  aspect = host[cropped, 3] / host[cropped, 2]
  assert (aspect >= params["aspect_ratio_min"] * 0.9).all()
  assert (aspect <= params["aspect_ratio_max"] * 1.1).all()


def test_host_crop_probability_keeps_the_whole_image_otherwise():
  whole = np.all(_host_windows(input_pipeline.HostCrop(p=0.25), 2000)
                 == [0, 0, *_SHAPE], axis=1)
  assert abs(whole.mean() - 0.75) < 0.04
  per_view = input_pipeline.HostCrop(p=(1.0, 0.0))
  assert per_view.probability(0) == 1.0 and per_view.probability(1) == 0.0
  with pytest.raises(ValueError, match=r"p=\(1.0, 0.0\) has probabilities for 2 views"):
    per_view.probability(2)


@pytest.fixture(scope="module")
def coordinate_folder(tmp_path_factory) -> str:
  """8 PNGs whose red channel is 4x and green channel 4y (x, y: the pixel's column and row)."""
  root = tmp_path_factory.mktemp("coordinates")
  y, x = np.mgrid[:64, :64]
  pixels = np.stack([4 * x, 4 * y, np.zeros_like(x)], -1).astype(np.uint8)
  (root / "train" / "a").mkdir(parents=True)
  for index in range(8):
    Image.fromarray(pixels).save(root / "train" / "a" / f"{index}.png")
  return f"{input_pipeline.FOLDER_PREFIX}{root}"


def _crop_area_fractions(folder: str, crop: input_pipeline.HostCrop) -> np.ndarray:
  """The area fraction of every crop of 8 batches, read from the coordinates in its pixels."""
  iterator = input_pipeline.create_train_iterator(
      folder, data_dir=None, split="train", global_batch_size=8, image_size=16,
      host_crop_views=2, host_crop=crop, seed=0,
      mesh=jax.make_mesh((8,), ("data",), devices=jax.devices()[:8]))
  images = np.concatenate([np.asarray(next(iterator)["image"]) for _ in range(8)])
  iterator.close()
  images = images.reshape(-1, 16, 16, 3).astype(np.float32)
  # 16 samples span 15/16 of the window; the pixels step by 4 per input pixel.
  extent = lambda channel: np.ptp(images[..., channel], axis=(1, 2)) / 4 * 16 / 15 / 64
  return extent(0) * extent(1)


def test_create_train_iterator_crops_as_host_crop_says(coordinate_folder):
  official = _crop_area_fractions(coordinate_folder, input_pipeline.HostCrop())
  large = _crop_area_fractions(coordinate_folder, input_pipeline.HostCrop(area_min=0.5))
  assert official.mean() < 0.5 < 0.6 < large.mean()
  assert official.min() < 0.3 and large.min() > 0.45
  whole = _crop_area_fractions(coordinate_folder, input_pipeline.HostCrop(p=0.0))
  np.testing.assert_allclose(whole, 1.0, atol=0.01)


def test_host_crops_need_a_random_resized_crop(coordinate_folder):
  assert input_pipeline.HostCrop.from_augment_config(augment.get_preset("none")) is None
  assert (input_pipeline.HostCrop.from_augment_config(augment.get_preset("simclr_imagenet"))
          == input_pipeline.HostCrop())
  with pytest.raises(ValueError, match=r"host_crop_views=2 .* host_crop=None.*"
                                       r"'random_resized_crop'"):
    input_pipeline.create_train_iterator(
        coordinate_folder, data_dir=None, split="train", global_batch_size=8, image_size=16,
        host_crop_views=2, host_crop=None, seed=0, mesh=jax.make_mesh((8,), ("data",)))
  with pytest.raises(ValueError, match=r"random_resized_crop.area_max=0.05 must be a number in"):
    input_pipeline.HostCrop(area_max=0.05)


def test_jpeg_crops_equal_bicubic_crops_of_the_decoded_image():
  """JPEGs decode once, only the box around both windows: the views must equal tf.image's
  bicubic resize of each window of the fully decoded image (up to the chroma upsampling at the
  box's edges and rounding)."""
  y, x = np.mgrid[:120, :160].astype(np.float32)
  pixels = np.stack([x * 1.5, y * 2, 128 + 60 * np.sin(x / 9) * np.cos(y / 7)], -1)
  jpeg = tf.io.encode_jpeg(pixels.round().astype(np.uint8), quality=95)
  decoded = tf.cast(tf.io.decode_jpeg(jpeg, channels=3), tf.float32)
  crop = input_pipeline.HostCrop()
  # pylint: disable=protected-access
  for index in range(12):
    seeds = [tf.constant([index, view], tf.int64) for view in range(2)]
    views = input_pipeline._random_resized_crops(jpeg, seeds, 32, crop)
    assert views.shape == (2, 32, 32, 3) and views.dtype == tf.uint8
    for view, seed in enumerate(seeds):
      top, left, height, width = input_pipeline._crop_window(
          tf.constant([120, 160, 3]), seed, crop, view).numpy()
      expected = tf.image.resize(decoded[top:top + height, left:left + width], [32, 32],
                                 method="bicubic")
      expected = np.clip(np.round(expected.numpy()), 0, 255)
      difference = np.abs(views[view].numpy().astype(np.float32) - expected)
      assert difference.mean() < 0.05 and difference.max() <= 2, (index, view)
