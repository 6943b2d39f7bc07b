r"""SimCLR pretraining on CIFAR-100 with the CIFAR-10 recipe (the paper uses the same settings).

  python -m simclr_jax.main --config=configs/cifar100_pretrain.py:r18 --workdir=/tmp/cifar100_r18 \
      --config.data_dir=DIR_WITH_PREPARED_TFDS_CIFAR100

Variants: `r18` (default), `r50`, `cpu`, `smoke`; see configs/cifar10_pretrain.py for the
official command they follow (the official code has no CIFAR-100 command of its own).
"""
import ml_collections

from configs import cifar10_pretrain
from configs import common


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  recipe = lambda: cifar10_pretrain.cifar_recipe("cifar100")
  return common.select_variant(variant, {
      "r18": recipe,
      "r50": lambda: cifar10_pretrain.resnet50(recipe()),
      "cpu": lambda: cifar10_pretrain.cpu(recipe()),
      "smoke": lambda: common.shrink_to_smoke(recipe()),
  }, default="r18")
