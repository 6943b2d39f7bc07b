r"""Compile time of the pretraining step per model size, cold and from the persistent cache.

  python experiments/benchmarks/compile_time.py [--models=18:0.25,18:0.5,18:1,50:0.25]
      [--batch_size=64] [--image_size=32]

Every sweep run pays this before its first step. For each model (depth:width, CIFAR stem) the
trainer's update step (simclr_jax.train.make_train_step, built as in train_step.py but with the
CIFAR augmentation on device, as pretraining runs it) is traced and lowered (`jit(...).lower`), then compiled by XLA cold, then
compiled again after `jax.clear_caches()` with JAX's persistent compilation cache on (a fresh
temporary directory), which is what a resumed run or a repeated identical run gets when
`jax_compilation_cache_dir` is set. Ratios are against the first model's cold compile, measured
in the same run.
"""
import argparse
import datetime
import os
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # noqa: E402  (the benchmark's shared step builder, next to this file)


def parse_models(spec: str) -> list[tuple[int, float]]:
  """'18:0.25,50:1' -> [(18, 0.25), (50, 1.0)]."""
  models = []
  for item in spec.split(","):
    depth, sep, width = item.partition(":")
    try:
      models.append((int(depth), float(width)))
    except ValueError as e:
      raise ValueError(f"--models item {item!r} is not depth:width (e.g. 18:0.25)") from e
    if not sep:
      raise ValueError(f"--models item {item!r} is not depth:width (e.g. 18:0.25)")
  return models


def measure(depth: int, width: float, *, batch_size: int, image_size: int) -> dict:
  """Seconds to trace+lower, to compile cold, and to compile from the persistent cache."""
  config = train_step.model_config(depth, width, cifar_stem=True)
  step, example_args = train_step.build_pretrain_step(config, batch_size=batch_size,
                                                      image_size=image_size,
                                                      augment_preset="simclr_cifar")
  start = time.perf_counter()
  lowered = step.lower(*example_args)
  lower_seconds = time.perf_counter() - start
  start = time.perf_counter()
  lowered.compile()
  compile_seconds = time.perf_counter() - start
  jax.clear_caches()
  start = time.perf_counter()
  step.lower(*example_args).compile()
  cached_seconds = time.perf_counter() - start
  return {"name": f"ResNet-{depth} w={width:g}", "lower": lower_seconds,
          "compile": compile_seconds, "cached": cached_seconds}


def table(rows: list[dict]) -> str:
  base = rows[0]["compile"]
  lines = ["| model | trace+lower s | XLA compile s | compile vs first | "
           "lower+compile from persistent cache s |",
           "|---|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['name']} | {r['lower']:.1f} | {r['compile']:.1f} | "
                 f"{r['compile'] / base:.2f}x | {r['cached']:.1f} |")
  return "\n".join(lines)


def main(argv) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="18:0.25,18:0.5,18:1,50:0.25",
                      help="depth:width_multiplier items, CIFAR stem")
  parser.add_argument("--batch_size", type=int, default=64, help="image pairs per step")
  parser.add_argument("--image_size", type=int, default=32)
  args = parser.parse_args(argv)
  models = parse_models(args.models)
  with tempfile.TemporaryDirectory() as cache_dir:
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    rows = []
    for depth, width in models:
      rows.append(measure(depth, width, batch_size=args.batch_size, image_size=args.image_size))
      print(f"measured {rows[-1]['name']}", file=sys.stderr, flush=True)
  print(f"Pretraining step compile time (trainer step with simclr_cifar augmentation, float32, "
        f"SGD, NT-Xent + online probe, "
        f"{args.batch_size} pairs of {args.image_size} px, CIFAR stem), jax {jax.__version__} on "
        f"{jax.devices()[0].platform} x{os.cpu_count()} cores, "
        f"{datetime.date.today().isoformat()}\n")
  print(table(rows))


if __name__ == "__main__":
  try:
    main(sys.argv[1:])
  except ValueError as error:
    sys.exit(f"compile_time.py: error: {error}")
