r"""Linear probes of the official SimCLR ImageNet checkpoints, converted from TF1, on small sets.

  python -m simclr_jax.tools.convert_tf1_checkpoint --checkpoint=ResNet50_1x \
      --out=exports/simclrv1_r50_1x
  python -m simclr_jax.main \
      --config=configs/official_checkpoint_probe.py:simclrv1_r50_1x,tf_flowers \
      --config.init_from=exports/simclrv1_r50_1x --workdir=/tmp/probe_v1_r50_1x_tf_flowers

The argument is `CHECKPOINT,DATASET[,PROTOCOL]`:
  CHECKPOINT  simclrv1_r50_{1x,2x,4x}, simclrv2_r{50,101,152}_{1x,2x}_sk{0,1} or
              simclrv2_r152_3x_sk1: the architecture the export must have (a mismatch is an
              error naming the fields).
  DATASET     tf_flowers, imagenette, cifar100, cifar10, oxford_flowers102.
  PROTOCOL    lbfgs (default: the paper's transfer protocol, features of the 224 px eval crop,
              L2-regularised logistic regression) or sgd (linear head on crop + flip views).
The probe writes results.json, predictions.png (eval images with predicted and true labels),
confusion_matrix.png and export/ (encoder + the trained head, for `simclr_jax.tools.predict`).
Inputs are RGB in [0, 1] without mean/std normalisation and 224 px, as the checkpoints expect.

Published numbers to expect (top-1 %):
  ImageNet linear eval, the checkpoints' own heads (google-research/simclr README): SimCLRv1 R50
    1x 69.1, 2x 74.2, 4x 76.6; SimCLRv2 R50 1x 71.7 (SK 74.6), R50 2x 75.6 (77.7), R101 1x 73.6
    (76.3), R101 2x 77.0 (79.0), R152 1x 74.5 (77.2), R152 2x 77.4 (79.4), R152 3x SK 79.8.
  Transfer, linear, SimCLRv1 R50 1x (paper appendix B.8): CIFAR-10 90.6, CIFAR-100 71.6, Flowers
    91.2 — Flowers is Oxford 102 Flowers (`oxford_flowers102`, train+validation -> test), not
    the 5-class tf_flowers. The paper resized CIFAR to 224 without cropping; our eval pipeline
    keeps the central 87.5% first, which may cost a little.
  tf_flowers (80/20 split of its only split) and imagenette (ImageNet classes, so easy for an
    ImageNet encoder) have no published SimCLR numbers.
"""
import ml_collections

from configs import cifar10_linear_probe
from configs import common

OFFICIAL_SK_RATIO = 0.0625
# name -> (depth, width multiplier, selective kernels, projection-head layers); SimCLRv1 files hold
# no projection head, the converter then records the v1 head shape (2 layers).
CHECKPOINTS = {
    "simclrv1_r50_1x": (50, 1.0, False, 2),
    "simclrv1_r50_2x": (50, 2.0, False, 2),
    "simclrv1_r50_4x": (50, 4.0, False, 2),
    **{f"simclrv2_r{depth}_{width}x_sk{int(sk)}": (depth, float(width), sk, 3)
       for depth in (50, 101, 152) for width in (1, 2) for sk in (False, True)},
    "simclrv2_r152_3x_sk1": (152, 3.0, True, 3),
}
# name -> (TFDS name, train split, eval split)
DATASETS = {
    "tf_flowers": ("tf_flowers", "train[:80%]", "train[80%:]"),
    "imagenette": ("imagenette", "train", "validation"),
    "cifar100": ("cifar100", "train", "test"),
    "cifar10": ("cifar10", "train", "test"),
    "oxford_flowers102": ("oxford_flowers102", "train+validation", "test"),
}


def official_model_config(checkpoint: str) -> ml_collections.ConfigDict:
  """`config.model` of a converted official checkpoint (what the converter writes)."""
  if checkpoint not in CHECKPOINTS:
    raise ValueError(f"unknown official checkpoint {checkpoint!r}; allowed: "
                     f"{', '.join(CHECKPOINTS)}")
  depth, width, selective_kernels, head_layers = CHECKPOINTS[checkpoint]
  model = common.model_config(depth, width, cifar_stem=False)
  model.sk_ratio = OFFICIAL_SK_RATIO if selective_kernels else 0.0
  model.tf_same_padding = True
  model.head_layers = head_layers
  return model


def probe(checkpoint: str, dataset: str, protocol: str = "lbfgs") -> ml_collections.ConfigDict:
  if dataset not in DATASETS:
    raise ValueError(f"unknown dataset {dataset!r}; allowed: {', '.join(DATASETS)}")
  config = cifar10_linear_probe.probe_config(protocol)
  config.model = official_model_config(checkpoint)
  config.dataset, config.train_split, config.eval_split = DATASETS[dataset]
  config.image_size = 224
  config.global_batch_size = 64    # feature extraction batches; the sgd probe's batch too
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  return config


ARGUMENT_HELP = ("CHECKPOINT,DATASET[,PROTOCOL], e.g. simclrv1_r50_1x,tf_flowers (see the file "
                 "for the checkpoints and datasets)")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  parts = (arg or "").split(",")
  if len(parts) not in (2, 3):
    raise ValueError(f"expected CHECKPOINT,DATASET[,PROTOCOL], got {arg!r}; checkpoints: "
                     f"{', '.join(CHECKPOINTS)}; datasets: {', '.join(DATASETS)}; protocols: "
                     f"{', '.join(cifar10_linear_probe.PROBE_PROTOCOLS)}")
  return probe(*parts)
