r"""Pretraining step speed on a GPU or TPU machine, beside the published anchors: one command.

  python experiments/benchmarks/accelerator_step.py [--per_device_batch=32] [--out=FILE.md]
  python experiments/benchmarks/accelerator_step.py --tiny   # the same code paths on a CPU

Measures on this host's devices (one process; a `data` mesh over `jax.local_devices()`), each
after a warm-up that compiles it:
  - the pretraining step of configs/imagenet_pretrain.py (ResNet-50, 224 px, bfloat16 compute,
    LARS, blur; host-cropped views as in the recipe) at --per_device_batch (default 32: the
    paper's 4096 over 128 TPU v3 cores), in image pairs/s;
  - the pretraining step of configs/cifar10_pretrain.py:r18 (CIFAR ResNet-18, 32 px) at the
    recipe's 512 images split over the devices (--cifar_per_device_batch overrides);
  - the recipe's device-side augmentation at 224 px alone (`simclr_imagenet` after the host
    crops: flip, colour jitter, grayscale, blur), in views/s.
Steps run on random uint8 images already on the devices: the input pipeline is not timed. The
'auto' backends resolve for this platform (XLA convolutions, JAX batch norm and augmentations
off CPU; the native CPU kernels on CPU). Times are the best of --repeats windows of --steps
steps. `--tiny` shrinks every model to a ResNet-18 at width 1/8 on 32 px views, 2 images per
device and one short window, to check the command on a CPU in seconds: its numbers mean nothing.

Anchors (per device, one 224 px pair = two images through the network):
  - SimCLR paper (Chen et al. 2020, section 2.3): 128 TPU v3 cores train ResNet-50 at batch
    4096 for 100 ImageNet epochs in ~1.5 hours: 100 x 1,281,167 / 5,400 s / 128 = 185 pairs/s
    per core, input pipeline and all.
  - NVIDIA DeepLearningExamples, PyTorch ResNet-50 v1.5, mixed precision, supervised: 2,470
    images/s on one A100 80GB (pytorch-21.03 container), i.e. at most 1,235 pairs/s.
"""
import argparse
import datetime
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(BENCHMARKS_DIR))
sys.path[:0] = [REPO_ROOT, BENCHMARKS_DIR]
from configs import cifar10_pretrain, imagenet_pretrain  # noqa: E402
from simclr_jax import augment, native, sharding  # noqa: E402
from simclr_jax.jobs import pretrain  # noqa: E402
from train_step import best_seconds_per_call  # noqa: E402

NUM_CLASSES = {"imagenet2012": 1000, "cifar10": 10}
IMAGENET_TRAIN_IMAGES = 1_281_167
# Train examples the step's schedule is sized by (its cost does not depend on them).
TRAIN_IMAGES = {"imagenet2012": IMAGENET_TRAIN_IMAGES, "cifar10": 50_000}
PAPER_PAIRS_PER_TPU_V3_CORE = 100 * IMAGENET_TRAIN_IMAGES / (1.5 * 3600) / 128
NVIDIA_A100_AMP_IMAGES_PER_SECOND = 2470
# (anchor, pairs/s per device) for the ResNet-50 row, by platform.
ANCHORS = {
    "tpu": ("SimCLR paper, ResNet-50 at 4096 on 128 TPU v3 cores (1.5 h for 100 epochs)",
            PAPER_PAIRS_PER_TPU_V3_CORE),
    "gpu": ("NVIDIA ResNet-50 v1.5 PyTorch AMP, supervised, one A100 80GB: 2,470 images/s",
            NVIDIA_A100_AMP_IMAGES_PER_SECOND / 2),
}


def resolve_backends(config: ml_collections.ConfigDict, platform: str | None = None
                     ) -> dict[str, str]:
  """config's conv/norm/augment backends resolved for `platform` (default: this run's)."""
  return {option: native.resolve_backend(option, config[option], platform)
          for option in ("conv_backend", "norm_backend", "augment_backend")}


def recipe(name: str, *, per_device_batch: int, num_devices: int, tiny: bool
           ) -> ml_collections.ConfigDict:
  """The recipe `name` ('imagenet' or 'cifar10') with its global batch over `num_devices`;
  `tiny` shrinks the model and views (ResNet-18 at width 1/8, 32 px)."""
  config = {"imagenet": imagenet_pretrain.get_config, "cifar10": cifar10_pretrain.get_config}[
      name]()
  config.global_batch_size = per_device_batch * num_devices
  if tiny:
    config.model.depth = 18
    config.model.width_multiplier = 0.125
    config.image_size = 32
  return config


def pretrain_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
                  platform: str | None = None) -> tuple[Callable, Callable[[], Any]]:
  """(the trainer's jitted pretraining step, a function making its initial state) for `config`
  on `mesh`, with the optimizer pretraining builds (LARS + the online probe's SGD) and the
  backends resolved for `platform`."""
  model = pretrain.create_model(config, NUM_CLASSES[config.dataset], platform=platform)
  optimizer, schedule, _ = pretrain.create_optimizer(config, TRAIN_IMAGES[config.dataset])
  augment_view = augment.build_augmentation(
      config.augment, config.image_size, crop_on_device=config.host_crop_views == 0,
      backend=resolve_backends(config, platform)["augment_backend"])
  step = pretrain.make_train_step(model, optimizer, augment_view, temperature=config.temperature,
                                  learning_rate_fn=schedule, mesh=mesh)
  return step, lambda: pretrain.create_train_state(model, optimizer, seed=config.seed,
                                                   image_size=config.image_size, mesh=mesh)


def batch_shapes(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                 ) -> dict[str, jax.ShapeDtypeStruct]:
  """The pretraining batch of `config` (global size), split over the mesh: uint8 images, host
  crops [B, 2, S, S, 3] when the recipe crops on the host, else whole S x S images."""
  size, batch = config.image_size, config.global_batch_size
  image_shape = (batch, 2, size, size, 3) if config.host_crop_views == 2 else (
      batch, size, size, 3)
  split = sharding.batch_sharded(mesh)
  return {"image": jax.ShapeDtypeStruct(image_shape, jnp.uint8, sharding=split),
          "index": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=split),
          "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=split)}


def random_batch(shapes: dict[str, jax.ShapeDtypeStruct], num_classes: int) -> dict:
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, shapes["image"].shape, dtype=np.uint8),
           "index": np.arange(shapes["index"].shape[0], dtype=np.int32),
           "label": rng.integers(0, num_classes, shapes["label"].shape).astype(np.int32)}
  return {name: jax.device_put(value, shapes[name].sharding) for name, value in batch.items()}


def warm_then_time(run: Callable[[], None], start: float, *, steps: int, repeats: int
                   ) -> dict[str, float]:
  """{'compile_seconds': from `start` through the first (compiling) run(), 'seconds': per run()
  after it, the best of `repeats` windows of `steps`}; run() must block."""
  run()
  compile_seconds = time.perf_counter() - start
  seconds, _ = best_seconds_per_call(run, calls=steps, repeats=repeats)
  return {"compile_seconds": compile_seconds, "seconds": seconds}


def measure_pretrain(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *, steps: int,
                     repeats: int) -> dict[str, float]:
  """{'compile_seconds' (state init + first step), 'seconds' per step (best window)}."""
  start = time.perf_counter()
  step, init_state = pretrain_step(config, mesh)
  holder = [init_state()]
  batch = random_batch(batch_shapes(config, mesh), NUM_CLASSES[config.dataset])

  def run():
    holder[0], metrics = step(holder[0], batch)
    jax.block_until_ready(metrics)

  return warm_then_time(run, start, steps=steps, repeats=repeats)


def measure_augment(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *, steps: int,
                    repeats: int) -> dict[str, float]:
  """The recipe's two views of a batch (the trainer's `augment.augment_batch`, per device shard):
  {'compile_seconds', 'seconds' per batch}."""
  start = time.perf_counter()
  augment_view = augment.build_augmentation(
      config.augment, config.image_size, crop_on_device=config.host_crop_views == 0,
      backend=resolve_backends(config)["augment_backend"])
  batch_spec, replicated_spec = jax.P(sharding.DATA_AXIS), jax.P()
  two_views = jax.jit(jax.shard_map(
      lambda images, indices, key, step: augment.augment_batch(augment_view, images, indices,
                                                               key, step, num_views=2),
      mesh=mesh, in_specs=(batch_spec, batch_spec, replicated_spec, replicated_spec),
      out_specs=batch_spec))
  batch = random_batch(batch_shapes(config, mesh), NUM_CLASSES[config.dataset])
  key = jax.device_put(jax.random.PRNGKey(0), sharding.replicated(mesh))
  counter = [0]

  def run():
    counter[0] += 1
    jax.block_until_ready(two_views(batch["image"], batch["index"], key, np.int32(counter[0])))

  return warm_then_time(run, start, steps=steps, repeats=repeats)


def describe(config: ml_collections.ConfigDict, *, augmentation_only: bool) -> str:
  """What a row ran: the network (or only the views) and the backends 'auto' resolved to."""
  backends = resolve_backends(config)
  if augmentation_only:
    return f"{config.image_size} px views, {backends['augment_backend']} augmentations"
  model = config.model
  return (f"ResNet-{model.depth} w={model.width_multiplier:g}, {config.image_size} px, "
          f"{config.dtype}; {backends['conv_backend']} convolutions, "
          f"{backends['norm_backend']} batch norm, {backends['augment_backend']} augmentations")


def table(rows: list[dict], num_devices: int) -> str:
  """Markdown: one row per measurement; rates per second and per device."""
  lines = ["| measurement | what ran | images | images per device | rate | unit "
           "| rate per device | s per call | first call s (compiling) |",
           "|---|---|---:|---:|---:|---|---:|---:|---:|"]
  for row in rows:
    rate = row["count"] / row["seconds"]
    lines.append(f"| {row['name']} | {row['model']} | {row['batch']} | "
                 f"{row['batch'] // num_devices} | {rate:,.1f} | {row['unit']}/s | "
                 f"{rate / num_devices:,.1f} | {row['seconds']:.4f} | "
                 f"{row['compile_seconds']:.1f} |")
  return "\n".join(lines)


def anchor_table(resnet50_pairs_per_device: float, platform: str) -> str:
  """The published per-device figures beside this run's ResNet-50 step (ratio on their own
  platform only)."""
  lines = ["| anchor | pairs/s per device | this run / anchor |", "|---|---:|---:|"]
  for anchor_platform, (name, pairs) in ANCHORS.items():
    ratio = (f"{resnet50_pairs_per_device / pairs:.2f}x" if anchor_platform == platform
             else f"n/a (this run: {platform})")
    lines.append(f"| {name} | {pairs:,.0f} | {ratio} |")
  return "\n".join(lines)


def main(argv: list[str]) -> str:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--per_device_batch", type=int, default=32,
                      help="ResNet-50 images per device (the paper: 4096 / 128 cores = 32)")
  parser.add_argument("--cifar_per_device_batch", type=int, default=0,
                      help="CIFAR ResNet-18 images per device (0: the r18 recipe's 512 over "
                      "the devices)")
  parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
  parser.add_argument("--repeats", type=int, default=3, help="timed windows; the best is kept")
  parser.add_argument("--tiny", action="store_true",
                      help="ResNet-18 width 1/8 at 32 px, 2 images per device, one window of "
                      "2 steps: checks the command on a CPU")
  parser.add_argument("--out", default="", help="also write the report (Markdown) here")
  args = parser.parse_args(argv)
  if args.tiny:
    args.per_device_batch, args.cifar_per_device_batch = 2, 2
    args.steps, args.repeats = 2, 1
  devices = jax.local_devices()
  num_devices = len(devices)
  mesh = sharding.create_mesh(devices)
  platform = devices[0].platform
  cifar_per_device = args.cifar_per_device_batch or max(
      1, cifar10_pretrain.get_config().global_batch_size // num_devices)
  for name, value in (("per_device_batch", args.per_device_batch),
                      ("cifar_per_device_batch", cifar_per_device), ("steps", args.steps),
                      ("repeats", args.repeats)):
    if value < 1:
      raise ValueError(f"--{name}={value} must be >= 1")
  header = (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, jax "
            f"{jax.__version__}, {num_devices} x {devices[0].device_kind} ({platform})"
            + (", --tiny (the command's check, not a measurement)" if args.tiny else ""))
  print(header, flush=True)

  imagenet = recipe("imagenet", per_device_batch=args.per_device_batch, num_devices=num_devices,
                    tiny=args.tiny)
  cifar = recipe("cifar10", per_device_batch=cifar_per_device, num_devices=num_devices,
                 tiny=args.tiny)
  timing = dict(steps=args.steps, repeats=args.repeats)
  rows = []
  for name, config, measure, unit, per_image in (
      ("pretrain step, imagenet_pretrain", imagenet, measure_pretrain, "pairs", 1),
      ("pretrain step, cifar10_pretrain:r18", cifar, measure_pretrain, "pairs", 1),
      ("augmentation, simclr_imagenet (device side)", imagenet, measure_augment, "views", 2)):
    result = measure(config, mesh, **timing)
    rows.append(dict(result, name=name, unit=unit,
                     model=describe(config, augmentation_only=measure is measure_augment),
                     batch=config.global_batch_size,
                     count=config.global_batch_size * per_image))
    print(f"measured {name}", file=sys.stderr, flush=True)
  resnet50_per_device = rows[0]["count"] / rows[0]["seconds"] / num_devices
  report = "\n\n".join([header, table(rows, num_devices),
                        anchor_table(resnet50_per_device, platform)])
  print("\n" + report.split("\n\n", 1)[1])
  if args.out:
    with open(args.out, "w") as f:
      f.write(report + "\n")
  return report


if __name__ == "__main__":
  try:
    main(sys.argv[1:])
  except ValueError as error:
    sys.exit(f"accelerator_step.py: error: {error}")
