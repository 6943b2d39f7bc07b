r"""Linear evaluation on CIFAR-10 of an encoder pretrained by configs/cifar10_pretrain.py.

  python -m simclr_jax.main --config=configs/cifar10_linear_probe.py:r18 \
      --workdir=/tmp/cifar10_r18_probe --config.init_from=/tmp/cifar10_r18/export \
      --config.data_dir=DIR_WITH_PREPARED_TFDS_CIFAR10

Variants (config.model must describe the export; a mismatch is an error naming the fields):
  `r18` (default): the official CIFAR-10 linear-eval command (google-research/simclr README:
     --fine_tune_after_block=4 --optimizer=momentum --learning_rate=0.1 --weight_decay=0
     --train_epochs=100 --train_batch_size=512 --warmup_epochs=0): SGD with Nesterov momentum 0.9,
     LR 0.1 * B / 256 with cosine decay, crop + flip, 100 epochs, frozen encoder.
  `r18_lbfgs`: the transfer protocol (eval-crop features once, L-BFGS logistic regression, L2 from
     45 log-spaced values in [1e-6, 1e5] chosen on 20% of train).
  `cpu`: the ResNet-18 at width 1/4 of cifar10_pretrain.py:cpu, L-BFGS protocol (minutes on a CPU).
  `smoke`: tiny, on the generated synthetic_shapes dataset (pair it with cifar10_pretrain.py:smoke).
Both protocols also report the weighted k-NN top-1 (k=200, T=0.1) of the same features.
"""
import ml_collections

from configs import common
from simclr_jax import augment

PROBE_PROTOCOLS = ("sgd", "lbfgs")


def probe_config(protocol: str = "sgd") -> ml_collections.ConfigDict:
  """Every field `simclr_jax.evaluate.linear_probe` reads, set to the paper's linear evaluation."""
  if protocol not in PROBE_PROTOCOLS:
    raise ValueError(f"unknown probe protocol {protocol!r}; allowed: {PROBE_PROTOCOLS}")
  config = ml_collections.ConfigDict()
  config.mode = "linear_probe"
  config.seed = 0
  config.dataset = "cifar10"
  config.data_dir = ""
  config.train_split = "train"
  config.eval_split = "test"
  config.image_size = 32
  config.host_crop_views = 0         # 1: the host crops (datasets whose image sizes vary)
  config.model = common.model_config(18, 1.0, cifar_stem=True)
  config.dtype = "float32"
  config.init_from = ""              # the encoder export to probe (a pretraining workdir's export/)
  config.projection_layer = 0        # 0: h; i > 0: output of projection-head layer i (v2 style)
  config.probe_protocol = protocol   # 'sgd': augmented SGD probe; 'lbfgs': transfer protocol
  config.zero_init_head = True       # the official --zero_init_logits_layer
  # 'sgd' protocol.
  config.augment = augment.get_preset("crop_flip")
  config.global_batch_size = 512
  config.num_epochs = 100.0
  config.num_train_steps = 0         # > 0 overrides num_epochs
  config.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", base_learning_rate=0.1, lr_scaling="linear", warmup_epochs=0.0,
      weight_decay=0.0, momentum=0.9, nesterov=True))
  # 'lbfgs' protocol.
  config.lbfgs = ml_collections.ConfigDict(dict(
      validation_fraction=0.2, l2_min=1e-6, l2_max=1e5, l2_num=45, max_iterations=1000,
      tolerance=1e-5))
  config.log_every_steps = 100
  config.eval_every_steps = 1000     # test top-1 of the head during the sgd probe (0 = never)
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 2
  config.knn_k = 200                 # 0 = no k-NN
  config.knn_temperature = 0.1
  return config


def cpu(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config.model.width_multiplier = 0.25
  config.global_batch_size = 256
  return config


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same code paths on synthetic_shapes with common.shrink_to_smoke's tiny model."""
  config.dataset = common.SMOKE_DATASET
  config.model.width_multiplier = 0.125
  config.global_batch_size = 64
  config.num_train_steps = 100
  config.log_every_steps = 20
  config.eval_every_steps = 50
  config.checkpoint_every_steps = 50
  config.knn_k = 20
  config.lbfgs.l2_num = 12
  return config


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  return common.select_variant(variant, {
      "r18": lambda: probe_config("sgd"),
      "r18_lbfgs": lambda: probe_config("lbfgs"),
      "cpu": lambda: cpu(probe_config("lbfgs")),
      "smoke": lambda: smoke(probe_config("sgd")),
  }, default="r18")
