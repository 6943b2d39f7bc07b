"""Resume start-up: seconds and bytes read from creating the train iterator to its first batch.

  PYTHONPATH=. python experiments/benchmarks/resume_startup.py --data_dir=/tmp/resume_tfds \
      [--num_examples=200000 --batch_size=256 --num_files=64]

Why: a shard above input_pipeline.SHUFFLE_BUFFER_SIZE examples (ImageNet on one node: 1.28M)
cannot be cached, so the start-up of a resumed run is what the pipeline must read before the
first batch. The script prepares (once, into --data_dir) a TFDS dataset of --num_examples small
JPEGs in --num_files TFRecord files, like a prepared ImageNet in miniature, then resumes a
1-process run at several stream positions (fractions of an epoch, and into the second epoch) and
prints a markdown table. Images are decoded but not cropped (host_crop_views=0), so the times are
those of reading, not of augmenting.
"""
import argparse
import gc
import io
import time

import jax
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from simclr_jax import input_pipeline

_IMAGE_SIZE = 192  # random pixels: ~24 KB records (ImageNet's: ~110 KB)
_NUM_CLASSES = 10
_DISTINCT_IMAGES = 64  # encoded once, then repeated: generation is bound by writing, not JPEG


class ResumeBenchmark(tfds.core.GeneratorBasedBuilder):
  """--num_examples small JPEGs with labels, written by TFDS as any prepared dataset is."""

  VERSION = tfds.core.Version("1.0.0")
  num_examples = 200_000

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(_IMAGE_SIZE, _IMAGE_SIZE, 3)),
        "label": tfds.features.ClassLabel(num_classes=_NUM_CLASSES)}),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(self.num_examples)}

  def _generate_examples(self, count):
    rng = np.random.default_rng(0)
    images = []
    for _ in range(_DISTINCT_IMAGES):
      encoded = io.BytesIO()
      Image.fromarray(rng.integers(0, 256, (_IMAGE_SIZE, _IMAGE_SIZE, 3), np.uint8)).save(
          encoded, "JPEG")
      images.append(encoded.getvalue())
    for index in range(count):
      yield index, {"image": images[index % _DISTINCT_IMAGES], "label": index % _NUM_CLASSES}


def _prepare(data_dir: str, num_examples: int, num_files: int) -> None:
  ResumeBenchmark.num_examples = num_examples
  builder = ResumeBenchmark(data_dir=data_dir)
  if not builder.is_prepared():
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        num_shards=num_files, try_download_gcs=False))
  assert builder.info.splits["train"].num_examples == num_examples, (
      f"{data_dir} holds a dataset of another size; use a new --data_dir")


def _bytes_read() -> int:
  """Bytes this process has read from files so far (Linux; page-cache hits count too)."""
  with open("/proc/self/io") as io_counters:
    return int(next(line for line in io_counters if line.startswith("rchar:")).split()[1])


def _startup(data_dir: str, batch_size: int, start_step: int, repeats: int) -> tuple[float, int]:
  """(median seconds over `repeats`, bytes read by the last): the machine is shared, so single
  timings are noisy; the bytes read are not."""
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  seconds = []
  for _ in range(repeats):
    start, start_bytes = time.perf_counter(), _bytes_read()
    iterator = input_pipeline.create_train_iterator(
        ResumeBenchmark.name, data_dir=data_dir, split="train", global_batch_size=batch_size,
        image_size=_IMAGE_SIZE, host_crop_views=0, seed=0, start_step=start_step, mesh=mesh)
    jax.block_until_ready(next(iterator))
    seconds.append(time.perf_counter() - start)
    bytes_read = _bytes_read() - start_bytes
    iterator.close()
    del iterator
    gc.collect()  # stops its tf.data threads, which would read on into the next measurement
  return float(np.median(seconds)), bytes_read


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_dir", required=True, help="where the dataset is (or is prepared)")
  parser.add_argument("--num_examples", type=int, default=200_000)
  parser.add_argument("--num_files", type=int, default=64)
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--epoch_fractions", default="0,0.25,0.5,0.75,0.99,1.5,1.99",
                      help="resume positions, in epochs")
  args = parser.parse_args()
  _prepare(args.data_dir, args.num_examples, args.num_files)
  print(f"{args.num_examples} examples in {args.num_files} TFRecord files, batch "
        f"{args.batch_size}, limit (SHUFFLE_BUFFER_SIZE) {input_pipeline.SHUFFLE_BUFFER_SIZE}\n")
  _startup(args.data_dir, args.batch_size, 0, 1)  # warm-up: imports, first TFDS open
  print("| resume position (examples) | epoch | seconds to first batch | MB read |")
  print("|---:|---:|---:|---:|")
  for fraction in map(float, args.epoch_fractions.split(",")):
    start_step = int(fraction * args.num_examples) // args.batch_size
    seconds, bytes_read = _startup(args.data_dir, args.batch_size, start_step, args.repeats)
    print(f"| {start_step * args.batch_size:,} | {fraction:g} | {seconds:.2f} | "
          f"{bytes_read / 1e6:.0f} |", flush=True)


if __name__ == "__main__":
  main()
