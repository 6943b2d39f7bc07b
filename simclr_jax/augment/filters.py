"""Blur, cutout, Gaussian noise and Sobel filtering: the official blur and the extras the
CIFAR-100 reproduction report tried."""
import jax
import jax.numpy as jnp


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
