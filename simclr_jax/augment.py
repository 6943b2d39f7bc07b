"""On-device augmentations: pure functions of (PRNG key, image), one key per image and view.

Every function takes one float32 image [H, W, 3] in [0, 1] and is jittable; `jax.vmap` it over a
batch of keys and images. Because each view's randomness comes only from its own key (the trainer
derives it from the step and the image's global index), views are reproducible and do not depend
on how the batch is split over devices.

A pipeline is a config: `ops`, an ordered tuple of op names, plus one sub-config of parameters per
op (defaults in `OP_DEFAULTS`). `get_preset` gives the official recipes, `make_config` a free list,
`validate` rejects bad configs before training, and `build_augmentation` turns a config into the
`(key, image) -> image` function the train step vmaps.

The SimCLR numbers follow google-research/simclr `data_util.py`: random resized crop sampled like
`tf.image.sample_distorted_bounding_box` (area [0.08, 1], aspect ratio [3/4, 4/3], 100 attempts,
whole image as fallback) with a bicubic resize; flip p=0.5; colour jitter p=0.8 with strength s
(brightness, contrast and saturation factors U[1-0.8s, 1+0.8s], hue shift U[-0.2s, 0.2s], random
order, clip after each); grayscale p=0.2; Gaussian blur p=0.5 with a kernel of 10% of the side and
sigma U[0.1, 2]. Every colour op equals its `tf.image` namesake (tested to 1e-4): brightness and
contrast are dm-pix's; saturation, hue and grayscale are written on RGB planes because that is
several times faster under vmap on CPU than dm-pix's HSV round trip and tensordot.

Backends (`build_augmentation(..., backend=)`, `config.augment_backend`): 'jax' runs every op as
above, on any device. 'native', the default on the CPU backend ('auto'), draws the same random
numbers in JAX and hands each run of consecutive ops of `native.AUGMENT_STEPS` to one C++ kernel
(`simclr_jax.native.run_augment_steps`) that takes every image through all of
them while it sits in cache; XLA on a CPU makes a dozen passes over the batch instead. The views
equal the JAX ones to float32 rounding (tests/test_native_augment.py); the speed is in
experiments/results/augment_throughput.md.
"""
import functools
from typing import Any, Callable, Mapping, Sequence

import dm_pix as pix
import jax
import jax.numpy as jnp
import ml_collections

from simclr_jax import native

# Every op and its default parameters. `p` is the probability of applying the op: one number for
# all views, or one number per view (e.g. SimCLRv2/BYOL-style blur `p=(1.0, 0.1)`), picked by the
# `view` argument of the function `build_augmentation` returns.
OP_DEFAULTS = {
    # Official SimCLR set.
    "random_resized_crop": dict(p=1.0, area_min=0.08, area_max=1.0, aspect_ratio_min=3 / 4,
                                aspect_ratio_max=4 / 3, max_attempts=100, min_object_covered=0.1),
    "flip": dict(p=0.5),
    "color_jitter": dict(p=0.8, strength=1.0, brightness_impl="simclrv2", random_order=True),
    "grayscale": dict(p=0.2),
    "blur": dict(p=0.5, kernel_fraction=0.1, sigma_min=0.1, sigma_max=2.0),
    # From BYOL (which uses p=(0.0, 0.2) per view); not in the official SimCLR code.
    "solarize": dict(p=0.2, threshold=0.5),
    # Extras tried by the CIFAR-100 reproduction.
    "center_crop": dict(p=1.0, proportion=0.875),
    "rotate90": dict(p=0.5),
    "cutout": dict(p=0.5, size=0.5),
    "gaussian_noise": dict(p=0.5, std=0.05),
    "sobel": dict(p=0.5),
}

PRESETS = {
    "simclr_imagenet": (("random_resized_crop", {}), ("flip", {}),
                        ("color_jitter", {"strength": 1.0}), ("grayscale", {}), ("blur", {})),
    "simclr_cifar": (("random_resized_crop", {}), ("flip", {}),
                     ("color_jitter", {"strength": 0.5}), ("grayscale", {})),
    "crop_flip": (("random_resized_crop", {}), ("flip", {})),
    "none": (),
}

BRIGHTNESS_IMPLS = ("simclrv2", "simclrv1")  # multiplicative factor / additive delta
# Contrast and saturation factors 1 ± 0.8s must stay non-negative (tf.image.random_contrast).
MAX_JITTER_STRENGTH = 1.25

Augmentation = Callable[..., jax.Array]


# ---------------------------------------------------------------------------------------------
# Colour ops, each equal to its tf.image counterpart (the tests check this to 1e-4).
#
# Saturation and hue are written on RGB planes instead of dm-pix's HSV round trip (one division
# per pixel), and the random-order jitter picks its ops per image with scalar selects (under
# vmap, `lax.switch` on a per-image index would run all four ops at each of the four steps).

BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # op codes of `apply_color_jitter`'s `order`

adjust_brightness = pix.adjust_brightness  # additive delta: tf.image.adjust_brightness (SimCLR v1)
adjust_contrast = pix.adjust_contrast


def scale_brightness(image: jax.Array, factor) -> jax.Array:
  """SimCLR v2 brightness: a multiplicative factor instead of tf.image's additive delta."""
  return image * factor


def to_grayscale(image: jax.Array) -> jax.Array:
  """tf.image.rgb_to_grayscale (Rec. 601 luma), tiled back to 3 channels like the official code.

  A weighted sum of the planes: dm-pix's tensordot + tile is ~3x slower under vmap on CPU.
  """
  luma = 0.2989 * image[..., 0] + 0.5870 * image[..., 1] + 0.1140 * image[..., 2]
  return jnp.broadcast_to(luma[..., None], image.shape)


def _saturation_and_hue_planes(red, green, blue, saturation, hue):
  """tf.image.adjust_saturation (S x factor, clipped) and adjust_hue (H + delta turns) on RGB
  planes, same value. The two commute (both keep V and touch only S or H), so one pass does both.

  Every channel is `minimum + chroma * piece(hue sextant)`: saturation scales the chroma (at
  most V), hue shifts the sextant. The sextant ends in a division, which XLA does not copy into
  each of its consumers, so it is computed once per pass instead of once per output plane (the
  jitter ran 3-10% faster than with a multiplication by 1 / chroma, in three A/B timings).
  """
  value = jnp.maximum(jnp.maximum(red, green), blue)
  minimum = jnp.minimum(jnp.minimum(red, green), blue)
  chroma = value - minimum
  numerator = jnp.where(value == green, blue - red + 2.0 * chroma, red - green + 4.0 * chroma)
  numerator = jnp.where(value == red, green - blue, numerator)
  sextant = numerator / jnp.where(chroma > 0, chroma, 1.0)
  sextant = sextant + 6.0 * hue
  sextant -= 6.0 * jnp.floor(sextant / 6.0)  # wrap to [0, 6); jnp.mod is 3x slower on CPU
  chroma = jnp.minimum(chroma * saturation, value)
  minimum = value - chroma
  return (minimum + chroma * jnp.clip(jnp.abs(sextant - 3.0) - 1.0, 0.0, 1.0),
          minimum + chroma * jnp.clip(2.0 - jnp.abs(sextant - 2.0), 0.0, 1.0),
          minimum + chroma * jnp.clip(2.0 - jnp.abs(sextant - 4.0), 0.0, 1.0))


def _on_planes(function, image, *args):
  return jnp.stack(function(image[..., 0], image[..., 1], image[..., 2], *args), axis=-1)


def adjust_saturation(image: jax.Array, factor) -> jax.Array:
  """tf.image.adjust_saturation: saturation x factor (clipped to [0, 1]), same hue and value."""
  return _on_planes(_saturation_and_hue_planes, image, factor, 0.0)


def adjust_hue(image: jax.Array, delta) -> jax.Array:
  """tf.image.adjust_hue: rotates the hue by `delta` turns, in [-1, 1]."""
  return _on_planes(_saturation_and_hue_planes, image, 1.0, delta)


def _brightness_gain_and_shift(brightness, brightness_impl: str):
  """Brightness as `gain * x + shift`: v2's factor is a gain, v1's delta a shift."""
  return (brightness, 0.0) if brightness_impl == "simclrv2" else (1.0, brightness)


def _brightness_contrast_planes(planes, codes, *, brightness, contrast, brightness_impl):
  """Brightness and/or contrast in the order of the two `codes` (other codes do nothing),
  clipping after each, as one pass over the planes.

  Both are `gain * x + shift` with gain >= 0, and clip(a * clip(y, l, h) + b, 0, 1) ==
  clip(a * y + b, clip(a * l + b, 0, 1), clip(a * h + b, 0, 1)), so the steps compose into one
  `clip(gain * x + shift, low, high)` per channel. Only contrast reads the image: the channel
  means of its input (after brightness if that comes first), one reduction per run because
  reductions are what costs on CPU.
  """
  brightness_gain, brightness_shift = _brightness_gain_and_shift(brightness, brightness_impl)
  brightness_first = (codes[0] == BRIGHTNESS) & (codes[1] == CONTRAST)
  pre_gain = jnp.where(brightness_first, brightness_gain, 1.0)
  pre_shift = jnp.where(brightness_first, brightness_shift, 0.0)
  means = [jnp.mean(jnp.clip(pre_gain * plane + pre_shift, 0.0, 1.0)) for plane in planes]
  gain, shift, low, high = 1.0, jnp.zeros(3), jnp.zeros(3), jnp.ones(3)
  for code in codes:
    is_brightness, is_contrast = code == BRIGHTNESS, code == CONTRAST
    step_gain = jnp.where(is_brightness, brightness_gain, jnp.where(is_contrast, contrast, 1.0))
    step_shift = jnp.where(is_brightness, brightness_shift,
                           jnp.where(is_contrast, (1.0 - contrast) * jnp.stack(means), 0.0))
    gain, shift = step_gain * gain, step_gain * shift + step_shift
    low = jnp.clip(step_gain * low + step_shift, 0.0, 1.0)
    high = jnp.clip(step_gain * high + step_shift, 0.0, 1.0)
  return tuple(jnp.clip(gain * plane + shift[c], low[c], high[c])
               for c, plane in enumerate(planes))


def apply_color_jitter(image: jax.Array, order: jax.Array, *, brightness, contrast, saturation,
                       hue, brightness_impl: str = "simclrv2") -> jax.Array:
  """The four colour ops with given factors in `order` (a permutation of BRIGHTNESS, CONTRAST,
  SATURATION, HUE), clipping to [0, 1] after each, as the official `color_jitter_rand`.

  `brightness` is a factor (simclrv2) or a delta (simclrv1). The order may be traced (per image
  under vmap) and no op is computed once per possible position: a run of brightness/contrast
  steps is one pass (`_brightness_contrast_planes`), and saturation and hue one pass each,
  merged into the first when they are neighbours. So the jitter is always two stages of (run,
  saturation/hue) and a last run. The stages are a `lax.scan` because XLA on CPU would fuse
  them into each other, recomputing every earlier stage for each output plane.
  """
  order = jnp.asarray(order)
  position = jnp.argsort(order)  # position[op] = its step
  first = jnp.minimum(position[SATURATION], position[HUE])
  second = jnp.maximum(position[SATURATION], position[HUE])
  merged = second == first + 1

  def run(start, stop):  # codes of the (at most two) steps in [start, stop), -1 for none
    steps = start + jnp.arange(2)
    return jnp.where(steps < stop, order[jnp.minimum(steps, 3)], -1)

  def saturation_and_hue(step, active):  # factors of the saturation/hue pass at `step`
    does = lambda op: active & ((order[step] == op) | merged)
    return jnp.where(does(SATURATION), saturation, 1.0), jnp.where(does(HUE), hue, 0.0)

  run_planes = functools.partial(_brightness_contrast_planes, brightness=brightness,
                                 contrast=contrast, brightness_impl=brightness_impl)

  def stage(planes, codes_and_factors):
    codes, saturation_factor, hue_delta = codes_and_factors
    return _saturation_and_hue_planes(*run_planes(planes, codes), saturation_factor,
                                      hue_delta), None

  stages = jax.tree.map(lambda *x: jnp.stack(x), (run(0, first), *saturation_and_hue(first, True)),
                        (run(first + 1, second), *saturation_and_hue(second, ~merged)))
  planes, _ = jax.lax.scan(stage, (image[..., 0], image[..., 1], image[..., 2]), stages)
  return jnp.stack(run_planes(planes, run(second + 1, 4)), axis=-1)


def sample_color_jitter(key: jax.Array, *, strength: float, brightness_impl: str = "simclrv2",
                        random_order: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The official colour distortion's random numbers: `(order, factors)` for
  `apply_color_jitter`. Brightness, contrast and saturation factors U[1-0.8s, 1+0.8s] (v1
  brightness: delta U[-0.8s, 0.8s]), hue shift U[-0.2s, 0.2s], order uniformly random."""
  # One draw for everything: each random-number call costs XLA compile and run time.
  uniform = jax.random.uniform(key, (8,))
  between = lambda u, low, high: low + u * (high - low)
  amount = 0.8 * strength
  if brightness_impl == "simclrv2":
    brightness = between(uniform[0], max(1.0 - amount, 0.0), 1.0 + amount)
  else:
    brightness = between(uniform[0], -amount, amount)
  # The ranks of 4 i.i.d. uniforms are a uniformly random permutation.
  order = jnp.argsort(uniform[4:]) if random_order else jnp.arange(4)
  return order, dict(brightness=brightness,
                     contrast=between(uniform[1], 1.0 - amount, 1.0 + amount),
                     saturation=between(uniform[2], 1.0 - amount, 1.0 + amount),
                     hue=between(uniform[3], -0.2 * strength, 0.2 * strength))


def color_jitter(key: jax.Array, image: jax.Array, *, strength: float,
                 brightness_impl: str = "simclrv2", random_order: bool = True) -> jax.Array:
  """The official colour distortion (`sample_color_jitter`) of one image."""
  order, factors = sample_color_jitter(key, strength=strength, brightness_impl=brightness_impl,
                                       random_order=random_order)
  return apply_color_jitter(image, order, **factors, brightness_impl=brightness_impl)


# ---------------------------------------------------------------------------------------------
# Geometry.

def sample_crop_box(key: jax.Array, height: int, width: int, *, area_range=(0.08, 1.0),
                    aspect_ratio_range=(3 / 4, 4 / 3), max_attempts: int = 100,
                    min_object_covered: float = 0.1) -> jax.Array:
  """Samples a crop `[top, left, crop_height, crop_width]` (int32) like the official code.

  Vectorised `tf.image.sample_distorted_bounding_box` with the whole image as the object box:
  every attempt draws an aspect ratio (width/height) uniformly, then an integer height uniformly
  between the heights giving the minimum and the maximum area, rounds the width, and is rejected
  if it leaves the area range, the image, or covers less than `min_object_covered` of it. All
  attempts are drawn at once and the first valid one is kept; none valid gives the whole image.
  As in TF, offsets are uniform in [0, side - crop_side) (so only a full-size crop reaches the
  last row or column).
  """
  uniform = jax.random.uniform(key, (2 * max_attempts + 2,))
  ratio_uniform, height_uniform = uniform[:max_attempts], uniform[max_attempts:-2]
  ratio = aspect_ratio_range[0] + ratio_uniform * (aspect_ratio_range[1] - aspect_ratio_range[0])
  image_area = float(height * width)
  min_area = jnp.float32(area_range[0] * image_area)
  max_area = jnp.float32(area_range[1] * image_area)
  crop_height = jnp.round(jnp.sqrt(min_area / ratio))
  max_height = jnp.round(jnp.sqrt(max_area / ratio))
  # Largest height whose rounded width still fits in the image.
  fitting_height = jnp.floor((width + 0.5 - 1e-7) / ratio)
  fitting_height = jnp.where(jnp.round(fitting_height * ratio) > width, fitting_height - 1,
                             fitting_height)
  max_height = jnp.where(jnp.round(max_height * ratio) > width, fitting_height, max_height)
  max_height = jnp.minimum(max_height, height)
  crop_height = jnp.minimum(crop_height, max_height)
  crop_height += jnp.floor(height_uniform * (max_height - crop_height + 1))
  crop_width = jnp.round(crop_height * ratio)
  # TF's repair of rounding errors: one step up if too small, then one step down if too large.
  too_small = crop_width * crop_height < min_area
  crop_height = jnp.where(too_small, crop_height + 1, crop_height)
  crop_width = jnp.round(crop_height * ratio)
  too_large = crop_width * crop_height > max_area
  crop_height = jnp.where(too_large, crop_height - 1, crop_height)
  crop_width = jnp.round(crop_height * ratio)
  area = crop_width * crop_height
  valid = ((area >= min_area) & (area <= max_area) & (crop_width <= width)
           & (crop_height <= height) & (crop_width > 0) & (crop_height > 0)
           & (area / image_area >= min_object_covered))
  first = jnp.argmax(valid)
  found = valid[first]
  crop_height = jnp.where(found, crop_height[first], height).astype(jnp.int32)
  crop_width = jnp.where(found, crop_width[first], width).astype(jnp.int32)
  top = jnp.floor(uniform[-2] * (height - crop_height)).astype(jnp.int32)
  left = jnp.floor(uniform[-1] * (width - crop_width)).astype(jnp.int32)
  return jnp.stack([top, left, crop_height, crop_width])


def center_crop_box(height: int, width: int, proportion: float) -> jax.Array:
  """The official eval crop: a square keeping `proportion` of the shorter side, centred."""
  side = int(round(proportion * min(height, width)))
  return jnp.array([(height - side + 1) // 2, (width - side + 1) // 2, side, side], jnp.int32)


def _keys_cubic(distance):
  """Keys' cubic convolution kernel with a = -0.5 (tf.image.resize bicubic, jax.image 'cubic')."""
  distance = jnp.abs(distance)
  return jnp.where(distance <= 1.0, (1.5 * distance - 2.5) * distance * distance + 1.0,
                   jnp.where(distance < 2.0,
                             ((-0.5 * distance + 2.5) * distance - 4.0) * distance + 2.0, 0.0))


# tf.image.resize's bicubic kernel reads its weights from a table of the kernel at multiples of
# 1/1024 px (resize_bicubic_op.cc), so its sample positions are rounded to that grid: up to 7e-4
# off the exact kernel on random images, hence the rounding here too.
BICUBIC_TABLE_SIZE = 1024


def _bicubic_weights(length, output_size: int, taps_of: Callable[[jax.Array], jax.Array]
                     ) -> tuple[jax.Array, jax.Array]:
  """tf.image.resize's bicubic weights (no antialias) resizing `length` pixels to `output_size`,
  as its kernel computes them: half-pixel centres, Keys a=-0.5, no weight on pixels outside the
  crop and the rest renormalised to sum to 1. `taps_of(nearest_below)` gives the crop pixels
  [output_size, n] to weigh (only the 4 around each centre get any): returns them and their
  weights. `length` may be traced."""
  scale = jnp.asarray(length, jnp.float32) / output_size
  position = (jnp.arange(output_size, dtype=jnp.float32) + 0.5) * scale - 0.5
  nearest_below = jnp.floor(position)
  fraction = jnp.round((position - nearest_below) * BICUBIC_TABLE_SIZE) / BICUBIC_TABLE_SIZE
  taps = taps_of(nearest_below.astype(jnp.int32)[:, None])
  distance = fraction[:, None] - (taps - nearest_below[:, None])
  weights = jnp.where((taps >= 0) & (taps < length), _keys_cubic(distance), 0.0)
  return taps, weights / jnp.sum(weights, axis=1, keepdims=True)


def _resize_by_gathers(image: jax.Array, box: jax.Array, size: int) -> jax.Array:
  """4 gathered rows per output row, then 4 gathered columns per output column."""

  def along_rows(image, start, length):
    taps, weights = _bicubic_weights(length, size, lambda below: below + jnp.arange(-1, 3))
    rows = image.at[start + jnp.clip(taps, 0, length - 1)].get(mode="promise_in_bounds")
    return jnp.sum(rows * weights[..., None, None], axis=1)  # [size, 4, ..., C] -> [size, ..., C]

  rows = along_rows(image, box[0], box[2])  # [size, W, C]
  return jnp.swapaxes(along_rows(jnp.swapaxes(rows, 0, 1), box[1], box[3]), 0, 1)


def _resize_by_matmuls(image: jax.Array, box: jax.Array, size: int) -> jax.Array:
  """`rows @ plane @ columns.T` per channel plane, the weights as dense [size, H or W] matrices."""
  height, width, _ = image.shape
  rows, columns = (
      _bicubic_weights(length, size, lambda below: jnp.arange(image_side)[None] - start)[1]
      for start, length, image_side in ((box[0], box[2], height), (box[1], box[3], width)))
  matmul = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)  # no bf16 on TPU
  planes = matmul(matmul(rows, jnp.transpose(image, (2, 0, 1))), columns.T)
  return jnp.transpose(planes, (1, 2, 0))


def crop_and_resize(image: jax.Array, box: jax.Array, size: int) -> jax.Array:
  """tf.image.resize(tf.image.crop_to_bounding_box(image, *box), [size, size], 'bicubic') with
  `box` = [top, left, height, width], as the official `crop_and_resize`: the resize sees only
  the box's pixels (its border is the crop's), no antialias when shrinking. The box may be
  traced (a different one per image under vmap); the size is static.

  Separable, 4 taps per output along each axis. Accelerators gather them: 8 FLOPs per output
  element and axis, where dense weight matrices cost 2 H then 2 W. XLA's CPU backend runs the
  batched gathers 9-20x slower than matmuls by the dense matrices of the same weights (at 224
  px under vmap), so there it multiplies (experiments/results/augment_flops.md).
  """
  image, box = jnp.asarray(image), jnp.asarray(box, jnp.int32)
  return jax.lax.platform_dependent(
      image, box, cpu=functools.partial(_resize_by_matmuls, size=size),
      default=functools.partial(_resize_by_gathers, size=size))


def resize(image: jax.Array, size: int) -> jax.Array:
  """tf.image.resize(image, [size, size], 'bicubic'): crop_and_resize of the whole image."""
  height, width, _ = image.shape
  if (height, width) == (size, size):
    return image
  return crop_and_resize(image, jnp.array([0, 0, height, width]), size)


def rotate90(key: jax.Array, image: jax.Array) -> jax.Array:
  """Rotates a square image by 90, 180 or 270 degrees, each equally likely."""
  if image.shape[0] != image.shape[1]:
    raise ValueError(f"rotate90 needs a square image, got {image.shape[:2]}: put it after a crop")
  turns = jax.random.randint(key, (), 0, 3)
  rotations = [jnp.rot90(image, k, axes=(0, 1)) for k in (1, 2, 3)]
  return jnp.select([turns == 0, turns == 1], rotations[:2], rotations[2])  # no per-image switch


# ---------------------------------------------------------------------------------------------
# Other ops.

def blur_with_sigma(image: jax.Array, sigma, kernel_size: int) -> jax.Array:
  """The official `gaussian_blur`: separable Gaussian of 2 * (kernel_size // 2) + 1 taps, zero
  padding ('SAME'), as sums of shifted images (vmap turns dm-pix's depthwise convolution with a
  per-image kernel into a grouped convolution ~40x slower on CPU; the result is the same).

  The two passes run as a two-iteration loop: unrolled, XLA fuses whatever computed `image`
  into each of the shifted reads and recomputes it once per tap.
  """
  radius = kernel_size // 2
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  taps = jnp.exp(-offsets ** 2 / (2.0 * jnp.square(sigma)))
  taps = taps / jnp.sum(taps)

  def blur_along(axis: int, image: jax.Array) -> jax.Array:
    padding = [(0, 0)] * image.ndim
    padding[axis] = (radius, radius)
    padded = jnp.pad(image, padding)
    size = image.shape[axis]
    return sum(taps[t] * jax.lax.slice_in_dim(padded, t, t + size, axis=axis)
               for t in range(2 * radius + 1))

  return jax.lax.fori_loop(
      0, 2, lambda step, x: jax.lax.cond(step == 0, lambda y: blur_along(1, y),
                                         lambda y: blur_along(0, y), x), image)


def sample_blur(key: jax.Array, height: int, *, kernel_fraction: float, sigma_min: float,
                sigma_max: float) -> tuple[jax.Array, int]:
  """The official random blur's `(sigma, kernel_size)`: sigma U[min, max], a kernel
  `kernel_fraction` of the image's height."""
  sigma = jax.random.uniform(key, minval=sigma_min, maxval=sigma_max)
  return sigma, int(height * kernel_fraction + 1e-6)  # the official height // 10


def gaussian_blur(key: jax.Array, image: jax.Array, *, kernel_fraction: float, sigma_min: float,
                  sigma_max: float) -> jax.Array:
  """The official random blur (`sample_blur`) of one image."""
  sigma, kernel_size = sample_blur(key, image.shape[0], kernel_fraction=kernel_fraction,
                                   sigma_min=sigma_min, sigma_max=sigma_max)
  return jnp.clip(blur_with_sigma(image, sigma, kernel_size), 0.0, 1.0)


def cutout(image: jax.Array, center_y, center_x, side: int) -> jax.Array:
  """Zeroes a side x side square centred at (center_y, center_x), clipped at the borders."""
  rows = jnp.arange(image.shape[0])[:, None] - (center_y - side // 2)
  cols = jnp.arange(image.shape[1])[None, :] - (center_x - side // 2)
  inside = (rows >= 0) & (rows < side) & (cols >= 0) & (cols < side)
  return jnp.where(inside[..., None], 0.0, image)


def random_cutout(key: jax.Array, image: jax.Array, *, size: float) -> jax.Array:
  """Cutout (DeVries & Taylor 2017): square side `size` x the height, centre anywhere."""
  center = jax.random.randint(key, (2,), 0, jnp.array(image.shape[:2]))
  return cutout(image, center[0], center[1], max(1, int(round(size * image.shape[0]))))


def gaussian_noise(key: jax.Array, image: jax.Array, *, std: float) -> jax.Array:
  """Adds i.i.d. N(0, std^2) noise per pixel and channel, then clips to [0, 1]."""
  return jnp.clip(image + std * jax.random.normal(key, image.shape, image.dtype), 0.0, 1.0)


def sobel(image: jax.Array) -> jax.Array:
  """Per-channel Sobel gradient magnitude / 4 (a unit step edge gives 1), edges replicated."""
  padded = jnp.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
  height, width = image.shape[:2]
  shifted = lambda dy, dx: padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
  smooth_rows = shifted(-1, 1) + 2 * shifted(0, 1) + shifted(1, 1)
  smooth_rows_left = shifted(-1, -1) + 2 * shifted(0, -1) + shifted(1, -1)
  smooth_cols = shifted(1, -1) + 2 * shifted(1, 0) + shifted(1, 1)
  smooth_cols_up = shifted(-1, -1) + 2 * shifted(-1, 0) + shifted(-1, 1)
  gradient_x = smooth_rows - smooth_rows_left
  gradient_y = smooth_cols - smooth_cols_up
  return jnp.clip(jnp.sqrt(gradient_x ** 2 + gradient_y ** 2) / 4.0, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Configs.

def make_config(ops: Sequence[str], **params: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A pipeline config from an ordered list of op names; `params[name]` overrides defaults.

  Example: `make_config(('random_resized_crop', 'rotate90', 'cutout'), cutout={'size': 0.25})`.
  """
  unknown = sorted(set(ops) - set(OP_DEFAULTS))
  if unknown:
    raise ValueError(f"unknown augmentation ops {unknown}; known: {sorted(OP_DEFAULTS)}")
  extra = sorted(set(params) - set(ops))
  if extra:
    raise ValueError(f"parameters given for {extra}, which are not in ops {tuple(ops)}")
  config = ml_collections.ConfigDict({"ops": tuple(ops)})
  for name in ops:
    config[name] = ml_collections.ConfigDict({**OP_DEFAULTS[name], **params.get(name, {})})
  validate(config)
  return config


def resolve_config(aug_config) -> dict:
  """`config.augment` as the whole pipeline: {'ops': (...), op: {all its parameters}, ...}.

  A recipe names a preset and overrides only what it changes: {'preset': 'simclr_cifar',
  'ops': () (the preset's) or a tuple replacing them, 'random_resized_crop': {'area_min': 0.2}};
  parameters come from the block, then the preset, then OP_DEFAULTS. A config without 'preset'
  is taken as complete (the form `get_preset` and `make_config` return).
  """
  config = _as_dict(aug_config)
  if "preset" not in config:
    return config
  preset = config["preset"]
  if preset not in PRESETS:
    raise ValueError(f"unknown augmentation preset {preset!r}; known: {sorted(PRESETS)}")
  preset_params = dict(PRESETS[preset])
  ops = tuple(config.get("ops") or preset_params)
  overrides = {op: block for op, block in config.items() if op not in ("preset", "ops")}
  unknown = sorted(set(overrides) - set(OP_DEFAULTS))
  if unknown:
    raise ValueError(f"unknown augmentation config keys {unknown}; expected 'preset', 'ops' and "
                     f"op names from {sorted(OP_DEFAULTS)}")
  resolved = {"ops": ops}
  for op in [*ops, *overrides]:
    if op in OP_DEFAULTS:  # `validate` names unknown ops
      resolved[op] = {**OP_DEFAULTS[op], **preset_params.get(op, {}),
                      **dict(overrides.get(op, {}))}
  return resolved


def get_preset(name: str) -> ml_collections.ConfigDict:
  """'simclr_imagenet' (s=1, blur), 'simclr_cifar' (s=0.5, no blur), 'crop_flip', 'none'."""
  if name not in PRESETS:
    raise ValueError(f"unknown augmentation preset {name!r}; known: {sorted(PRESETS)}")
  return make_config([op for op, _ in PRESETS[name]],
                     **{op: overrides for op, overrides in PRESETS[name]})


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_probability(op: str, p) -> None:
  values = list(p) if isinstance(p, (tuple, list)) else [p]
  if not values or not all(_is_number(v) and 0.0 <= v <= 1.0 for v in values):
    raise ValueError(f"{op}.p={p!r}: a probability must be a number in [0, 1] or a non-empty "
                     "sequence of them (one per view)")


def _check_range(op: str, name: str, value, low: float, high: float, *,
                 low_open: bool = False) -> None:
  low_ok = _is_number(value) and (value > low if low_open else value >= low)
  if not (low_ok and value <= high):
    interval = f"{'(' if low_open else '['}{low}, {high}]"
    raise ValueError(f"{op}.{name}={value!r} must be a number in {interval}")


def _validate_op(op: str, params: Mapping[str, Any]) -> None:
  unknown = sorted(set(params) - set(OP_DEFAULTS[op]))
  if unknown:
    raise ValueError(f"unknown parameters {unknown} for augmentation op {op!r}; "
                     f"known: {sorted(OP_DEFAULTS[op])}")
  params = {**OP_DEFAULTS[op], **params}
  _check_probability(op, params["p"])
  if op == "random_resized_crop":
    _check_range(op, "area_min", params["area_min"], 0.0, 1.0, low_open=True)
    _check_range(op, "area_max", params["area_max"], params["area_min"], 1.0)
    _check_range(op, "aspect_ratio_min", params["aspect_ratio_min"], 0.0, float("inf"),
                 low_open=True)
    _check_range(op, "aspect_ratio_max", params["aspect_ratio_max"], params["aspect_ratio_min"],
                 float("inf"))
    _check_range(op, "min_object_covered", params["min_object_covered"], 0.0, 1.0)
    if not (isinstance(params["max_attempts"], int) and params["max_attempts"] >= 1):
      raise ValueError(f"{op}.max_attempts={params['max_attempts']!r} must be an integer >= 1")
  elif op == "color_jitter":
    _check_range(op, "strength", params["strength"], 0.0, MAX_JITTER_STRENGTH, low_open=True)
    if params["brightness_impl"] not in BRIGHTNESS_IMPLS:
      raise ValueError(f"{op}.brightness_impl={params['brightness_impl']!r}; allowed: "
                       f"{BRIGHTNESS_IMPLS} (multiplicative v2 / additive v1)")
    if not isinstance(params["random_order"], bool):
      raise ValueError(f"{op}.random_order={params['random_order']!r} must be True or False")
  elif op == "blur":
    _check_range(op, "kernel_fraction", params["kernel_fraction"], 0.0, 1.0, low_open=True)
    _check_range(op, "sigma_min", params["sigma_min"], 0.0, float("inf"), low_open=True)
    _check_range(op, "sigma_max", params["sigma_max"], params["sigma_min"], float("inf"))
  elif op == "solarize":
    _check_range(op, "threshold", params["threshold"], 0.0, 1.0)
  elif op == "center_crop":
    _check_range(op, "proportion", params["proportion"], 0.0, 1.0, low_open=True)
  elif op == "cutout":
    _check_range(op, "size", params["size"], 0.0, 1.0, low_open=True)
  elif op == "gaussian_noise":
    _check_range(op, "std", params["std"], 0.0, float("inf"))


def _as_dict(config) -> dict:
  return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)


def validate(aug_config) -> None:
  """Raises ValueError naming the bad op or value: unknown ops or parameters, bad numbers.

  Parameters of ops that are not in `ops` are checked too but do not switch the op on, so a sweep
  can toggle an op through `ops` alone.
  """
  config = resolve_config(aug_config)
  if "ops" not in config:
    raise ValueError(f"augmentation config needs 'ops' (an ordered tuple of op names); got keys "
                     f"{sorted(config)}")
  ops = config["ops"]
  if isinstance(ops, str) or not all(isinstance(op, str) for op in ops):
    raise ValueError(f"ops={ops!r} must be a tuple of op names from {sorted(OP_DEFAULTS)}")
  unknown = sorted(set(ops) - set(OP_DEFAULTS))
  if unknown:
    raise ValueError(f"unknown augmentation ops {unknown}; known: {sorted(OP_DEFAULTS)}")
  repeated = sorted({op for op in ops if list(ops).count(op) > 1})
  if repeated:
    raise ValueError(f"ops {repeated} appear more than once in {tuple(ops)}")
  unknown_keys = sorted(set(config) - set(OP_DEFAULTS) - {"ops"})
  if unknown_keys:
    raise ValueError(f"unknown augmentation config keys {unknown_keys}; expected 'ops' and op "
                     f"names from {sorted(OP_DEFAULTS)}")
  for op in OP_DEFAULTS:
    if op in config:
      if not isinstance(config[op], Mapping):
        raise ValueError(f"augmentation config {op!r} must hold the op's parameters, got "
                         f"{config[op]!r}")
      _validate_op(op, config[op])


# ---------------------------------------------------------------------------------------------
# The pipeline.

def _crop_box_function(op: str, params: Mapping[str, Any]):
  """`fn(key, height, width) -> box` for a crop op with its parameters bound."""
  if op == "random_resized_crop":
    return lambda key, height, width: sample_crop_box(
        key, height, width, area_range=(params["area_min"], params["area_max"]),
        aspect_ratio_range=(params["aspect_ratio_min"], params["aspect_ratio_max"]),
        max_attempts=params["max_attempts"], min_object_covered=params["min_object_covered"])
  return lambda key, height, width: center_crop_box(height, width, params["proportion"])


def _arguments(params: Mapping[str, Any]) -> dict[str, Any]:
  """An op's parameters as keyword arguments of its function: all but the probability."""
  return {name: value for name, value in params.items() if name != "p"}


def _image_function(op: str, params: Mapping[str, Any]):
  """`fn(key, image) -> image` for a non-crop op with its parameters bound."""
  if op == "flip":
    return lambda key, image: pix.flip_left_right(image)
  if op == "rotate90":
    return rotate90
  if op == "color_jitter":
    return lambda key, image: color_jitter(key, image, **_arguments(params))
  if op == "grayscale":
    return lambda key, image: to_grayscale(image)
  if op == "blur":
    return lambda key, image: gaussian_blur(key, image, **_arguments(params))
  if op == "solarize":
    return lambda key, image: pix.solarize(image, params["threshold"])
  if op == "cutout":
    return lambda key, image: random_cutout(key, image, size=params["size"])
  if op == "gaussian_noise":
    return lambda key, image: gaussian_noise(key, image, std=params["std"])
  if op == "sobel":
    return lambda key, image: sobel(image)
  raise ValueError(f"unknown augmentation op {op!r}; known: {sorted(OP_DEFAULTS)}")


CROP_OPS = ("random_resized_crop", "center_crop")


def _native_numbers_function(op: str, params: Mapping[str, Any]):
  """`fn(key, apply, height) -> numbers` for a non-crop op of `native.AUGMENT_STEPS`: its step's
  numbers in the native kernel (see `Step` in native/augment_kernels.cc), drawn from `key` as the
  op's JAX function draws them. `apply` is the op's coin, `height` the image's."""
  if op in ("flip", "grayscale"):
    return lambda key, apply, height: (apply,)
  if op == "color_jitter":
    def jitter_numbers(key, apply, height):
      order, factors = sample_color_jitter(key, **_arguments(params))
      return (apply, order, *_brightness_gain_and_shift(factors["brightness"],
                                                        params["brightness_impl"]),
              factors["contrast"], factors["saturation"], factors["hue"])
    return jitter_numbers
  if op == "blur":
    def blur_numbers(key, apply, height):
      sigma, kernel_size = sample_blur(key, height, **_arguments(params))
      return (apply, sigma, kernel_size // 2)
    return blur_numbers
  raise ValueError(f"augmentation op {op!r} has no native kernel; those with one: "
                   f"{sorted(native.AUGMENT_STEPS)}")


def build_augmentation(aug_config, image_size: int, *, crop_on_device: bool = True,
                       backend: str = "auto") -> Augmentation:
  """The pipeline as `augment(key, image, view=0) -> [image_size, image_size, 3]` float32.

  `image` is [H, W, 3], float in [0, 1] or uint8. A crop op crops and resizes to image_size (when
  the coin says no, it resizes the whole image); a pipeline without crop ops resizes first if the
  size differs. `crop_on_device=False` drops 'random_resized_crop' because the host pipeline
  already cropped. `view` (a Python int) picks the probability of ops whose `p` is per view.
  `backend` is `config.augment_backend` ('auto', 'jax' or 'native', see
  `native.resolve_backend`): 'native' runs each run of consecutive ops of `native.AUGMENT_STEPS`
  as one C++ kernel call, with the same random numbers and results.
  """
  validate(aug_config)
  if not (isinstance(image_size, int) and image_size >= 1):
    raise ValueError(f"image_size={image_size!r} must be a positive integer")
  native_ops = (native.AUGMENT_STEPS if native.resolve_backend("augment_backend", backend)
                == "native" else {})
  config = resolve_config(aug_config)
  ops = [op for op in config["ops"] if crop_on_device or op != "random_resized_crop"]
  params = {op: {**OP_DEFAULTS[op], **config.get(op, {})} for op in ops}
  functions = [_crop_box_function(op, params[op]) if op in CROP_OPS
               else _native_numbers_function(op, params[op]) if op in native_ops
               else _image_function(op, params[op]) for op in ops]
  resize_first = not any(op in CROP_OPS for op in ops)

  def probability(op: str, view: int) -> float:
    p = params[op]["p"]
    if not isinstance(p, (tuple, list)):
      return float(p)
    if not 0 <= view < len(p):
      raise ValueError(f"view={view} but {op}.p={tuple(p)} has probabilities for {len(p)} views")
    return float(p[view])

  def augment(key: jax.Array, image: jax.Array, view: int = 0) -> jax.Array:
    if image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"augment expects one RGB image [H, W, 3], got shape {image.shape}")
    if image.dtype == jnp.uint8:
      image = image.astype(jnp.float32) / 255.0
    image = image.astype(jnp.float32)
    if resize_first:
      image = jnp.clip(resize(image, image_size), 0.0, 1.0)
    if not ops:
      return jnp.clip(image, 0.0, 1.0)
    coins_key, ops_key = jax.random.split(key)
    coins = jax.random.uniform(coins_key, (len(ops),))
    op_keys = jax.random.split(ops_key, len(ops))
    height, width = image.shape[:2]
    native_steps = []  # (op, numbers) of the native ops not run yet
    for op, function, coin, k_op in zip(ops, functions, coins, op_keys):
      p = probability(op, view)
      apply = coin < p
      if op in CROP_OPS:
        box = jnp.where(apply, function(k_op, height, width),
                        jnp.array([0, 0, height, width], jnp.int32))
        height = width = image_size
      if op in native_ops:
        if op in CROP_OPS or p > 0.0:
          numbers = (box,) if op in CROP_OPS else function(k_op, apply, height)
          native_steps.append((op, numbers))
        continue
      image = native.run_augment_steps(image, native_steps, image_size)
      native_steps = []
      if op in CROP_OPS:
        image = jnp.clip(crop_and_resize(image, box, image_size), 0.0, 1.0)  # bicubic overshoot
      elif p >= 1.0:
        image = function(k_op, image)
      elif p > 0.0:  # a select: under vmap a cond would run both branches anyway
        image = jnp.where(apply, function(k_op, image), image)
    if native_steps:  # the kernel clips its views
      return native.run_augment_steps(image, native_steps, image_size)
    return jnp.clip(image, 0.0, 1.0)

  return augment


# ---------------------------------------------------------------------------------------------
# Batches.

def image_keys(base_key: jax.Array, step: jax.Array, indices: jax.Array) -> jax.Array:
  """fold_in(fold_in(base_key, step), global index) per image: a view depends on the image and
  the step, not on which device or process holds it."""
  step_key = jax.random.fold_in(base_key, step)
  return jax.vmap(lambda index: jax.random.fold_in(step_key, index))(indices)


def augment_batch(augment_view: Augmentation, images: jax.Array, indices: jax.Array,
                  base_key: jax.Array, step: jax.Array, *, num_views: int) -> jax.Array:
  """[num_views * n, S, S, 3] float views of n uint8 images: all first views, then all second.

  `augment_view` is `build_augmentation`'s function; `images` is [n, H, W, 3] (cropped on the
  device) or [n, num_views, S, S, 3] (cropped on the host, one crop per view). One view uses the
  image's key (`image_keys`); two views split it, one key per view.
  """
  if num_views not in (1, 2):
    raise ValueError(f"num_views={num_views!r}; allowed: 1 (probes, fine-tuning) or 2 (SimCLR)")
  keys = image_keys(base_key, step, indices)
  view_keys = keys[:, None] if num_views == 1 else jax.vmap(jax.random.split)(keys)
  images = (images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8
            else images.astype(jnp.float32))
  return jnp.concatenate([
      jax.vmap(functools.partial(augment_view, view=view))(
          view_keys[:, view], images[:, view] if images.ndim == 5 else images)
      for view in range(num_views)], axis=0)
