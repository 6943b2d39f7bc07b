r"""SimCLR pretraining on CIFAR-10: the official CIFAR recipe (SimCLRv2 code) and smaller forms.

  python -m simclr_jax.main --config=configs/cifar10_pretrain.py:r18 --workdir=/tmp/cifar10_r18 \
      --config.data_dir=DIR_WITH_PREPARED_TFDS_CIFAR10

Variants: `r18` (default; the official README's CIFAR-10 command), `r50`, `cpu` (ResNet-18 at
width 1/2, 25 minutes on a 2-core CPU), `smoke` (tiny, 60 steps on generated data).

`r18` reproduces SimCLR v2's code (google-research/simclr `run.py` since its v2 update), whose
README command is
  run.py --train_batch_size=512 --train_epochs=1000 --learning_rate=1.0 --weight_decay=1e-4
  --temperature=0.5 --resnet_depth=18 --image_size=32 --color_jitter_strength=0.5 --use_blur=False
with that code's defaults: a 3-layer projection head (num_proj_layers=3), LARS with
learning_rate_scaling='linear' (peak 1.0 * 512 / 256 = 2.0), 10 warmup epochs then cosine,
BN momentum 0.9, and a CIFAR stem at 32 px. The loss is the official objective (both
directions' means summed, `losses.nt_xent`), so the official weight decay applies unchanged.
`r50` is that command with ResNet-50 at B=1024 (the paper's CIFAR-10 linear-eval network); the
official code has no command of its own for it.
"""
import ml_collections

from configs import common

OFFICIAL_CIFAR_WEIGHT_DECAY = 1e-4  # the v2 README command's
OFFICIAL_V2_HEAD_LAYERS = 3       # num_proj_layers of the v2 code


def cifar_recipe(dataset: str) -> ml_collections.ConfigDict:
  """The official CIFAR command on `dataset` (ResNet-18, B=512, 1000 epochs)."""
  config = common.pretrain_config()
  config.dataset = dataset
  config.image_size = 32
  config.model = common.model_config(18, 1.0, cifar_stem=True)
  config.model.head_layers = OFFICIAL_V2_HEAD_LAYERS
  config.augment = common.augment_config("simclr_cifar")  # s=0.5, no blur
  config.global_batch_size = 512
  config.num_epochs = 1000.0
  config.temperature = 0.5
  config.optimizer.name = "lars"
  config.optimizer.base_learning_rate = 1.0
  config.optimizer.lr_scaling = "linear"
  config.optimizer.warmup_epochs = 10.0
  config.optimizer.weight_decay = OFFICIAL_CIFAR_WEIGHT_DECAY
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.evals.knn.every_steps = 5000
  return config


def resnet50(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """ResNet-50 at B=1024 (the paper's CIFAR-10 94.0% linear-eval setting, 1000 epochs)."""
  config.model.depth = 50
  config.global_batch_size = 1024
  return config


def cpu(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """ResNet-18 at width 1/2, 24 px views, bfloat16 convolutions: 25 minutes on 2 CPU cores.

  For CPUs with bfloat16 matrix units (AMX, AVX512-BF16; elsewhere use
  `--config.conv_backend=auto --config.dtype=float32`); the maps stay bfloat16 between the
  layers (`dtype`), parameters, statistics and the loss float32.
  A small batch, so the paper's square-root LR scaling; a 2-layer head (v1) and tau 0.2; crops
  of area [0.2, 1] shown at 24 px, cut on the device from the 32 px images, so objects appear at
  about the size the probe sees in a whole image; the 30-epoch cosine is an upper bound: after a
  tenth of the budget the run fits the schedule to what this machine does in it
  (`schedule_fits_budget`).
  Each choice, what it was worth and every run: experiments/results/cifar10_cpu_25min.md.
  """
  config.augment.random_resized_crop = dict(area_min=0.2)
  config.image_size = 24
  config.model.width_multiplier = 0.5
  config.model.head_layers = 2
  config.conv_backend = "onednn_bf16"
  config.dtype = "bfloat16"
  config.global_batch_size = 128
  config.num_epochs = 30.0
  config.max_train_minutes = 25.0
  config.schedule_fits_budget = True
  config.temperature = 0.2
  config.optimizer.base_learning_rate = 0.075
  config.optimizer.lr_scaling = "sqrt"
  config.optimizer.warmup_epochs = 0.1
  config.log_every_steps = 10
  config.checkpoint_every_steps = 100
  config.evals.knn.update(every_steps=250, train_examples=5000, eval_examples=1000)
  return config


def with_probe(config: ml_collections.ConfigDict, probe_variant: str) -> ml_collections.ConfigDict:
  """Names configs/cifar10_linear_probe.py:`probe_variant` as the probe of a CIFAR-10 run."""
  if config.dataset in ("cifar10", common.SMOKE_DATASET):
    config.probe_recipe = f"configs/cifar10_linear_probe.py:{probe_variant}"
  return config


def cifar_variants(dataset: str) -> common.Variants:
  """The variants of the CIFAR recipe on `dataset` (cifar10 or cifar100)."""
  return {
      "r18": (lambda: with_probe(cifar_recipe(dataset), "r18"), "the official command: "
              "ResNet-18, B=512, 1000 epochs, LARS"),
      "r50": (lambda: resnet50(cifar_recipe(dataset)), "ResNet-50 at B=1024, 1000 epochs"),
      "cpu": (lambda: with_probe(cpu(cifar_recipe(dataset)), "cpu"), "ResNet-18 at width 1/2, "
              "24 px views, bfloat16: 25 minutes on 2 CPU cores"),
      "smoke": (lambda: with_probe(common.shrink_to_smoke(cifar_recipe(dataset)), "smoke"),
                "tiny, 60 steps on the generated synthetic_shapes"),
  }


VARIANTS = cifar_variants("cifar10")
DEFAULT_VARIANT = "r18"


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  return common.select_variant(variant, VARIANTS, default=DEFAULT_VARIANT)
