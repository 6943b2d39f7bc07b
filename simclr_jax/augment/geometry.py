"""Crops and resizes: the official crop sampler, bicubic crop-then-resize as tf.image does it,
rotation by quarter turns."""
import functools
from typing import Callable

import jax
import jax.numpy as jnp


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
