r"""The CIFAR recipe, tiny (60 steps), on the package's generated dataset: what the tests run.

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


VARIANTS = {
    "cifar10": (lambda: cifar10_pretrain.get_config("smoke"), "cifar10_pretrain.py:smoke"),
    "cifar100": (lambda: cifar100_pretrain.get_config("smoke"), "cifar100_pretrain.py:smoke"),
    "imagenet": (lambda: imagenet_pretrain.get_config("smoke"), "imagenet_pretrain.py:smoke"),
}
DEFAULT_VARIANT = "cifar10"


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  return common.select_variant(variant, VARIANTS, default=DEFAULT_VARIANT)
