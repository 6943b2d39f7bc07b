"""Host input pipeline throughput: decoded global batches per second, as the trainer receives them.

  PYTHONPATH=. python experiments/benchmarks/input_throughput.py --data_dir=PATH/TO/TFDS \
      [--dataset=cifar10 --batch_size=256 --num_batches=40]

Measures the iterators of simclr_jax.input_pipeline end to end (read, shuffle, decode, optional
host crops, batch, global jax.Array, prefetch thread) on all local devices, after a warm-up batch
whose time (file read into the cache, first shuffle) is reported separately, as is the time to
the first batch when resuming mid-epoch. Prints a markdown table.
"""
import argparse
import datetime
import os
import time

import jax
import tensorflow as tf

from simclr_jax import input_pipeline


def _measure(make_iterator, num_batches: int) -> tuple[float, float, float]:
  """(seconds to the first batch, batches/s, batches per CPU-second) over num_batches more.

  CPU time counts every thread of this process (tf.data, prefetch), so batches per CPU-second
  stays meaningful when other jobs share the cores and wall-clock rates do not.
  """
  start = time.perf_counter()
  iterator = iter(make_iterator())
  jax.block_until_ready(next(iterator))
  first_batch = time.perf_counter() - start
  start, start_cpu = time.perf_counter(), time.process_time()
  for _ in range(num_batches):
    jax.block_until_ready(next(iterator))
  rate = num_batches / (time.perf_counter() - start)
  cpu_rate = num_batches / (time.process_time() - start_cpu)
  iterator.close()
  return first_batch, rate, cpu_rate


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", required=True, help="TFDS data_dir holding the dataset")
  parser.add_argument("--dataset", default="cifar10")
  parser.add_argument("--split", default="train")
  parser.add_argument("--eval_split", default="test")
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--num_batches", type=int, default=40, help="timed batches per row")
  args = parser.parse_args()
  tf.config.set_visible_devices([], "GPU")

  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  info = input_pipeline.get_dataset_info(args.dataset, args.data_dir)
  steps_per_epoch = info.split_sizes[args.split] // args.batch_size
  common = dict(data_dir=args.data_dir, global_batch_size=args.batch_size,
                image_size=args.image_size, mesh=mesh)
  train = lambda views, start_step=0: lambda: input_pipeline.create_train_iterator(
      args.dataset, split=args.split, host_crop_views=views, seed=0, start_step=start_step,
      host_crop=input_pipeline.HostCrop(), **common)
  evaluation = lambda: input_pipeline.create_eval_iterator(
      args.dataset, split=args.eval_split, **common)
  num_eval_batches = len(evaluation())
  rows = [
      ("train, uint8 images (device crops)", train(0), args.num_batches),
      ("train, 2 host random-resized crops", train(2), args.num_batches),
      (f"train resumed mid-epoch (step {steps_per_epoch // 2 + 1}), uint8",
       train(0, steps_per_epoch // 2 + 1), args.num_batches),
      ("eval, centre crop/resize + mask padding", evaluation,
       min(args.num_batches, num_eval_batches - 1)),
  ]
  print(f"{args.dataset} {args.split}/{args.eval_split}, global batch {args.batch_size}, "
        f"image_size {args.image_size}, {jax.device_count()} {jax.default_backend()} device(s), "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
        f"{datetime.date.today().isoformat()}\n")
  print("| pipeline | first batch (s) | batches/s | images/s | images per CPU-second |")
  print("|---|---:|---:|---:|---:|")
  for name, make_iterator, num_batches in rows:
    first_batch, rate, cpu_rate = _measure(make_iterator, num_batches)
    print(f"| {name} | {first_batch:.2f} | {rate:.1f} | {rate * args.batch_size:,.0f} | "
          f"{cpu_rate * args.batch_size:,.0f} |", flush=True)


if __name__ == "__main__":
  main()
