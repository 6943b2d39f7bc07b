r"""SimCLR pretraining on ImageNet: the paper's ResNet-50 recipe for accelerators.

  python -m simclr_jax.main --config=configs/imagenet_pretrain.py:r50_100ep \
      --workdir=gs://BUCKET/simclr_r50_100ep --config.data_dir=gs://BUCKET/tensorflow_datasets

Variants: `r50_100ep` (default; ~64.5% linear eval), `r50_1000ep` (~69.3%), `smoke` (the same
code paths, bfloat16 and host crops included, tiny and on generated data).

SimCLR v1 (the paper and the v1 README's ImageNet command): ResNet-50, a 2-layer projection
head, B=4096, LARS with LR 0.3 * B / 256 (4.8), 10 warmup epochs then cosine, weight decay 1e-6
against the official objective (`losses.nt_xent`), tau=0.1, colour jitter s=1.0 with blur,
224 px.
Images vary in size, so the host takes the two random resized crops (host_crop_views=2) and the
device does the rest of the augmentation. Compute runs in bfloat16 (params and loss float32).
"""
import ml_collections

from configs import common

PAPER_WEIGHT_DECAY = 1e-6
V1_HEAD_LAYERS = 2


def imagenet_recipe(num_epochs: float) -> ml_collections.ConfigDict:
  config = common.pretrain_config()
  config.dataset = "imagenet2012"
  config.eval_split = "validation"
  config.image_size = 224
  config.host_crop_views = 2
  config.model = common.model_config(50, 1.0, cifar_stem=False)
  config.model.head_layers = V1_HEAD_LAYERS
  config.augment = common.augment_config("simclr_imagenet")  # s=1.0, blur
  config.dtype = "bfloat16"
  config.global_batch_size = 4096
  config.num_epochs = num_epochs
  config.temperature = 0.1
  config.optimizer.name = "lars"
  config.optimizer.base_learning_rate = 0.3
  config.optimizer.lr_scaling = "linear"
  config.optimizer.warmup_epochs = 10.0
  config.optimizer.weight_decay = PAPER_WEIGHT_DECAY
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2500
  # A 100k-image memory bank of 2048-d features (0.8 GB), scored on 10k validation images.
  config.evals.knn.update(every_steps=10000, train_examples=100_000, eval_examples=10_000)
  config.probe_recipe = "configs/imagenet_linear_probe.py:r50"
  return config


def smoke() -> ml_collections.ConfigDict:
  config = common.shrink_to_smoke(imagenet_recipe(100.0))
  config.eval_split = "test"
  config.probe_recipe = ""
  return config


VARIANTS = {
    "r50_100ep": (lambda: imagenet_recipe(100.0), "the paper's ResNet-50, B=4096, 100 epochs"),
    "r50_1000ep": (lambda: imagenet_recipe(1000.0), "the same for 1000 epochs"),
    "smoke": (smoke, "tiny, 60 steps on the generated synthetic_shapes"),
}
DEFAULT_VARIANT = "r50_100ep"


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  return common.select_variant(variant, VARIANTS, default=DEFAULT_VARIANT)
