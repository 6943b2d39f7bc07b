r"""Transfer linear evaluation: a frozen encoder on another labelled dataset, L-BFGS protocol.

  python -m simclr_jax.main --config=configs/transfer_linear_probe.py:tf_flowers \
      --workdir=/tmp/flowers_probe --config.init_from=/tmp/r50_1x_export \
      --config.data_dir=DIR_WITH_PREPARED_TFDS_DATASETS

The argument is a dataset: cifar10, cifar100, tf_flowers, imagenette, stl10, food101,
oxford_iiit_pet, caltech101, dtd, imagenet2012 (the paper's ImageNet linear evaluation is the
SGD protocol: add --config.probe_protocol=sgd), or `smoke` (synthetic_shapes with the tiny smoke
model). As in the paper's transfer experiments (appendix B.8): eval-crop features of the frozen
encoder, standardised, an L2-regularised multinomial logistic regression fit with L-BFGS, the
strength from 45 log-spaced values in [1e-6, 1e5] chosen on a held-out 20% of train, then refit
on all of train; top-1, top-5 and mean per-class accuracy on the test split (mean per-class is
the paper's metric for pets, flowers, caltech), plus k-NN, predictions.png and
confusion_matrix.png.

The default encoder is the paper's ImageNet ResNet-50 (1x) at 224 px, e.g. an official checkpoint
converted with `python -m simclr_jax.tools.convert_tf1_checkpoint`. For another export set the
model to match it (`--config.model.depth=18 --config.model.width_multiplier=... ` etc.; a mismatch
fails naming the fields) and its image size (`--config.image_size=32` for a CIFAR encoder).
`--config.probe_protocol=sgd` trains the head with SGD on crop + flip views instead.
"""
import ml_collections

from configs import cifar10_linear_probe
from configs import common

# dataset -> (train split, test split, image sizes vary). Datasets without a test split hold out
# the last 20% of train, so the L2 strength is still chosen inside the remaining train part.
DATASETS = {
    "cifar10": ("train", "test", False),
    "cifar100": ("train", "test", False),
    "tf_flowers": ("train[:80%]", "train[80%:]", True),
    "imagenette": ("train", "validation", True),
    "stl10": ("train", "test", False),
    "food101": ("train", "validation", True),
    "oxford_iiit_pet": ("train", "test", True),
    "caltech101": ("train", "test", True),
    "dtd": ("train+validation", "test", True),
    "imagenet2012": ("train", "validation", True),
}


def transfer_config(dataset: str) -> ml_collections.ConfigDict:
  train_split, eval_split, sizes_vary = DATASETS[dataset]
  config = cifar10_linear_probe.probe_config("lbfgs")
  config.dataset = dataset
  config.train_split = train_split
  config.eval_split = eval_split
  config.image_size = 224
  config.host_crop_views = 1 if sizes_vary else 0  # only read by probe_protocol='sgd'
  config.model = common.model_config(50, 1.0, cifar_stem=False)
  config.global_batch_size = 256
  config.num_epochs = 90.0
  return config


def smoke() -> ml_collections.ConfigDict:
  """synthetic_shapes with the tiny smoke model, as configs/cifar10_linear_probe.py:smoke."""
  return cifar10_linear_probe.smoke(cifar10_linear_probe.probe_config("lbfgs"))


VARIANTS = {
    **{name: (lambda name=name: transfer_config(name), f"L-BFGS probe on {name} "
              f"({DATASETS[name][0]} / {DATASETS[name][1]})") for name in DATASETS},
    "smoke": (smoke, "tiny, on synthetic_shapes"),
}
DEFAULT_VARIANT = "cifar100"


def get_config(dataset: str | None = None) -> ml_collections.ConfigDict:
  return common.select_variant(dataset, VARIANTS, default=DEFAULT_VARIANT)
