"""Defaults shared by the recipes, and the `smoke` shrink every recipe offers.

A recipe starts from `pretrain_config()` or `evaluation_config()`, sets what its paper/official
command sets, lists its variants as `VARIANTS` (name -> (builder, one-line description)) and
passes the variant name through `select_variant`, so `--config=configs/<recipe>.py:<variant>`
fails with the list of variants when a name is misspelt, and `simclr_jax.main --list` shows them.
Recipes are data: they import nothing from simclr_jax, and name augmentation presets by string.
"""
import importlib
import os
import pkgutil
from typing import Callable, Mapping

import ml_collections

# The README's first command, listed first by `recipe_catalogue`.
FIRST_RECIPE = "quickstart"
# The package's generated dataset: no download, prepared into data_dir on first use.
SMOKE_DATASET = "synthetic_shapes"


def model_config(depth: int = 18, width_multiplier: float = 1.0, *,
                 cifar_stem: bool = False) -> ml_collections.ConfigDict:
  """`config.model` (the contract's fields; the same dict is stored in encoder exports)."""
  return ml_collections.ConfigDict(dict(
      depth=depth, width_multiplier=width_multiplier, cifar_stem=cifar_stem, sk_ratio=0.0,
      tf_same_padding=False, head_layers=2, head_hidden_dim=0, projection_dim=128,
      bn_momentum=0.9, bn_epsilon=1e-5))


def augment_config(preset: str, **overrides: Mapping) -> ml_collections.ConfigDict:
  """`config.augment`: a preset of simclr_jax.augment ('simclr_imagenet', 'simclr_cifar',
  'crop_flip', 'none'); `ops` replaces its op list when not empty; `overrides[op]` changes that
  op's parameters, e.g. `random_resized_crop={'area_min': 0.2}`."""
  return ml_collections.ConfigDict(dict(preset=preset, ops=(), **{
      op: dict(params) for op, params in overrides.items()}))


def lbfgs_config(**overrides) -> ml_collections.ConfigDict:
  """The paper's transfer protocol: L2 from 45 log-spaced strengths in [1e-6, 1e5], chosen on a
  held-out 20% of train; `train_examples`/`eval_examples` limit the features (0 = all);
  `at_start` also scores the initial state of a new training run (the random-init baseline)."""
  return ml_collections.ConfigDict(dict(dict(
      every_steps=0, at_start=False, train_examples=0, eval_examples=0, validation_fraction=0.2,
      l2_min=1e-6, l2_max=1e5, l2_num=45, max_iterations=1000, tolerance=1e-5), **overrides))


def knn_config(**overrides) -> ml_collections.ConfigDict:
  """Weighted k-NN on h (k=200, T=0.1, cosine): a memory bank of the first `train_examples`
  train images scored on the first `eval_examples` held-out ones (0 = all); `at_start` also
  scores the initial state of a new training run (the random-init baseline)."""
  return ml_collections.ConfigDict(dict(dict(
      enabled=True, every_steps=0, at_start=False, train_examples=0, eval_examples=0, k=200,
      temperature=0.1), **overrides))


def mlp_probe_config(**overrides) -> ml_collections.ConfigDict:
  """A CIFAR-100 reproduction's probe (not the paper's): an MLP of `hidden_sizes` (Dense-ReLU-
  Dropout each, then Dense to the classes) trained with Adam on raw features; `batch_norm`
  'batch_statistics' takes them with batch norm in training mode, as that report did, or
  'running_average' (inference mode, as the other probes)."""
  return ml_collections.ConfigDict(dict(dict(
      enabled=False, every_steps=0, at_start=False, train_examples=0, eval_examples=0,
      hidden_sizes=(512, 256), dropout_rate=0.5, learning_rate=1e-3, epochs=20, batch_size=256,
      batch_norm="batch_statistics"), **overrides))


def pretrain_config() -> ml_collections.ConfigDict:
  """Every field the pretrain job reads, with neutral values a recipe overrides."""
  config = ml_collections.ConfigDict()
  config.mode = "pretrain"
  config.seed = 0
  config.dataset = SMOKE_DATASET
  config.data_dir = ""             # '' = TFDS's default data_dir (~/tensorflow_datasets)
  config.train_split = "train"
  config.eval_split = "test"       # held-out split of the k-NN monitor
  config.image_size = 32           # side of the views (the device crops from the full image)
  config.host_crop_views = 0       # 0: the device crops both views; 2: the host crops them
  # Independent input streams the global batch is made of (0 = one per process). Fix it (e.g.
  # to the largest process count you will use) to get the same batches on any process layout.
  config.data_shards = 0
  config.model = model_config()
  config.augment = augment_config("simclr_cifar")
  config.dtype = "float32"         # compute dtype; params, BN statistics and the loss stay float32
  config.conv_backend = "auto"     # CPU: oneDNN convolutions, else XLA; or 'onednn_bf16'
  config.norm_backend = "auto"     # CPU: batch norm + ReLU from C++ kernels, else JAX; or 'jax'
  config.augment_backend = "auto"  # CPU: the C++ kernels (simclr_jax/native), else JAX; or 'jax'
  config.global_batch_size = 512
  config.num_epochs = 100.0
  config.num_train_steps = 0       # > 0 overrides num_epochs
  config.temperature = 0.5
  config.optimizer = ml_collections.ConfigDict(dict(
      name="lars", base_learning_rate=0.3, lr_scaling="linear", warmup_epochs=10.0,
      weight_decay=1e-6, momentum=0.9, trust_coefficient=0.001,
      # Peak rate of the online probe's momentum SGD (same warmup + cosine shape, not scaled by
      # the batch). The official code uses the pretraining rate, where the probe diverges.
      probe_learning_rate=0.1))
  # Wall-clock budget of one invocation (0 = none): training stops after the step that reaches
  # it, checkpoints, exports and evaluates as at the end; rerunning the workdir continues.
  config.max_train_minutes = 0.0
  # With a budget: after a tenth of it, shorten the schedule to what the rate measured since a
  # twentieth fits in the rest (simclr_jax/time_budget.py), so the learning rate decays to 0
  # inside the budget on any machine.
  config.schedule_fits_budget = False
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  # Evaluators (simclr_jax.evaluators) run every `every_steps` (0 = only at the end) on h.
  config.evals = ml_collections.ConfigDict(dict(
      knn=knn_config(), linear=lbfgs_config(enabled=False), mlp=mlp_probe_config()))
  # The probe recipe of this network ('configs/FILE.py:VARIANT'; '' = none): the next command
  # the end-of-run summary prints.
  config.probe_recipe = ""
  return config


def shrink_to_smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A recipe's smoke form: same code paths, tiny ResNet-18, generated data, ~1 minute on a CPU."""
  config.dataset = SMOKE_DATASET
  config.data_dir = ""
  config.image_size = 32
  config.model.depth = 18
  config.model.width_multiplier = 0.125
  config.global_batch_size = 32
  config.num_train_steps = 60
  config.optimizer.base_learning_rate = 0.075   # the paper's square-root rule for small batches
  config.optimizer.lr_scaling = "sqrt"
  config.optimizer.warmup_epochs = 0.04         # 7 steps on the 5000 generated images
  config.log_every_steps = 10
  config.checkpoint_every_steps = 30
  config.keep_checkpoints = 2
  config.evals.knn.update(every_steps=30, train_examples=512, eval_examples=256, k=20)
  return config


# A recipe's variants: name -> (builder, one-line description), as each recipe's VARIANTS.
Variants = Mapping[str, tuple[Callable[[], ml_collections.ConfigDict], str]]


def describe_variants(variants: Variants, default: str) -> str:
  """One indented line per variant: its name and description; the default marked."""
  width = max(len(name) for name in variants)
  return "\n".join(f"  {name:<{width}}  {description}" + (" (default)" if name == default else "")
                   for name, (_, description) in variants.items())


def select_variant(variant: str | None, variants: Variants,
                   default: str) -> ml_collections.ConfigDict:
  """Calls the builder named `variant` (or `default`), or fails listing the allowed ones."""
  name = variant or default
  if name not in variants:
    raise ValueError(f"unknown config variant {name!r}; allowed: {', '.join(sorted(variants))}\n"
                     + describe_variants(variants, default))
  return variants[name][0]()


def recipe_catalogue() -> str:
  """`simclr_jax.main --list`: each recipe of this folder, its docstring's first line and its
  variants (`VARIANTS`, or the argument it takes: `ARGUMENT_HELP`)."""
  lines = []
  recipes = pkgutil.iter_modules([os.path.dirname(os.path.abspath(__file__))])
  for recipe in sorted(recipes, key=lambda recipe: (recipe.name != FIRST_RECIPE, recipe.name)):
    if recipe.name == "common":
      continue
    module = importlib.import_module(f"configs.{recipe.name}")
    lines.append(f"configs/{recipe.name}.py: {(module.__doc__ or '').strip().splitlines()[0]}")
    lines.append(describe_variants(module.VARIANTS, module.DEFAULT_VARIANT)
                 if hasattr(module, "VARIANTS") else f"  {module.ARGUMENT_HELP}")
  return "\n".join(lines)


def evaluation_config(mode: str, *, base_learning_rate: float, global_batch_size: int,
                      num_epochs: float, log_every_steps: int,
                      eval_every_steps: int) -> ml_collections.ConfigDict:
  """The fields the linear probe and fine-tuning share, at the paper's CIFAR-10 settings.

  An encoder of cifar10_pretrain.py's ResNet-18 (CIFAR stem, 32 px) trained with SGD + Nesterov
  momentum, LR base_learning_rate * B / 256, no warmup, no weight decay, cosine decay, on crop +
  flip views; a checkpoint at each evaluation.
  """
  config = ml_collections.ConfigDict()
  config.mode = mode
  config.seed = 0
  config.dataset = "cifar10"
  config.data_dir = ""
  config.train_split = "train"
  config.eval_split = "test"
  config.image_size = 32
  config.host_crop_views = 0         # 1: the host crops (datasets whose image sizes vary)
  config.data_shards = 0             # input streams of the batch (0 = one per process)
  # Must describe init_from's export: cifar10_pretrain.py:r18's network (a v2 3-layer head).
  config.model = model_config(18, 1.0, cifar_stem=True)
  config.model.head_layers = 3
  config.dtype = "float32"
  config.conv_backend = "auto"       # CPU: oneDNN convolutions, else XLA; or 'onednn_bf16'
  config.norm_backend = "auto"       # CPU: batch norm + ReLU from C++ kernels, else JAX; or 'jax'
  config.augment_backend = "auto"    # CPU: the C++ kernels (simclr_jax/native), else JAX; or 'jax'
  config.init_from = ""              # the encoder export to start from (a workdir's export/)
  config.projection_layer = 0        # 0: head on h; i > 0: on projection-head layer i (v2)
  config.zero_init_head = True       # the official --zero_init_logits_layer
  config.augment = augment_config("crop_flip")
  config.global_batch_size = global_batch_size
  config.num_epochs = num_epochs     # passes over the (labelled) train examples
  config.num_train_steps = 0         # > 0 overrides num_epochs
  config.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", base_learning_rate=base_learning_rate, lr_scaling="linear", warmup_epochs=0.0,
      weight_decay=0.0, momentum=0.9, nesterov=True))
  # Wall-clock budget of one invocation (0 = none), as in pretraining: training stops after the
  # step that reaches it, checkpoints, evaluates and exports; rerunning the workdir continues.
  config.max_train_minutes = 0.0
  config.schedule_fits_budget = False  # as in pretraining: fit the schedule to the budget
  config.log_every_steps = log_every_steps
  config.eval_every_steps = eval_every_steps  # test top-1 during training (0 = only at the end)
  config.checkpoint_every_steps = eval_every_steps
  config.keep_checkpoints = 2
  config.evals = ml_collections.ConfigDict()
  return config


def on_pretraining_network(config: ml_collections.ConfigDict,
                           pretraining: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """An evaluation `config` on a pretraining recipe's data and network: its dataset and eval
  split, image size, model, compute dtype and convolutions; one crop per image on the host where
  the pretraining cropped there (image sizes vary)."""
  config.dataset = pretraining.dataset
  config.eval_split = pretraining.eval_split
  config.image_size = pretraining.image_size
  config.host_crop_views = 1 if pretraining.host_crop_views else 0
  config.model = pretraining.model
  config.dtype = pretraining.dtype
  config.conv_backend = pretraining.conv_backend
  return config


def shrink_evaluation_to_smoke(config: ml_collections.ConfigDict, *,
                               num_train_steps: int) -> ml_collections.ConfigDict:
  """An evaluation recipe's smoke form: smoke_pretrain's tiny encoder on generated data."""
  config.dataset = SMOKE_DATASET
  config.model.width_multiplier = 0.125
  config.global_batch_size = 64
  config.num_train_steps = num_train_steps
  config.log_every_steps = 20
  config.eval_every_steps = num_train_steps // 2
  config.checkpoint_every_steps = num_train_steps // 2
  return config
