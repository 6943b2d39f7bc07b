r"""Linear evaluation on ImageNet of an encoder pretrained by configs/imagenet_pretrain.py.

  python -m simclr_jax.main --config=configs/imagenet_linear_probe.py:r50 \
      --workdir=gs://BUCKET/r50_probe --config.init_from=gs://BUCKET/simclr_r50_100ep/export \
      --config.data_dir=gs://BUCKET/tensorflow_datasets

The paper's linear evaluation (SimCLR v1, appendix B.6): a linear head on the frozen encoder's h,
trained with SGD + Nesterov momentum 0.9 at LR 0.1 * B / 256 (1.6 at B=4096) with cosine decay
for 90 epochs, no warmup and no weight decay, on random crop + flip views resized to 224 px
(cropped on the host: ImageNet's images vary in size); top-1 on the 50,000 validation images'
224 px centre crops. `r50_lbfgs` is the transfer protocol (L-BFGS on eval-crop features) for a
quicker number; `smoke` the same code paths, tiny, on generated data.
"""
import ml_collections

from configs import cifar10_linear_probe
from configs import common
from configs import imagenet_pretrain


def imagenet_probe(protocol: str) -> ml_collections.ConfigDict:
  config = common.on_pretraining_network(cifar10_linear_probe.probe_config(protocol),
                                        imagenet_pretrain.get_config())
  config.global_batch_size = 4096
  config.num_epochs = 90.0
  config.log_every_steps = 100
  config.eval_every_steps = 5000
  config.checkpoint_every_steps = 2500
  config.lbfgs.update(train_examples=100_000)  # a 100k-image fit of 2048-d features
  config.evals.knn.update(train_examples=100_000, eval_examples=10_000)
  return config


def smoke() -> ml_collections.ConfigDict:
  """The smoke shrink on imagenet_pretrain.py:smoke's encoder (host crops included)."""
  config = common.shrink_evaluation_to_smoke(imagenet_probe("sgd"), num_train_steps=20)
  smoke_recipe = imagenet_pretrain.get_config("smoke")
  config.model = smoke_recipe.model
  config.image_size = smoke_recipe.image_size
  config.eval_split = "test"
  config.evals.knn.update(k=20, train_examples=0, eval_examples=0)
  config.lbfgs.update(l2_num=12, train_examples=0)
  return config


VARIANTS = {
    "r50": (lambda: imagenet_probe("sgd"), "the paper's SGD linear evaluation, 90 epochs"),
    "r50_lbfgs": (lambda: imagenet_probe("lbfgs"), "the transfer protocol (L-BFGS) on 100k images"),
    "smoke": (smoke, "tiny, on synthetic_shapes, host crops"),
}
DEFAULT_VARIANT = "r50"


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  return common.select_variant(variant, VARIANTS, default=DEFAULT_VARIANT)
