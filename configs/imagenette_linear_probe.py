r"""Linear evaluation of configs/imagenette_pretrain.py:cpu's encoder: imagenette, and CIFAR-10.

  python -m simclr_jax.main --config=configs/imagenette_linear_probe.py:cpu \
      --workdir=workdirs/imagenette_probe --config.init_from=workdirs/imagenette_cpu/export \
      --config.data_dir=DIR_WITH_PREPARED_TFDS_IMAGENETTE

Variants:
  `cpu` (default): imagenette/160px-v2, train -> validation.
  `cifar10_cpu`: transfer to CIFAR-10 (train -> test). The encoder saw views of the pretraining's
     size, so CIFAR's 32 px images are probed at that size too (centre crop, then upsampled).
  `smoke`: tiny, on synthetic_shapes.
Both real variants use the paper's transfer protocol (configs/transfer_linear_probe.py: frozen
eval-crop features, L-BFGS logistic regression with the L2 strength chosen on 20% of train),
the CIFAR-10 cpu probe's, and report the weighted k-NN top-1 of the same features. The same
recipe probes the random init (simclr_jax.tools.export_random_init) and the supervised baseline
(configs/imagenette_finetune.py:cpu_supervised).
"""
import ml_collections

from configs import common
from configs import imagenette_pretrain
from configs import transfer_linear_probe


def cpu(dataset: str, train_split: str, eval_split: str) -> ml_collections.ConfigDict:
  pretraining = imagenette_pretrain.cpu()
  config = common.on_pretraining_network(transfer_linear_probe.transfer_config("imagenette"),
                                        pretraining)
  config.dataset = dataset
  config.train_split = train_split
  config.eval_split = eval_split
  return config


VARIANTS = {
    "cpu": (lambda: cpu(imagenette_pretrain.DATASET, "train", "validation"),
            "L-BFGS probe of imagenette_pretrain.py:cpu's encoder on imagenette, 64 px"),
    "cifar10_cpu": (lambda: cpu("cifar10", "train", "test"),
                    "its transfer probe on CIFAR-10, at 64 px"),
    "smoke": (transfer_linear_probe.smoke, "tiny, on synthetic_shapes"),
}
DEFAULT_VARIANT = "cpu"


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  return common.select_variant(variant, VARIANTS, default=DEFAULT_VARIANT)
