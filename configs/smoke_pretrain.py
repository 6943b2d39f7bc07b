r"""The first run on a new machine: the CIFAR recipe, tiny, on the package's generated dataset.

  python -m simclr_jax.main --config=configs/smoke_pretrain.py --workdir=/tmp/simclr_smoke

No network and no prepared data: `synthetic_shapes` is generated into data_dir on first use.
Variants name the recipe to shrink: `cifar10` (default), `cifar100`, `imagenet` (the same as
`configs/<recipe>_pretrain.py:smoke`). Train a real dataset with the same tiny model by adding
`--config.dataset=cifar10 --config.data_dir=DIR`.
"""
import ml_collections

from configs import cifar100_pretrain
from configs import cifar10_pretrain
from configs import common
from configs import imagenet_pretrain


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  return common.select_variant(variant, {
      "cifar10": lambda: cifar10_pretrain.get_config("smoke"),
      "cifar100": lambda: cifar100_pretrain.get_config("smoke"),
      "imagenet": lambda: imagenet_pretrain.get_config("smoke"),
  }, default="cifar10")
