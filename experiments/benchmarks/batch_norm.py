r"""Batch norm's training pass (forward + backward) per CIFAR ResNet-18 map: nn.BatchNorm under
XLA against the native kernels (config.norm_backend), with a copy of the map as the yardstick.

  python experiments/benchmarks/batch_norm.py [--width_multiplier=0.25] [--images=128]
      [--calls=20] [--repeats=5] [--dtype=float32]

For each stage's map ([images, 32/2^k, 32/2^k, 64 * width * 2^k], float32, or bfloat16 as a
model with config.dtype='bfloat16' has them, the module then in bfloat16 too) times one jitted
forward + backward of simclr_jax.models.BatchNorm in training mode (batch statistics, running
averages updated) with the block's ReLU, and with the residual sum + ReLU that ends a block,
once with native=False (nn.BatchNorm's code) and once with native=True. The yardstick is XLA
computing 2 * x: one read and one write of the map, what any elementwise pass costs at least; the
native training pass reads or writes map-sized arrays 10-12 times. Times are the best of
--repeats windows of --calls calls; the process keeps freed memory mapped as the trainer does.
"""
import argparse
import datetime
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO_ROOT)
from simclr_jax import host_memory  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from simclr_jax import models  # noqa: E402
from simclr_jax.native import resolve_backend  # noqa: E402


def best_milliseconds(function, *args, calls: int, repeats: int) -> float:
  jax.block_until_ready(function(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      result = function(*args)
    jax.block_until_ready(result)
    best = min(best, (time.perf_counter() - start) / calls)
  return best * 1e3


def training_pass(native: bool, residual: bool, dtype):
  """jit(x, residual, dy) -> (y, batch_stats, gradients of x, params and residual)."""
  module = models.BatchNorm(use_running_average=False, native=native, dtype=dtype)

  def run(variables, x, residual_map, dy):
    def forward(params, x, residual_map):
      return module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                          residual=residual_map if residual else None, relu=True,
                          mutable=["batch_stats"])
    (y, stats), vjp = jax.vjp(forward, variables["params"], x, residual_map)
    return y, stats, vjp((dy, jax.tree.map(jnp.zeros_like, stats)))

  return module, jax.jit(run)


def main(argv) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--width_multiplier", type=float, default=0.25)
  parser.add_argument("--images", type=int, default=128, help="images per map (2 per pair)")
  parser.add_argument("--calls", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dtype", default="float32", choices=tuple(models.COMPUTE_DTYPES))
  args = parser.parse_args(argv)
  dtype = models.COMPUTE_DTYPES[args.dtype]
  host_memory.keep_freed_memory()
  resolve_backend("norm_backend", "native")  # says why, before measuring, if the kernels cannot run
  rng = np.random.default_rng(0)
  double = jax.jit(lambda x: 2.0 * x)
  print(f"Batch norm training pass (forward + backward, ReLU), jax {jax.__version__} on "
        f"{jax.devices()[0].platform} x{os.cpu_count()} cores, {args.dtype} maps, "
        f"{datetime.date.today().isoformat()}; milliseconds, best of {args.repeats} x "
        f"{args.calls} calls.\n")
  print("| map | MB | 2 * x (XLA) | nn.BatchNorm | native | native speed-up | + residual: "
        "nn.BatchNorm | + residual: native | native speed-up |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  for stage in range(4):
    side = 32 // 2**stage
    channels = models.scaled_channels(64 * 2**stage, args.width_multiplier)
    shape = (args.images, side, side, channels)
    x, residual_map, dy = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(3))
    copy_ms = best_milliseconds(double, x, calls=args.calls, repeats=args.repeats)
    times = []
    for residual in (False, True):
      for native in (False, True):
        module, run = training_pass(native, residual, dtype)
        variables = module.init(jax.random.key(0), x)
        times.append(best_milliseconds(run, variables, x, residual_map, dy, calls=args.calls,
                                       repeats=args.repeats))
    plain, plain_native, with_residual, with_residual_native = times
    print(f"| {'x'.join(map(str, shape))} | {x.nbytes / 1e6:.1f} | {copy_ms:.3f} | {plain:.3f} | "
          f"{plain_native:.3f} | {plain / plain_native:.2f}x | {with_residual:.3f} | "
          f"{with_residual_native:.3f} | {with_residual / with_residual_native:.2f}x |",
          flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
