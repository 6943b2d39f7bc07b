r"""Fine-tuning on CIFAR-10 with all, 10% or 1% of the labels, from an export or from scratch.

  python -m simclr_jax.main --config=configs/cifar10_finetune.py:10pct \
      --workdir=/tmp/cifar10_r18_ft10 --config.init_from=/tmp/cifar10_r18/export \
      --config.data_dir=DIR_WITH_PREPARED_TFDS_CIFAR10
  python -m simclr_jax.main --config=configs/cifar10_finetune.py:cpu_supervised \
      --workdir=/tmp/cifar10_cpu_supervised --config.data_dir=DIR_WITH_PREPARED_TFDS_CIFAR10

Variants: `100pct`, `10pct`, `1pct` (class-balanced label subsets, the same for the same seed;
results.json and label_subset.json record them), each also as `<n>pct_scratch`: the same recipe
from a random init (the paper's supervised baseline; no init_from). `cpu`: the width-1/2 ResNet-18
of cifar10_pretrain.py:cpu on 10% of the labels. `cpu_supervised`: that network trained from
scratch on all labels within 25 minutes, the supervised baseline of cifar10_pretrain.py:cpu.
`smoke`, `smoke_scratch`: tiny, on synthetic_shapes.

Every fine-tuned or supervised encoder is exported to <workdir>/export (with its classifier head),
so `configs/cifar10_linear_probe.py --config.init_from=<workdir>/export` can probe it.

The paper's recipe (SimCLR appendix B.5): SGD with Nesterov momentum 0.9, LR 0.05 * B / 256,
no warmup, no weight decay or other regularisation, crop + flip, cosine decay; epochs count passes
over the labelled subset (the paper: 60 for 1%, 30 for 10%). fine_tune_after_block=-1 trains the
whole network; 0..4 freezes the stem and block groups up to that one. projection_layer=1 with a
3-layer head (model.head_layers=3) is SimCLRv2's fine-tuning from the first head layer.
"""
import ml_collections

from configs import common

# label fraction -> (epochs over the labelled subset, global batch size)
LABEL_FRACTIONS = {"100pct": (1.0, 30.0, 512), "10pct": (0.1, 30.0, 256),
                   "1pct": (0.01, 60.0, 128)}


def finetune_config(label_fraction: float = 1.0, *, num_epochs: float = 30.0,
                    global_batch_size: int = 512,
                    from_scratch: bool = False) -> ml_collections.ConfigDict:
  """Every field the finetune job reads, set to the paper's fine-tuning recipe."""
  config = common.evaluation_config(
      "finetune", base_learning_rate=0.05, global_batch_size=global_batch_size,
      num_epochs=num_epochs, log_every_steps=50, eval_every_steps=500)
  config.from_scratch = from_scratch  # True: random init, the supervised baseline (no init_from)
  config.fine_tune_after_block = -1  # -1: train everything; k in 0..4: freeze stem..block k
  config.label_fraction = label_fraction  # (0, 1]; class-balanced, deterministic for the seed
  config.labels_per_class = 0        # > 0: exactly this many labelled images per class instead
  return config


def cpu() -> ml_collections.ConfigDict:
  config = finetune_config(0.1, num_epochs=10.0, global_batch_size=128)
  config.model.width_multiplier = 0.5
  config.model.head_layers = 2
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 100
  return config


def cpu_supervised() -> ml_collections.ConfigDict:
  """The supervised baseline of cifar10_pretrain.py:cpu: its network, from scratch, all labels.

  LR: the standard CIFAR supervised recipe, 0.1 at batch 128 (the ResNet paper's CIFAR setting)
  with weight decay 5e-4 (the common pytorch-cifar one): base 0.2 * B / 256, Nesterov momentum
  0.9, cosine decay, no warmup (a BN ResNet-18 starts stably at 0.1). The paper's 0.05 * B / 256
  is for moving a pretrained encoder a little; from a random init it learns too slowly for a run
  of a few epochs. The same step as the SimCLR recipe (bfloat16 convolutions and maps) and the
  same budget rule: the 30-epoch cosine is an upper bound, fitted to what the machine does in 25
  minutes (experiments/results/cifar10_cpu_25min.md); results.json records the epochs reached.
  """
  config = finetune_config(1.0, num_epochs=30.0, global_batch_size=128, from_scratch=True)
  config.model.width_multiplier = 0.5
  config.model.head_layers = 2
  config.conv_backend = "onednn_bf16"
  config.dtype = "bfloat16"
  config.schedule_fits_budget = True
  config.optimizer.base_learning_rate = 0.2
  config.optimizer.weight_decay = 5e-4
  config.max_train_minutes = 25.0
  config.log_every_steps = 25
  config.eval_every_steps = 1000  # each pass over the 10,000 test images costs budget
  config.checkpoint_every_steps = 500
  return config


def smoke(from_scratch: bool) -> ml_collections.ConfigDict:
  """The same code paths on synthetic_shapes with the tiny smoke model."""
  return common.shrink_evaluation_to_smoke(
      finetune_config(0.1, from_scratch=from_scratch), num_train_steps=60)


def _label_fraction_variants() -> common.Variants:
  variants = {}
  for name, (fraction, epochs, batch) in LABEL_FRACTIONS.items():
    for suffix, from_scratch, origin in (("", False, "an export (init_from)"),
                                         ("_scratch", True, "random init")):
      variants[name + suffix] = (
          lambda f=fraction, e=epochs, b=batch, s=from_scratch:
          finetune_config(f, num_epochs=e, global_batch_size=b, from_scratch=s),
          f"{fraction:.0%} of the labels, {epochs:g} epochs, from {origin}")
  return variants


VARIANTS = {
    **_label_fraction_variants(),
    "cpu": (cpu, "cifar10_pretrain.py:cpu's encoder on 10% of the labels"),
    "cpu_supervised": (cpu_supervised, "that network from scratch on all labels, 25 minutes"),
    "smoke": (lambda: smoke(False), "tiny, on synthetic_shapes, from an export"),
    "smoke_scratch": (lambda: smoke(True), "tiny, on synthetic_shapes, from random init"),
}
DEFAULT_VARIANT = "100pct"


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  return common.select_variant(variant, VARIANTS, default=DEFAULT_VARIANT)
