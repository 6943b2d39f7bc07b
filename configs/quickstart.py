r"""The README's first command: SimCLR learns on the generated dataset in about three minutes.

  python -m simclr_jax.main --config=configs/quickstart.py --workdir=workdirs/quickstart

`synthetic_shapes` (ten shape/texture classes, 5000 train images) is generated into data_dir on
first use: no network, no prepared data. The tiny CIFAR ResNet-18 of the smoke recipes is
pretrained long enough to beat its own random initialisation clearly: the k-NN monitor scores the
encoder before the first step and after the last, and the console ends with both numbers.
`configs/smoke_pretrain.py` stays the short form the tests run.
"""
import ml_collections

from configs import cifar10_pretrain
from configs import common


def quickstart() -> ml_collections.ConfigDict:
  """The smoke model with the optimisation the tests found robust (LARS, base rate 0.3 with the
  square-root rule, a short warmup, tau = 0.5), run for a few epochs of the generated data."""
  config = common.shrink_to_smoke(cifar10_pretrain.cifar_recipe(common.SMOKE_DATASET))
  config.global_batch_size = 64
  config.num_train_steps = 600
  config.temperature = 0.5
  config.optimizer.base_learning_rate = 0.3
  config.optimizer.lr_scaling = "sqrt"
  config.optimizer.warmup_epochs = 0.4            # 32 steps of 64 on the 5000 generated images
  config.optimizer.weight_decay = 5e-5
  config.log_every_steps = 20
  config.checkpoint_every_steps = 200
  config.evals.knn.update(every_steps=0, at_start=True, train_examples=0, eval_examples=0, k=20)
  config.probe_recipe = "configs/cifar10_linear_probe.py:smoke"
  return config


VARIANTS = {"default": (quickstart, "the tiny ResNet-18 on synthetic_shapes, about 3 minutes")}
DEFAULT_VARIANT = "default"


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  return common.select_variant(variant, VARIANTS, default=DEFAULT_VARIANT)
