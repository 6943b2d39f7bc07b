r"""Fine-tuning on ImageNet with 1%, 10% or all of the labels, from an imagenet_pretrain export.

  python -m simclr_jax.main --config=configs/imagenet_finetune.py:1pct \
      --workdir=gs://BUCKET/r50_ft1 --config.init_from=gs://BUCKET/simclr_r50_100ep/export \
      --config.data_dir=gs://BUCKET/tensorflow_datasets

The paper's fine-tuning (SimCLR v1, appendix B.5): the whole network with SGD + Nesterov momentum
0.9 at LR 0.05 * B / 256 (0.8 at B=4096), cosine decay, no warmup and no regularisation, random
crop + flip at 224 px (cropped on the host), 60 epochs over the 1% subset and 30 over 10% or
all; class-balanced label subsets, the same for the same seed. Expected top-1 (R50 1x, the
paper): 48.3% (1%), 65.6% (10%). `<n>_scratch` variants are the supervised baselines from random
init; `smoke` the same code paths, tiny, on generated data.
"""
import ml_collections

from configs import cifar10_finetune
from configs import common
from configs import imagenet_pretrain

# label subset -> (fraction, epochs over it); the paper's batch 4096 for all.
LABEL_FRACTIONS = {"1pct": (0.01, 60.0), "10pct": (0.1, 30.0), "100pct": (1.0, 30.0)}


def imagenet_finetune(fraction: float, epochs: float, *,
                      from_scratch: bool) -> ml_collections.ConfigDict:
  config = common.on_pretraining_network(
      cifar10_finetune.finetune_config(fraction, num_epochs=epochs, global_batch_size=4096,
                                       from_scratch=from_scratch), imagenet_pretrain.get_config())
  config.log_every_steps = 50
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 1000
  return config


def smoke() -> ml_collections.ConfigDict:
  """The smoke shrink on imagenet_pretrain.py:smoke's encoder (host crops included)."""
  config = common.shrink_evaluation_to_smoke(
      imagenet_finetune(0.1, 30.0, from_scratch=False), num_train_steps=20)
  smoke_recipe = imagenet_pretrain.get_config("smoke")
  config.model = smoke_recipe.model
  config.image_size = smoke_recipe.image_size
  config.eval_split = "test"
  return config


def _label_fraction_variants() -> common.Variants:
  variants = {}
  for name, (fraction, epochs) in LABEL_FRACTIONS.items():
    for suffix, from_scratch, origin in (("", False, "an export (init_from)"),
                                         ("_scratch", True, "random init")):
      variants[name + suffix] = (
          lambda f=fraction, e=epochs, s=from_scratch: imagenet_finetune(f, e, from_scratch=s),
          f"{fraction:.0%} of the labels, {epochs:g} epochs, B=4096, from {origin}")
  return variants


VARIANTS = {**_label_fraction_variants(),
            "smoke": (smoke, "tiny, on synthetic_shapes, from an export, host crops")}
DEFAULT_VARIANT = "10pct"


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  return common.select_variant(variant, VARIANTS, default=DEFAULT_VARIANT)
