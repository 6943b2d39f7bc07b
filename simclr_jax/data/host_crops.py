"""Decoding and cropping on the host, uint8 in and uint8 out (4x less host-to-device traffic
than float32): the random resized crops of `HostCrop` (the augmentation config's
`random_resized_crop`, so host and device crops have one source) and the eval centre crop."""
import dataclasses

import tensorflow as tf

from simclr_jax import augment

CENTRE_CROP_FRACTION = 0.875
_CROP_DEFAULTS = augment.OP_DEFAULTS["random_resized_crop"]


@dataclasses.dataclass(frozen=True)
class HostCrop:
  """How the host samples its random resized crops: the augmentation config's
  `random_resized_crop` parameters (names and defaults of augment.OP_DEFAULTS), so host and device
  crops have one source. `p` (one number, or one per view) is the chance of cropping at all;
  otherwise the whole image is resized, as on the device."""
  p: float | tuple[float, ...] = _CROP_DEFAULTS["p"]
  area_min: float = _CROP_DEFAULTS["area_min"]
  area_max: float = _CROP_DEFAULTS["area_max"]
  aspect_ratio_min: float = _CROP_DEFAULTS["aspect_ratio_min"]
  aspect_ratio_max: float = _CROP_DEFAULTS["aspect_ratio_max"]
  max_attempts: int = _CROP_DEFAULTS["max_attempts"]
  min_object_covered: float = _CROP_DEFAULTS["min_object_covered"]

  def __post_init__(self):
    augment.validate({"ops": ("random_resized_crop",),
                      "random_resized_crop": dataclasses.asdict(self)})

  @classmethod
  def from_augment_config(cls, aug_config) -> "HostCrop | None":
    """The pipeline's random_resized_crop parameters; None if its `ops` have no such crop (then
    create_train_iterator refuses host crops)."""
    augment.validate(aug_config)
    aug_config = augment.resolve_config(aug_config)
    if "random_resized_crop" not in aug_config["ops"]:
      return None
    params = dict(aug_config.get("random_resized_crop", {}))
    if isinstance(params.get("p"), (list, tuple)):
      params["p"] = tuple(params["p"])
    return cls(**params)

  def probability(self, view: int) -> float:
    if not isinstance(self.p, tuple):
      return float(self.p)
    if view >= len(self.p):
      raise ValueError(f"random_resized_crop.p={self.p} has probabilities for {len(self.p)} "
                       f"views, but the host crops {view + 1} or more")
    return float(self.p[view])


ALLOWED_IMAGES = ("JPEG, PNG, GIF or BMP files (grayscale, CMYK, alpha and 16 bits per channel are "
                  "converted to 8-bit RGB)")


def decode_rgb(image_bytes: tf.Tensor) -> tf.Tensor:
  """Any PNG/JPEG/BMP/GIF; grayscale is repeated and alpha dropped, so the result is RGB."""
  return tf.io.decode_image(image_bytes, channels=3, expand_animations=False)


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
  """Bicubic to [size, size, 3] uint8. TF's bicubic kernel runs 10-15% faster on float32 than
  on uint8, and quantize clips (bicubic overshoots) and rounds in one pass where clip, round and
  cast take twice as long (ties round up instead of to even)."""
  resized = tf.image.resize(tf.cast(image, tf.float32), [size, size],
                            method=tf.image.ResizeMethod.BICUBIC)
  return tf.bitcast(tf.raw_ops.QuantizeV2(  # tf.quantization.quantize logs a deprecation
      input=resized, min_range=0.0, max_range=255.0, T=tf.quint8, mode="MIN_COMBINED",
      round_mode="HALF_AWAY_FROM_ZERO").output, tf.uint8)


def crop_window(image_shape: tf.Tensor, seed: tf.Tensor, crop: HostCrop, view: int
                 ) -> tf.Tensor:
  """[offset_y, offset_x, height, width] of the official random-resized-crop sampling."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
      min_object_covered=crop.min_object_covered,
      aspect_ratio_range=(crop.aspect_ratio_min, crop.aspect_ratio_max),
      area_range=(crop.area_min, crop.area_max), max_attempts=crop.max_attempts,
      use_image_if_no_bounding_boxes=True)
  window = tf.stack([begin[0], begin[1], size[0], size[1]])
  probability = crop.probability(view)
  if probability >= 1.0:
    return window
  coin = tf.random.stateless_uniform([], seed=tf.random.experimental.stateless_fold_in(seed, 1))
  whole_image = tf.stack([0, 0, image_shape[0], image_shape[1]])
  return tf.where(coin < probability, window, whole_image)


def random_resized_crops(image_bytes: tf.Tensor, seeds: list[tf.Tensor], size: int,
                          crop: HostCrop) -> tf.Tensor:
  """[V, size, size, 3] uint8, view v from seeds[v].

  A JPEG is decoded once and only inside the box holding every view's window
  (decode_and_crop_jpeg): less work than decoding the whole image, or each window on its own (a
  decode reads the compressed rows above its window too). experiments/results/
  host_crop_throughput.md measures it against the official per-image preprocessing.
  """

  def windows(image_shape):
    return tf.stack([crop_window(image_shape, seed, crop, view)
                     for view, seed in enumerate(seeds)])

  def resized_views(image, views):
    resized = []
    for view in tf.unstack(views):
      top, left, height, width = tf.unstack(view)
      resized.append(resize(image[top:top + height, left:left + width], size))
    return tf.stack(resized)

  def from_jpeg():
    views = windows(tf.image.extract_jpeg_shape(image_bytes))
    corner = tf.reduce_min(views[:, :2], axis=0)
    extent = tf.reduce_max(views[:, :2] + views[:, 2:], axis=0) - corner
    image = tf.image.decode_and_crop_jpeg(image_bytes, tf.concat([corner, extent], 0),
                                          channels=3)
    return resized_views(image, views - tf.concat([corner, [0, 0]], 0))

  def from_other_formats():
    image = decode_rgb(image_bytes)
    return resized_views(image, windows(tf.shape(image)))

  return tf.cond(tf.io.is_jpeg(image_bytes), from_jpeg, from_other_formats)


def centre_crop(image: tf.Tensor) -> tf.Tensor:
  """The central square keeping 87.5% of the shorter side (official `center_crop`)."""
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  side = tf.cast(tf.math.rint(CENTRE_CROP_FRACTION * tf.cast(tf.minimum(height, width),
                                                              tf.float32)), tf.int32)
  top, left = (height - side + 1) // 2, (width - side + 1) // 2
  return image[top:top + side, left:left + side]
