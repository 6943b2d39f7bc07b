r"""SimCLR pretraining on imagenette (10 ImageNet classes, 160 px JPEGs) by the ImageNet path.

  python -m simclr_jax.main --config=configs/imagenette_pretrain.py:cpu \
      --workdir=workdirs/imagenette_cpu --config.data_dir=DIR_WITH_PREPARED_TFDS_IMAGENETTE

Variants: `cpu` (default; ResNet-18 at width 1/2, 25 minutes on a 2-core CPU), `smoke` (the
same code paths, host crops included, tiny and on generated data).

The recipe is configs/imagenet_pretrain.py's: the host decodes only each view's window of the
JPEG with the official random-resized-crop sampling (host_crop_views=2), the device applies the
`simclr_imagenet` preset (colour strength 1.0, blur), ImageNet stem, LARS, the official weight
decay. `cpu` shrinks it to what 25 minutes on 2 cores reach:
- ResNet-18 at width 1/2 with bfloat16 convolutions and maps between the layers (`onednn_bf16`,
  `dtype='bfloat16'`, for CPUs with AMX or AVX512-BF16; elsewhere `--config.conv_backend=auto
  --config.dtype=float32`).
- Views of IMAGE_SIZE px, cropped from the 160 px images: the ImageNet stem divides them by 4,
  so block group 1 sees 16x16 maps, two thirds of the side cifar10_pretrain.py:cpu's 24 px
  views give it with the CIFAR stem; the probes read the 87.5% centre crop at the same size.
- A small batch, so the paper's square-root LR scaling (0.075 * sqrt(B)), a short warmup, and
  tau = 0.2 (cifar10_pretrain.py:cpu's choice for small batches and short runs).
- A cosine of at most NUM_EPOCHS epochs: after a tenth of the budget the run fits it to what
  this machine does in the budget (`schedule_fits_budget`; ~85 epochs on 2 idle cores). Rates,
  epochs reached, accuracies and the alternatives tried:
  experiments/results/imagenette_cpu_25min.md.
"""
import ml_collections

from configs import common
from configs import imagenet_pretrain

DATASET = "imagenette/160px-v2"
IMAGE_SIZE = 64
NUM_EPOCHS = 100.0  # an upper bound: the schedule is fitted to the budget
CROP_AREA_MIN = 0.08  # the official random-resized-crop sampling


def cpu() -> ml_collections.ConfigDict:
  config = imagenet_pretrain.imagenet_recipe(NUM_EPOCHS)
  config.dataset = DATASET
  config.eval_split = "validation"
  config.image_size = IMAGE_SIZE
  config.augment.random_resized_crop = dict(area_min=CROP_AREA_MIN)
  config.model = common.model_config(18, 0.5, cifar_stem=False)
  config.dtype = "bfloat16"
  config.conv_backend = "onednn_bf16"
  config.global_batch_size = 128
  config.temperature = 0.2
  config.optimizer.base_learning_rate = 0.075
  config.optimizer.lr_scaling = "sqrt"
  config.optimizer.warmup_epochs = 1.0
  config.max_train_minutes = 25.0
  config.schedule_fits_budget = True
  config.log_every_steps = 10
  config.checkpoint_every_steps = 200
  config.evals.knn.update(every_steps=1000, train_examples=5000, eval_examples=1000)
  config.probe_recipe = "configs/imagenette_linear_probe.py:cpu"
  return config


def smoke() -> ml_collections.ConfigDict:
  config = common.shrink_to_smoke(cpu())
  config.eval_split = "test"
  config.max_train_minutes = 0.0
  config.schedule_fits_budget = False
  config.conv_backend = "auto"
  config.probe_recipe = ""
  return config


VARIANTS = {
    "cpu": (cpu, "ResNet-18 at width 1/2, 64 px views cropped from the JPEGs on the host, "
            "25 minutes on 2 CPU cores"),
    "smoke": (smoke, "tiny, on synthetic_shapes"),
}
DEFAULT_VARIANT = "cpu"


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  return common.select_variant(variant, VARIANTS, default=DEFAULT_VARIANT)
