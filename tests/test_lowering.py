"""The ImageNet recipe's steps lowered for GPU and TPU from this CPU, and the accelerator benchmark.

Pretraining, the SGD linear probe and fine-tuning of configs/imagenet_pretrain.py's network
(ResNet-50 at full width, 224 px, bfloat16 compute, blur) are exported with
`jax.export.export(step, platforms=('cuda', 'tpu'))` on abstract inputs sharded over the 8 fake
CPU devices (2 images per device): lowering only, nothing compiles, so each takes seconds. The
StableHLO must hold no custom call (the native CPU kernels are custom calls; XLA's own sharding
ones are allowed) and the collectives each step needs, and none where it needs none.
"""
import collections
import importlib.util
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from configs import cifar10_finetune, cifar10_linear_probe, imagenet_pretrain
from simclr_jax import augment, loop, models, native, optim, sharding
from simclr_jax.jobs import finetune as finetune_job
from simclr_jax.jobs import linear_probe as probe_job
from simclr_jax.jobs import supervised

BENCHMARK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "experiments", "benchmarks", "accelerator_step.py")
ACCELERATORS = ("cuda", "tpu")
NUM_DEVICES = 8
PER_DEVICE_BATCH = 2
IMAGENET_CLASSES = 1000
PORTABLE = {"conv_backend": "xla", "norm_backend": "jax", "augment_backend": "jax"}
NATIVE_TARGETS = {target for option in native.backends.OPTIONS.values()
                  for target in option.kernels.targets}
# The custom calls XLA itself defines (sharding annotations): the only ones a portable step may
# hold. With Shardy (JAX's default) shardings are `sdy` attributes and there are none at all.
SHARDING_CUSTOM_CALLS = {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"}
COLLECTIVES = ("all_gather", "all_reduce", "reduce_scatter", "all_to_all", "collective_permute",
               "collective_broadcast")


def _load_benchmark():
  spec = importlib.util.spec_from_file_location("accelerator_step", BENCHMARK)
  module = importlib.util.module_from_spec(spec)
  sys.modules["accelerator_step"] = module
  spec.loader.exec_module(module)
  return module


accelerator_step = _load_benchmark()


def resolve(option: str, choice: str, platform: str) -> str:
  """The config field `option`'s backend `choice` resolved for `platform`."""
  return native.resolve_backend(option, choice, platform)


def accelerator_backends(config) -> dict[str, str]:
  """config's backends resolved for every accelerator platform, which must agree."""
  per_platform = [{option: resolve(option, config[option], platform) for option in PORTABLE}
                  for platform in ACCELERATORS]
  assert all(backends == per_platform[0] for backends in per_platform)
  return per_platform[0]


def lower(step, *abstract_args) -> tuple[jax.export.Exported, str]:
  exported = jax.export.export(step, platforms=ACCELERATORS)(*abstract_args)
  return exported, exported.mlir_module()


def custom_call_targets(text: str) -> collections.Counter:
  """Targets of the module's custom calls (pretty and generic StableHLO forms)."""
  return collections.Counter(re.findall(r"stablehlo\.custom_call @([\w.$-]+)", text) +
                             re.findall(r'call_target_name = "([^"]+)"', text))


def collective_counts(text: str) -> dict[str, int]:
  """Occurrences of each collective op in the module text (ops inside the per-platform
  `stablehlo.case` branches count once per branch)."""
  counts = collections.Counter(re.findall(r"stablehlo\.(%s)\b" % "|".join(COLLECTIVES), text))
  return {name: counts[name] for name in COLLECTIVES}


def all_gathers(text: str) -> list[tuple[str, str, str]]:
  """(replica groups, operand type, result type) of each all_gather."""
  return re.findall(r'"stablehlo\.all_gather"\(%\w+\) <\{.*?replica_groups = dense<(.*?)> :'
                    r".*?\}> : \((tensor<[^>]*>)\) -> (tensor<[^>]*>)", text)


def all_reduce_types(text: str) -> collections.Counter:
  """Operand types of the all_reduce ops (the type signature after each reduction region)."""
  types = collections.Counter()
  for match in re.finditer(r'"stablehlo\.all_reduce"', text):
    signature = re.search(r"\}\) : \((tensor<[^>]*>)\) -> ", text[match.end():])
    types[signature.group(1)] += 1
  return types


def assert_portable(text: str) -> None:
  targets = custom_call_targets(text)
  native_calls = {name for name in targets if name in NATIVE_TARGETS or name.startswith("simclr")}
  assert not native_calls, f"native CPU kernels in an accelerator program: {native_calls}"
  assert set(targets) <= SHARDING_CUSTOM_CALLS, f"custom calls beyond XLA's own: {targets}"


def abstract(tree, sharding_):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_), tree)


def imagenet_batch(mesh, views_per_image: int) -> dict[str, jax.ShapeDtypeStruct]:
  """A batch of host-cropped 224 px views: [B, views_per_image, 224, 224, 3] uint8."""
  batch = NUM_DEVICES * PER_DEVICE_BATCH
  split = sharding.batch_sharded(mesh)
  return {"image": jax.ShapeDtypeStruct((batch, views_per_image, 224, 224, 3), jnp.uint8,
                                        sharding=split),
          "index": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=split),
          "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=split)}


def on_imagenet_network(config):
  """An evaluation config on the ImageNet recipe's network and views (host crops, one view)."""
  recipe = imagenet_pretrain.get_config()
  config.model = recipe.model
  config.image_size = recipe.image_size
  config.dtype = recipe.dtype
  config.host_crop_views = 1
  config.global_batch_size = NUM_DEVICES * PER_DEVICE_BATCH
  return config


@pytest.fixture(scope="module")
def mesh():
  return sharding.create_mesh(jax.devices()[:NUM_DEVICES])


@pytest.fixture(scope="module")
def pretrain(mesh):
  """(config, Exported, StableHLO text) of the ImageNet recipe's pretraining step."""
  config = accelerator_step.recipe("imagenet", per_device_batch=PER_DEVICE_BATCH,
                                   num_devices=NUM_DEVICES, tiny=False)
  assert accelerator_backends(config) == PORTABLE
  step, init_state = accelerator_step.pretrain_step(config, mesh, platform=ACCELERATORS[0])
  state = abstract(jax.eval_shape(init_state), sharding.replicated(mesh))
  exported, text = lower(step, state, accelerator_step.batch_shapes(config, mesh))
  return config, exported, text


@pytest.mark.parametrize("option", sorted(PORTABLE))
def test_auto_resolves_to_the_portable_backend_off_cpu_and_native_on_cpu(option):
  for platform in ACCELERATORS:
    assert resolve(option, "auto", platform) == PORTABLE[option]
  assert resolve(option, "auto", "cpu") != PORTABLE[option]  # the kernels build on this machine
  native_choice = {"conv_backend": "onednn", "norm_backend": "native",
                   "augment_backend": "native"}[option]
  with pytest.raises(ValueError, match="CPU backend only; this run's is 'tpu'"):
    resolve(option, native_choice, "tpu")


def test_the_custom_call_check_sees_the_native_kernels(mesh):
  """The same builder resolved for CPU lowers the native kernels as custom calls, which both
  jax.export's own safety check and `assert_portable` refuse: their silence on the accelerator
  programs means something."""
  config = accelerator_step.recipe("cifar10", per_device_batch=PER_DEVICE_BATCH,
                                   num_devices=NUM_DEVICES, tiny=True)
  step, init_state = accelerator_step.pretrain_step(config, mesh, platform="cpu")
  state = abstract(jax.eval_shape(init_state), sharding.replicated(mesh))
  batch = accelerator_step.batch_shapes(config, mesh)
  with pytest.raises(ValueError, match="Cannot serialize code with custom calls"):
    jax.export.export(step, platforms=("cpu",))(state, batch)  # export's own check refuses them
  text = step.trace(state, batch).lower(lowering_platforms=("cpu",)).as_text()
  assert set(custom_call_targets(text)) >= NATIVE_TARGETS
  with pytest.raises(AssertionError, match="native CPU kernels"):
    assert_portable(text)


def test_pretraining_step_lowers_for_gpu_and_tpu_with_its_collectives(pretrain):
  config, exported, text = pretrain
  assert exported.platforms == ACCELERATORS
  assert exported.nr_devices == NUM_DEVICES
  assert config.model.depth == 50 and config.model.width_multiplier == 1
  assert config.dtype == "bfloat16" and "blur" in augment.resolve_config(config.augment)["ops"]
  assert_portable(text)
  counts = collective_counts(text)
  # NT-Xent scores each device's embeddings z [2 images, 128] against every device's.
  gathers = all_gathers(text)
  assert gathers and counts["all_gather"] == len(gathers)
  everyone = str(list(range(NUM_DEVICES))).replace(" ", "")
  for groups, operand, result in gathers:
    assert groups.replace(" ", "") == f"[{everyone}]"
    assert (operand, result) == (
        f"tensor<{PER_DEVICE_BATCH}x128xf32>",
        f"tensor<{NUM_DEVICES * PER_DEVICE_BATCH}x128xf32>")
  assert counts["reduce_scatter"] > 0  # the gather's transpose, in the backward pass
  reduced = all_reduce_types(text)
  assert sum(reduced.values()) == counts["all_reduce"]
  # Global batch norm: per-channel moments of the stem (64) and of the last stage (2048) summed
  # over the devices; the replicated parameters' gradients summed, e.g. the online probe's.
  assert reduced["tensor<1x1x1x64xf32>"] > 0 and reduced["tensor<1x1x1x2048xf32>"] > 0
  assert reduced[f"tensor<2048x{IMAGENET_CLASSES}xf32>"] > 0
  # Gradients are summed in float32 although the model computes in bfloat16 (the official code
  # sums float32 gradients): the conv kernels' [7, 7, 3, 64] ... [1, 1, 512, 2048] sums.
  assert reduced["tensor<7x7x3x64xf32>"] > 0 and reduced["tensor<1x1x512x2048xf32>"] > 0
  assert not [operand for operand in reduced if "bf16" in operand], reduced
  assert counts["all_to_all"] == counts["collective_permute"] == 0


def test_linear_probe_step_lowers_with_no_cross_device_reduction(mesh):
  """The frozen encoder runs in inference mode (running BN statistics): the lowered probe step
  holds no collective at all. Its loss and gradient means over the sharded batch are left to
  XLA's SPMD partitioner, which adds them when the program compiles for its devices."""
  config = on_imagenet_network(cifar10_linear_probe.probe_config("sgd"))
  backends = accelerator_backends(config)
  assert backends == PORTABLE
  classifier = supervised.create_classifier(config, IMAGENET_CLASSES, axis_name=None,
                                           platform=ACCELERATORS[0])
  head = models.LinearHead(IMAGENET_CLASSES)
  optimizer, schedule, _ = optim.optimizer_from_config(config, 1_281_167)
  augment_view = augment.build_augmentation(config.augment, config.image_size,
                                            crop_on_device=False,
                                            backend=backends["augment_backend"])
  step = probe_job.make_probe_step(classifier, optimizer, augment_view, schedule, mesh)
  images = jnp.zeros((1, config.image_size, config.image_size, 3))
  frozen = jax.eval_shape(lambda: classifier.init(jax.random.key(0), images, train=False))
  feature_dim = frozen["params"][models.SUPERVISED_HEAD]["dense"]["kernel"].shape[0]

  def init_state():
    params = head.init(jax.random.key(0), jnp.zeros((1, feature_dim)))["params"]
    return loop.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                           opt_state=optimizer.init(params), rng=jax.random.PRNGKey(0))

  replicated = sharding.replicated(mesh)
  exported, text = lower(step, abstract(jax.eval_shape(init_state), replicated),
                         abstract(frozen, replicated), imagenet_batch(mesh, 1))
  assert exported.nr_devices == NUM_DEVICES
  assert_portable(text)
  assert collective_counts(text) == dict.fromkeys(COLLECTIVES, 0)
  # The batch arrives split over the 8 devices (so XLA partitions the encoder by examples).
  assert re.search(r"sdy.sharding = #sdy.sharding<@mesh, \[\{\"data\"\}, \{\}, \{\}, \{\}, \{\}\]>",
                   text)


def test_finetune_step_lowers_with_global_batch_norm(mesh):
  config = on_imagenet_network(cifar10_finetune.finetune_config())
  backends = accelerator_backends(config)
  assert backends == PORTABLE
  classifier = supervised.create_classifier(config, IMAGENET_CLASSES,
                                           axis_name=sharding.DATA_AXIS,
                                           platform=ACCELERATORS[0])
  images = jnp.zeros((1, config.image_size, config.image_size, 3))
  variables = jax.eval_shape(lambda: classifier.init(jax.random.key(0), images, train=False))
  optimizer, schedule, _ = optim.optimizer_from_config(
      config, 1_281_167, trainable_mask=finetune_job.trainable_mask(
          variables["params"], fine_tune_after_block=config.fine_tune_after_block,
          projection_layer=config.projection_layer))
  augment_view = augment.build_augmentation(config.augment, config.image_size,
                                            crop_on_device=False,
                                            backend=backends["augment_backend"])
  step = finetune_job.make_finetune_step(
      classifier, optimizer, augment_view, fine_tune_after_block=config.fine_tune_after_block,
      learning_rate_fn=schedule, mesh=mesh)

  def init_state():
    variables = classifier.init(jax.random.key(0), images, train=False)
    return loop.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                           batch_stats=variables["batch_stats"],
                           opt_state=optimizer.init(variables["params"]),
                           rng=jax.random.PRNGKey(0))

  exported, text = lower(step, abstract(jax.eval_shape(init_state), sharding.replicated(mesh)),
                         imagenet_batch(mesh, 1))
  assert exported.nr_devices == NUM_DEVICES
  assert_portable(text)
  counts = collective_counts(text)
  reduced = all_reduce_types(text)
  assert reduced["tensor<1x1x1x64xf32>"] > 0  # global batch norm moments
  assert reduced[f"tensor<2048x{IMAGENET_CLASSES}xf32>"] > 0  # the head's gradient
  assert not [operand for operand in reduced if "bf16" in operand], reduced  # float32 sums
  assert counts["all_gather"] == counts["reduce_scatter"] == 0  # no contrastive loss here


def test_benchmark_tiny_run_prints_every_row(tmp_path):
  out = tmp_path / "accelerator_step.md"
  completed = subprocess.run([sys.executable, BENCHMARK, "--tiny", f"--out={out}"],
                             capture_output=True, text=True, timeout=300)
  assert completed.returncode == 0, completed.stderr[-3000:]
  report = out.read_text()
  assert report.strip().endswith(completed.stdout.strip().split("\n\n", 1)[1].strip())
  assert f"{NUM_DEVICES} x cpu (cpu)" in report.splitlines()[0]
  rows = [line.split("|")[1:-1] for line in report.splitlines() if line.startswith("| ")]
  measured = {cells[0].strip(): cells for cells in rows}
  for name, unit in (("pretrain step, imagenet_pretrain", "pairs/s"),
                     ("pretrain step, cifar10_pretrain:r18", "pairs/s"),
                     ("augmentation, simclr_imagenet (device side)", "views/s")):
    cells = [cell.strip() for cell in measured[name]]
    assert cells[1].startswith("32 px views, native" if unit == "views/s" else
                               "ResNet-18 w=0.125, 32 px")
    assert (cells[2], cells[3]) == (str(NUM_DEVICES * 2), "2")
    assert float(cells[4].replace(",", "")) > 0 and cells[5] == unit
  assert "185 | n/a (this run: cpu)" in report
  assert "1,235 | n/a (this run: cpu)" in report
