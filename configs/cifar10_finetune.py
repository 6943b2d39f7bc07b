r"""Fine-tuning on CIFAR-10 with all, 10% or 1% of the labels, from an export or from scratch.

  python -m simclr_jax.main --config=configs/cifar10_finetune.py:10pct \
      --workdir=/tmp/cifar10_r18_ft10 --config.init_from=/tmp/cifar10_r18/export \
      --config.data_dir=DIR_WITH_PREPARED_TFDS_CIFAR10

Variants: `100pct`, `10pct`, `1pct` (class-balanced label subsets, the same for the same seed;
results.json and label_subset.json record them), each also as `<n>pct_scratch`: the same recipe
from a random init (the paper's supervised baseline; no init_from). `cpu`: the width-1/4 ResNet-18
of cifar10_pretrain.py:cpu on 10% of the labels. `smoke`, `smoke_scratch`: tiny, on
synthetic_shapes.

The paper's recipe (SimCLR appendix B.5): SGD with Nesterov momentum 0.9, LR 0.05 * B / 256,
no warmup, no weight decay or other regularisation, crop + flip, cosine decay; epochs count passes
over the labelled subset (the paper: 60 for 1%, 30 for 10%). fine_tune_after_block=-1 trains the
whole network; 0..4 freezes the stem and block groups up to that one. projection_layer=1 with a
3-layer head (model.head_layers=3) is SimCLRv2's fine-tuning from the first head layer.
"""
import ml_collections

from configs import common
from simclr_jax import augment

# label fraction -> (epochs over the labelled subset, global batch size)
LABEL_FRACTIONS = {"100pct": (1.0, 30.0, 512), "10pct": (0.1, 30.0, 256),
                   "1pct": (0.01, 60.0, 128)}


def finetune_config(label_fraction: float = 1.0, *, num_epochs: float = 30.0,
                    global_batch_size: int = 512,
                    from_scratch: bool = False) -> ml_collections.ConfigDict:
  """Every field `simclr_jax.evaluate.finetune` reads, set to the paper's fine-tuning recipe."""
  config = ml_collections.ConfigDict()
  config.mode = "finetune"
  config.seed = 0
  config.dataset = "cifar10"
  config.data_dir = ""
  config.train_split = "train"
  config.eval_split = "test"
  config.image_size = 32
  config.host_crop_views = 0         # 1: the host crops (datasets whose image sizes vary)
  config.model = common.model_config(18, 1.0, cifar_stem=True)  # model.bn_momentum: BN momentum
  config.dtype = "float32"
  config.init_from = ""              # the encoder export to start from
  config.from_scratch = from_scratch  # True: random init, the supervised baseline (no init_from)
  config.fine_tune_after_block = -1  # -1: train everything; k in 0..4: freeze stem..block k
  config.projection_layer = 0        # 0: head on h; i > 0: on projection-head layer i (v2)
  config.label_fraction = label_fraction  # (0, 1]; class-balanced, deterministic for the seed
  config.labels_per_class = 0        # > 0: exactly this many labelled images per class instead
  config.zero_init_head = True       # the official --zero_init_logits_layer
  config.augment = augment.get_preset("crop_flip")
  config.global_batch_size = global_batch_size
  config.num_epochs = num_epochs     # passes over the labelled examples
  config.num_train_steps = 0         # > 0 overrides num_epochs
  config.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", base_learning_rate=0.05, lr_scaling="linear", warmup_epochs=0.0,
      weight_decay=0.0, momentum=0.9, nesterov=True))
  config.log_every_steps = 50
  config.eval_every_steps = 500      # test top-1 during training (0 = only at the end)
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 2
  return config


def cpu() -> ml_collections.ConfigDict:
  config = finetune_config(0.1, num_epochs=10.0, global_batch_size=128)
  config.model.width_multiplier = 0.25
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 100
  return config


def smoke(from_scratch: bool) -> ml_collections.ConfigDict:
  """The same code paths on synthetic_shapes with common.shrink_to_smoke's tiny model."""
  config = finetune_config(0.1, global_batch_size=64, from_scratch=from_scratch)
  config.dataset = common.SMOKE_DATASET
  config.model.width_multiplier = 0.125
  config.num_train_steps = 60
  config.log_every_steps = 20
  config.eval_every_steps = 30
  config.checkpoint_every_steps = 30
  return config


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  variants = {"cpu": cpu, "smoke": lambda: smoke(False), "smoke_scratch": lambda: smoke(True)}
  for name, (fraction, epochs, batch) in LABEL_FRACTIONS.items():
    for suffix, from_scratch in (("", False), ("_scratch", True)):
      variants[name + suffix] = (
          lambda f=fraction, e=epochs, b=batch, s=from_scratch:
          finetune_config(f, num_epochs=e, global_batch_size=b, from_scratch=s))
  return common.select_variant(variant, variants, default="100pct")
