"""Colour ops, each equal to its tf.image counterpart (the tests check this to 1e-4).

Saturation and hue are written on RGB planes instead of dm-pix's HSV round trip (one division per
pixel), and the random-order jitter picks its ops per image with scalar selects (under vmap,
`lax.switch` on a per-image index would run all four ops at each of the four steps).
"""
import functools

import dm_pix as pix
import jax
import jax.numpy as jnp


BRIGHTNESS_IMPLS = ("simclrv2", "simclrv1")  # multiplicative factor / additive delta
# Contrast and saturation factors 1 ± 0.8s must stay non-negative (tf.image.random_contrast).
MAX_JITTER_STRENGTH = 1.25
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


def brightness_gain_and_shift(brightness, brightness_impl: str):
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
  brightness_gain, brightness_shift = brightness_gain_and_shift(brightness, brightness_impl)
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
