r"""Compile time of the pretraining step per model size, cold and from the persistent cache.

  python experiments/benchmarks/compile_time.py [--models=18:0.25,18:1,50:0.25]
      [--batch_size=64] [--image_size=32]

Every sweep run pays this before its first step. For each model (depth:width, CIFAR stem) the
trainer's update step (simclr_jax.jobs.pretrain.make_train_step, built as in train_step.py but
with the CIFAR augmentation on device, as pretraining runs it) is traced and lowered
(`jit(...).lower`), compiled by XLA cold, then lowered and compiled again after
`jax.clear_caches()` with JAX's persistent compilation cache on (a fresh temporary directory):
what a resumed or repeated identical run gets when `jax_compilation_cache_dir` is set. Times are
wall and (in brackets) this process's CPU seconds; ratios are of CPU time against the first
model's cold compile, measured in the same run.
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


def _timed(thunk):
  """(result, wall seconds, process CPU seconds) of thunk()."""
  wall, cpu = time.perf_counter(), time.process_time()
  result = thunk()
  return result, time.perf_counter() - wall, time.process_time() - cpu


def measure(depth: int, width: float, *, batch_size: int, image_size: int) -> dict:
  """Wall and CPU seconds to trace+lower, to compile cold, and to do both from the cache."""
  config = train_step.model_config(depth, width, cifar_stem=True)
  step, example_args = train_step.build_pretrain_step(config, batch_size=batch_size,
                                                      image_size=image_size,
                                                      augment_preset="simclr_cifar")
  lowered, lower_wall, lower_cpu = _timed(lambda: step.lower(*example_args))
  _, compile_wall, compile_cpu = _timed(lowered.compile)
  jax.clear_caches()
  _, cached_wall, cached_cpu = _timed(lambda: step.lower(*example_args).compile())
  return {"name": f"ResNet-{depth} w={width:g}", "lower": (lower_wall, lower_cpu),
          "compile": (compile_wall, compile_cpu), "cached": (cached_wall, cached_cpu)}


def table(rows: list[dict]) -> str:
  """Markdown of wall (CPU) seconds; the ratio uses CPU time, steadier on a shared machine."""
  base_cpu = rows[0]["compile"][1]
  lines = ["| model | trace+lower s wall (CPU) | XLA compile s wall (CPU) | "
           "compile CPU vs first | lower+compile from persistent cache s wall (CPU) |",
           "|---|---:|---:|---:|---:|"]
  for r in rows:
    cells = [f"{r[k][0]:.1f} ({r[k][1]:.1f})" for k in ("lower", "compile", "cached")]
    lines.append(f"| {r['name']} | {cells[0]} | {cells[1]} | {r['compile'][1] / base_cpu:.2f}x "
                 f"| {cells[2]} |")
  return "\n".join(lines)


def main(argv) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="18:0.25,18:1,50:0.25",
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
