r"""FLOPs of the pure-JAX augmentations per view against a ResNet-50 training step per image.

  python experiments/benchmarks/augment_flops.py [--image_size=224] [--source_sizes=224,448]
      [--preset=simclr_imagenet] [--batch_size=4]

The 'jax' augmentation backend is what GPUs and TPUs run. For each op of the preset (alone, with
p=1, on float32 images already at --image_size; the crop from each source size) and for the whole
preset, XLA's cost analysis of one jitted, vmapped batch, divided by the batch size. The
reference is the trainer's own pretraining step (benchmarks/train_step.py: both views through a
ResNet-50 at --image_size, forward and backward, NT-Xent, the online probe, SGD) divided by the
images it runs (2 views x batch).

Counts are of the program lowered for each platform ('tpu' lowers as 'cuda' does; the 'cpu'
lowering is what this machine runs), before XLA's optimisations: a compiled program can only be
had for the platform at hand, and on it fusion recomputes some elementwise work. XLA counts a
loop's body once whatever its trip count, so loops are unrolled for the count (`unrolled_loops`).
Nothing is timed: the figures do not depend on the machine's load.
"""
import argparse
import contextlib
import functools
import os
import sys
from unittest import mock

import jax
import jax.numpy as jnp

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from simclr_jax import augment  # noqa: E402
import train_step  # noqa: E402  (the trainer's step, as benchmarked there)

PLATFORMS = ("tpu", "cpu")


def _python_fori_loop(lower, upper, body, value):
  for step in range(lower, upper):
    value = body(step, value)
  return value


@contextlib.contextmanager
def unrolled_loops():
  """lax.scan fully unrolled and fori_loop as a Python loop (the augmentations' loops have
  static trip counts), so that every iteration is in the counted program."""
  with mock.patch.object(jax.lax, "scan", functools.partial(jax.lax.scan, unroll=True)), \
       mock.patch.object(jax.lax, "fori_loop", _python_fori_loop):
    yield


def flops(jitted, *arguments, platform: str) -> float:
  lowered = jitted.trace(*arguments).lower(lowering_platforms=(platform,))
  return float(lowered.cost_analysis()["flops"])


def augmentation_flops(config, image_size: int, source_size: int, batch_size: int
                       ) -> dict[str, float]:
  """{platform: FLOPs per view} of `config` on float32 [source_size, source_size, 3] images."""
  augment_view = augment.build_augmentation(config, image_size, backend="jax")
  keys = jax.random.split(jax.random.key(0), batch_size)
  images = jnp.zeros((batch_size, source_size, source_size, 3), jnp.float32)
  with unrolled_loops():
    return {platform: flops(jax.jit(jax.vmap(augment_view)), keys, images,
                            platform=platform) / batch_size for platform in PLATFORMS}


def resnet50_flops(image_size: int, batch_size: int) -> dict[str, float]:
  """{platform: FLOPs per image} of the pretraining step of a ResNet-50 (XLA convolutions and
  nn.BatchNorm: the native CPU kernels are custom calls, which XLA does not count)."""
  step, (state, batch) = train_step.build_pretrain_step(
      train_step.model_config(50, 1.0, cifar_stem=False), batch_size=batch_size,
      image_size=image_size)
  return {platform: flops(step, state, batch, platform=platform) / (2 * batch_size)
          for platform in PLATFORMS}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--source_sizes", default="224,448",
                      help="sizes of the square images the crop reads, comma-separated")
  parser.add_argument("--preset", default="simclr_imagenet")
  parser.add_argument("--batch_size", type=int, default=4)
  args = parser.parse_args()
  size, batch = args.image_size, args.batch_size
  preset = augment.get_preset(args.preset)
  sources = [int(s) for s in args.source_sizes.split(",")]

  rows = []  # (what, {platform: FLOPs per view})
  for op in preset.ops:
    single = augment.make_config((op,), **{op: {**preset[op].to_dict(), "p": 1.0}})
    if op in augment.CROP_OPS:
      rows += [(f"{op} ({source}² -> {size}²)", augmentation_flops(single, size, source, batch))
               for source in sources]
    else:
      rows.append((op, augmentation_flops(single, size, size, batch)))
  for source in sources:
    rows.append((f"whole {args.preset} pipeline ({source}² -> {size}²)",
                 augmentation_flops(preset, size, source, batch)))
  step = resnet50_flops(size, batch)

  print(f"jax {jax.__version__}, batch {batch}, views {size}x{size}; ResNet-50 pretraining step "
        f"at {size} px (forward + backward + loss + update): "
        + ", ".join(f"{step[p] / 1e9:.2f} GFLOP per image lowered for {p}" for p in PLATFORMS))
  print()
  print("| op | GPU/TPU: MFLOP per view | % of the ResNet-50 step | CPU: MFLOP per view "
        "| % of the ResNet-50 step |")
  print("|---|---:|---:|---:|---:|")
  for what, counts in rows:
    cells = " | ".join(f"{counts[p] / 1e6:,.1f} | {100 * counts[p] / step[p]:.3f}%"
                       for p in PLATFORMS)
    print(f"| {what} | {cells} |")


if __name__ == "__main__":
  main()
