"""Host crop throughput: two random resized crops per JPEG at 224 px, ours vs the official code's.

  PYTHONPATH=. python experiments/benchmarks/host_crop_throughput.py \
      --data_dir=../shared/data/tfds [--dataset=imagenette/160px-v2 --num_images=2048 --rounds=3]

Both sides turn the same in-memory JPEG bytes into two random resized crops (area [0.08, 1],
aspect ratio [3/4, 4/3], bicubic to 224 px) in a parallel tf.data map, batched by 64:
- official: google-research/simclr `data_util.py` per image, as its `data.py` maps it: TFDS
  decodes the whole image, `convert_image_dtype` to float32, then per view
  `distorted_bounding_box_crop` (sample_distorted_bounding_box + crop_to_bounding_box) and a
  bicubic `tf.image.resize`, views concatenated and clipped (float32 [224, 224, 6]); its flip and
  colour jitter are left out because ours run on the device. Its tf.data options (AUTOTUNE map,
  non-deterministic); a second row runs it with ours, to separate the options' share.
- ours: the map function of `input_pipeline.create_train_iterator(host_crop_views=2)`, with its
  tf.data options (deterministic, one intra-op thread), uint8 [2, 224, 224, 3] out.
- ours end to end: `create_train_iterator` itself (read from the files, shuffle, crops, batch,
  global jax.Arrays, prefetch thread), for what the rest of the pipeline adds.
The rows alternate for `--rounds` rounds. CPU time counts every thread of the process, so pairs
per CPU-second (the per-core rate) stays meaningful on shared cores where pairs/s does not; the
ratio compares rates of the same round. `--source_size=375x500` re-encodes the JPEGs at that
size first (ImageNet's typical shape) so decoding weighs as it does there.
"""
import argparse
import datetime
import itertools
import os
import statistics
import time
from typing import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from simclr_jax import input_pipeline

IMAGE_SIZE = 224
BATCH = 64
ACCELERATOR_RATES = {"H100-class ResNet-50": 2000, "TPU v3 core (paper)": 185}  # pairs/s


def _jpegs(dataset: str, data_dir: str, count: int, source_size: str) -> list[bytes]:
  records = tfds.builder(dataset, data_dir=data_dir).as_dataset(
      split=f"train[:{count}]", decoders={"image": tfds.decode.SkipDecoding()})
  jpegs = [record["image"] for record in records.as_numpy_iterator()]
  if source_size:
    height, width = map(int, source_size.split("x"))
    jpegs = [tf.io.encode_jpeg(tf.cast(tf.round(tf.clip_by_value(tf.image.resize(
        tf.io.decode_jpeg(jpeg, channels=3), [height, width], method="bicubic"), 0, 255)),
                                       tf.uint8), quality=90).numpy() for jpeg in jpegs]
  return jpegs


def _official_views(jpeg: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
  """google-research/simclr: preprocess_for_train's crop (crop_and_resize) for two views."""
  del index
  image = tf.image.convert_image_dtype(tf.io.decode_jpeg(jpeg, channels=3), tf.float32)
  views = []
  for _ in range(2):
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
        max_attempts=100, use_image_if_no_bounding_boxes=True)
    offset_y, offset_x, _ = tf.unstack(begin)
    height, width, _ = tf.unstack(size)
    crop = tf.image.crop_to_bounding_box(image, offset_y, offset_x, height, width)
    views.append(tf.image.resize([crop], [IMAGE_SIZE, IMAGE_SIZE], method="bicubic")[0])
  return tf.clip_by_value(tf.concat(views, -1), 0.0, 1.0)


def _our_views(jpeg: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
  """The host crops of create_train_iterator, seeded as it seeds them (epoch 0, seed 0)."""
  # pylint: disable=protected-access
  seed = input_pipeline._derived_seed(0, 0, input_pipeline._CROP_PURPOSE, index)
  seeds = [tf.random.experimental.stateless_fold_in(seed, view) for view in range(2)]
  return input_pipeline._random_resized_crops(  # pylint: disable=protected-access
      jpeg, seeds, IMAGE_SIZE, input_pipeline.HostCrop())


def _map_pipeline(jpegs: list[bytes], function, options: tf.data.Options):
  def batches() -> Iterator[tf.Tensor]:
    examples = tf.data.Dataset.from_tensor_slices(
        (tf.constant(jpegs), tf.range(len(jpegs), dtype=tf.int64)))
    return iter(examples.map(function, num_parallel_calls=tf.data.AUTOTUNE).batch(
        BATCH, drop_remainder=True).prefetch(tf.data.AUTOTUNE).with_options(options))
  return batches


def _end_to_end(args, num_images: int):
  mesh = jax.make_mesh((jax.device_count(),), ("data",))

  def batches() -> Iterator[dict[str, jax.Array]]:
    iterator = input_pipeline.create_train_iterator(
        args.dataset, data_dir=args.data_dir, split="train", global_batch_size=BATCH,
        image_size=IMAGE_SIZE, host_crop_views=2, host_crop=input_pipeline.HostCrop(), seed=0,
        mesh=mesh)
    yield from itertools.islice(iterator, num_images // BATCH)
    iterator.close()
  return batches


def _measure(make_batches) -> tuple[float, float]:
  """(pairs/s, pairs per CPU-second) after the first batch (start-up: threads, file read)."""
  batches = make_batches()
  jax.block_until_ready(next(batches))
  start, start_cpu = time.perf_counter(), time.process_time()
  count = 0
  for batch in batches:
    count += BATCH
    jax.block_until_ready(batch)
  return count / (time.perf_counter() - start), count / (time.process_time() - start_cpu)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", required=True, help="TFDS data_dir holding the dataset")
  parser.add_argument("--dataset", default="imagenette/160px-v2")
  parser.add_argument("--num_images", type=int, default=2048, help="JPEGs per timed pass")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--source_size", default="", help="HxW to re-encode the JPEGs at first")
  args = parser.parse_args()
  tf.config.set_visible_devices([], "GPU")
  jpegs = _jpegs(args.dataset, args.data_dir, args.num_images, args.source_size)
  shapes = np.array([tf.image.extract_jpeg_shape(jpeg).numpy()[:2] for jpeg in jpegs])
  official_options = tf.data.Options()
  official_options.deterministic = False
  rows = {
      "official: decode whole, float32 crop + resize": _map_pipeline(
          jpegs, _official_views, official_options),
      "official, with our tf.data options (one intra-op thread)": _map_pipeline(
          jpegs, _official_views, input_pipeline._tf_options()),  # pylint: disable=protected-access
      "ours: one decode_and_crop_jpeg, uint8 out": _map_pipeline(
          jpegs, _our_views, input_pipeline._tf_options()),  # pylint: disable=protected-access
  }
  if not args.source_size:
    rows["ours end to end (create_train_iterator)"] = _end_to_end(args, len(jpegs))
  for make_batches in rows.values():  # warm-up: tracing, thread pools
    _measure(make_batches)
  results = {name: [] for name in rows}
  for _ in range(args.rounds):
    for name, make_batches in rows.items():
      results[name].append(_measure(make_batches))

  official = [cpu_rate for _, cpu_rate in results[next(iter(rows))]]
  print(f"{args.dataset}{' re-encoded at ' + args.source_size if args.source_size else ''}: "
        f"{len(jpegs)} JPEGs, median {int(np.median(shapes[:, 0]))}x"
        f"{int(np.median(shapes[:, 1]))} px, mean {np.mean([len(j) for j in jpegs]) / 1e3:.1f} kB"
        f", two views to {IMAGE_SIZE} px; {args.rounds} rounds; {os.cpu_count()} CPUs, load "
        f"average {os.getloadavg()[0]:.1f}, {datetime.date.today().isoformat()}"
        + (f"; crops smaller than {IMAGE_SIZE} px are upsampled (all of them below "
           f"{IMAGE_SIZE} px images)" if np.median(shapes) < IMAGE_SIZE else "") + "\n")
  print("| pipeline | pairs/s | CPU-ms per pair | pairs per CPU-second (per core) | ratio to "
        "official per core (min-max) | cores for " + " | cores for ".join(
            f"{rate:,} pairs/s ({name})" for name, rate in ACCELERATOR_RATES.items()) + " |")
  print("|---|---:|---:|---:|---:|" + "---:|" * len(ACCELERATOR_RATES))
  for name, measured in results.items():
    rates, cpu_rates = zip(*measured)
    cpu_rate = statistics.median(cpu_rates)
    ratios = [ours / theirs for ours, theirs in zip(cpu_rates, official)]
    cores = " | ".join(f"{rate / cpu_rate:.2f}" for rate in ACCELERATOR_RATES.values())
    print(f"| {name} | {statistics.median(rates):,.0f} | {1e3 / cpu_rate:.3f} | "
          f"{cpu_rate:,.0f} ({min(cpu_rates):,.0f}-{max(cpu_rates):,.0f}) | "
          f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | {cores} |",
          flush=True)


if __name__ == "__main__":
  main()
