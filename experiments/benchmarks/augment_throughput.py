"""Two-view augmentation throughput: on-device JAX (jit + vmap) vs per-image tf.image in tf.data.

Both sides run the same augmentation config (a `simclr_jax.augment` preset) on the same real
CIFAR-10 images, held in memory as uint8 so neither side measures decoding, in the same process
on the same CPU. The tf.data side is what the official SimCLR code does: a parallel `map` of
per-image `tf.image` calls (sample_distorted_bounding_box crop + bicubic resize, random flip,
colour jitter in random order, grayscale, depthwise-conv blur). The JAX side jits the trainer's
own `augment.augment_batch`: per-image keys, and `build_augmentation(...)` vmapped over the batch,
once per augmentation backend in `--backends` (by default the trainer's default, 'auto', which
is 'native' on CPU, then 'jax' for comparison; one row each). Rounds alternate between the
pipelines; medians are reported, as images per wall-clock second and per CPU-second of this
process (all its threads), which stays comparable when other jobs share the cores.

  PYTHONPATH=. python experiments/benchmarks/augment_throughput.py --data_dir=PATH/TO/TFDS
"""
import argparse
import datetime
import os
import statistics
import time

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from simclr_jax import augment
from simclr_jax import native

TF_SUPPORTED_OPS = ("random_resized_crop", "flip", "color_jitter", "grayscale", "blur")


def load_images(data_dir: str, count: int, size: int) -> np.ndarray:
  """The first `count` CIFAR-10 train images as uint8 [N, size, size, 3] (bicubic if resized)."""
  images = tfds.as_numpy(tfds.load("cifar10", split=f"train[:{count}]", data_dir=data_dir,
                                   batch_size=-1, download=False))["image"]
  if size != images.shape[1]:
    resized = tf.image.resize(images, (size, size), method="bicubic")
    images = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8).numpy()
  return images


def tf_view_function(config, size: int, view: int):
  """One augmented view with per-image tf.image ops, following the official data_util.py."""
  for op in config.ops:
    if op not in TF_SUPPORTED_OPS:
      raise ValueError(f"the tf.data reference implements {TF_SUPPORTED_OPS}, not {op!r}")

  def probability(op):
    p = config[op].p
    return float(p[view] if isinstance(p, (tuple, list)) else p)

  def random_apply(p, function, image):
    return tf.cond(tf.random.uniform([]) < p, lambda: function(image), lambda: image)

  def crop(image):
    params = config.random_resized_crop
    begin, crop_size, _ = tf.image.sample_distorted_bounding_box(
        tf.shape(image), tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        min_object_covered=params.min_object_covered,
        aspect_ratio_range=(params.aspect_ratio_min, params.aspect_ratio_max),
        area_range=(params.area_min, params.area_max), max_attempts=params.max_attempts,
        use_image_if_no_bounding_boxes=True)
    image = tf.slice(image, begin, crop_size)
    return tf.clip_by_value(tf.image.resize(image, (size, size), method="bicubic"), 0.0, 1.0)

  def jitter(image):
    params = config.color_jitter
    amount, hue = 0.8 * params.strength, 0.2 * params.strength
    if params.brightness_impl == "simclrv2":
      brightness = lambda x: x * tf.random.uniform([], max(1.0 - amount, 0.0), 1.0 + amount)
    else:
      brightness = lambda x: tf.image.random_brightness(x, amount)
    transforms = (brightness,
                  lambda x: tf.image.random_contrast(x, 1.0 - amount, 1.0 + amount),
                  lambda x: tf.image.random_saturation(x, 1.0 - amount, 1.0 + amount),
                  lambda x: tf.image.random_hue(x, hue))
    order = tf.random.shuffle(tf.range(4)) if params.random_order else tf.range(4)
    for position in range(4):
      image = tf.switch_case(order[position],
                             [lambda t=t: t(image) for t in transforms])
      image = tf.clip_by_value(image, 0.0, 1.0)
    return image

  def blur(image):
    params = config.blur
    sigma = tf.random.uniform([], params.sigma_min, params.sigma_max)
    radius = int(size * params.kernel_fraction) // 2
    offsets = tf.range(-radius, radius + 1, dtype=tf.float32)
    taps = tf.exp(-offsets ** 2 / (2.0 * sigma ** 2))
    taps /= tf.reduce_sum(taps)
    horizontal = tf.tile(tf.reshape(taps, [1, -1, 1, 1]), [1, 1, 3, 1])
    vertical = tf.tile(tf.reshape(taps, [-1, 1, 1, 1]), [1, 1, 3, 1])
    image = tf.nn.depthwise_conv2d(image[None], horizontal, [1, 1, 1, 1], "SAME")
    image = tf.nn.depthwise_conv2d(image, vertical, [1, 1, 1, 1], "SAME")[0]
    return tf.clip_by_value(image, 0.0, 1.0)

  functions = {
      "random_resized_crop": crop,
      "flip": tf.image.flip_left_right,
      "color_jitter": jitter,
      "grayscale": lambda x: tf.tile(tf.image.rgb_to_grayscale(x), [1, 1, 3]),
      "blur": blur,
  }

  def view_function(image):
    for op in config.ops:
      image = random_apply(probability(op), functions[op], image)
    return tf.clip_by_value(image, 0.0, 1.0)

  return view_function


def timed(run_pass):
  """(images per second, images per CPU-second) of `run_pass() -> number of images`."""
  start, start_cpu = time.perf_counter(), time.process_time()
  count = run_pass()
  return count / (time.perf_counter() - start), count / (time.process_time() - start_cpu)


def tf_pass(images: np.ndarray, config, size: int, batch_size: int) -> int:
  """One pass of the parallel tf.data map over `images`; returns the number of images."""
  views = [tf_view_function(config, size, view) for view in (0, 1)]

  def two_views(image):
    image = tf.cast(image, tf.float32) / 255.0
    return views[0](image), views[1](image)

  dataset = (tf.data.Dataset.from_tensor_slices(images)
             .map(two_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
             .batch(batch_size).prefetch(tf.data.AUTOTUNE))
  return sum(int(first.shape[0]) for first, _ in dataset)


def jax_two_views(config, size: int, backend: str):
  """jit(the trainer's two views of a uint8 batch), keys from (step, global index)."""
  augment_view = augment.build_augmentation(config, size, backend=backend)
  return jax.jit(lambda base_key, step, images, indices: augment.augment_batch(
      augment_view, images, indices, base_key, step, num_views=2))


def jax_pass(two_views, images: np.ndarray, batch_size: int) -> int:
  """One pass over `images` (host-to-device copies included); returns the number of images.

  Steps are dispatched asynchronously, as in a training loop; the pass waits for the last one.
  """
  base_key = jax.random.key(0)
  views = None
  for step, first in enumerate(range(0, len(images) - batch_size + 1, batch_size)):
    batch = jax.device_put(images[first:first + batch_size])
    indices = np.arange(first, first + batch_size, dtype=np.int32)
    views = two_views(base_key, step, batch, indices)
  jax.block_until_ready(views)
  return (len(images) // batch_size) * batch_size


def measure(data_dir: str, preset: str, size: int, count: int, batch_size: int, rounds: int,
            backends: list[str]):
  """Medians over `rounds` alternating passes: ((tf images/s, per CPU-s), [(JAX ditto) per
  backend])."""
  config = augment.get_preset(preset)
  images = load_images(data_dir, count, size)
  two_views = [jax_two_views(config, size, backend) for backend in backends]
  for function in two_views:
    jax_pass(function, images[:batch_size], batch_size)  # compile
  tf_pass(images[:batch_size], config, size, batch_size)  # trace
  tf_rates, jax_rates = [], [[] for _ in backends]
  for _ in range(rounds):
    tf_rates.append(timed(lambda: tf_pass(images, config, size, batch_size)))
    for function, rates in zip(two_views, jax_rates):
      rates.append(timed(lambda: jax_pass(function, images, batch_size)))
  median = lambda rates: tuple(statistics.median(column) for column in zip(*rates))
  return median(tf_rates), [median(rates) for rates in jax_rates]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", required=True, help="TFDS data_dir with cifar10 prepared")
  parser.add_argument("--num_images", type=int, default=4096, help="images per pass at 32 px")
  parser.add_argument("--batch_size", type=int, default=256, help="batch at 32 px")
  parser.add_argument("--num_images_224", type=int, default=128,
                      help="images per pass for simclr_imagenet at 224 px (CIFAR-10 upscaled "
                      "bicubically); 0 skips it")
  parser.add_argument("--batch_size_224", type=int, default=32, help="batch at 224 px")
  parser.add_argument("--rounds", type=int, default=3, help="alternating passes per pipeline")
  parser.add_argument("--backends", default="auto,jax",
                      help="augmentation backends of the JAX side, one row each (of "
                      f"{', '.join(native.backend_choices('augment_backend'))})")
  args = parser.parse_args()
  tf.config.set_visible_devices([], "GPU")
  backends = args.backends.split(",")
  resolved = [native.resolve_backend("augment_backend", backend) for backend in backends]

  runs = [("simclr_cifar", 32, args.num_images, args.batch_size)]
  if args.num_images_224:
    runs.append(("simclr_imagenet", 224, args.num_images_224, args.batch_size_224))
  print(f"{datetime.date.today()}  jax {jax.__version__} ({jax.devices()[0].platform}), "
        f"tensorflow {tf.__version__}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}, median of {args.rounds} rounds; two views per image\n")
  print("| preset | size | batch | tf.data + tf.image: images/s | per CPU-s | JAX backend "
        "| JAX jit+vmap: images/s | per CPU-s | JAX / TF: wall | per CPU-s |")
  print("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|")
  for preset, size, count, batch_size in runs:
    (tf_wall, tf_cpu), jax_rates = measure(args.data_dir, preset, size, count, batch_size,
                                           args.rounds, resolved)
    for backend, name, (jax_wall, jax_cpu) in zip(backends, resolved, jax_rates):
      label = name if backend == name else f"{name} ({backend})"
      print(f"| {preset} | {size} | {batch_size} | {tf_wall:,.0f} | {tf_cpu:,.0f} | {label} "
            f"| {jax_wall:,.0f} | {jax_cpu:,.0f} | {jax_wall / tf_wall:.1f}x "
            f"| {jax_cpu / tf_cpu:.1f}x |", flush=True)


if __name__ == "__main__":
  main()
