r"""The supervised baseline of configs/imagenette_pretrain.py:cpu: its network trained with labels.

  python -m simclr_jax.main --config=configs/imagenette_finetune.py:cpu_supervised \
      --workdir=workdirs/imagenette_supervised --config.data_dir=DIR_WITH_PREPARED_TFDS_IMAGENETTE

Variants: `cpu_supervised` (default; from scratch on all 9,469 train labels within the same 25
minutes), `smoke` (tiny, on synthetic_shapes).

configs/cifar10_finetune.py:cpu_supervised's optimiser (SGD, Nesterov momentum 0.9, LR 0.2 * B /
256 with cosine decay, weight decay 5e-4, no warmup) on the pretraining's network, views and
stem; the host takes one random resized crop per image (official sampling; the images vary in
size) and the device flips it. The export (encoder + classifier) is probed by
configs/imagenette_linear_probe.py like the SimCLR encoder.
"""
import ml_collections

from configs import cifar10_finetune
from configs import common
from configs import imagenette_pretrain

# Passes over train that fit the budget on a shared 2-core machine (one view per image: about
# twice the pretraining's images/s).
NUM_EPOCHS = 80.0


def cpu_supervised() -> ml_collections.ConfigDict:
  pretraining = imagenette_pretrain.cpu()
  config = common.on_pretraining_network(
      cifar10_finetune.finetune_config(1.0, num_epochs=NUM_EPOCHS, global_batch_size=128,
                                       from_scratch=True), pretraining)
  config.optimizer.base_learning_rate = 0.2
  config.optimizer.weight_decay = 5e-4
  config.max_train_minutes = pretraining.max_train_minutes
  config.log_every_steps = 25
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 500
  return config


def smoke() -> ml_collections.ConfigDict:
  config = common.shrink_evaluation_to_smoke(cpu_supervised(), num_train_steps=60)
  config.data_dir = ""
  config.eval_split = "test"
  config.image_size = 32
  config.max_train_minutes = 0.0
  config.conv_backend = "auto"
  return config


VARIANTS = {
    "cpu_supervised": (cpu_supervised, "imagenette_pretrain.py:cpu's network from scratch on "
                       "all labels, 25 minutes"),
    "smoke": (smoke, "tiny, on synthetic_shapes"),
}
DEFAULT_VARIANT = "cpu_supervised"


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  return common.select_variant(variant, VARIANTS, default=DEFAULT_VARIANT)
