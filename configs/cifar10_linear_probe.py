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
  `cpu`: the ResNet-18 at width 1/2 of cifar10_pretrain.py:cpu, L-BFGS protocol (minutes on a CPU).
  `smoke`: tiny, on the generated synthetic_shapes dataset (pair it with cifar10_pretrain.py:smoke).
Both protocols also report the weighted k-NN top-1 (k=200, T=0.1) of the same features, and with
`--config.evals.mlp.enabled=True` the CIFAR-100 reproduction's MLP probe (evaluators/mlp.py).
"""
import ml_collections

from configs import common

def probe_config(protocol: str = "sgd") -> ml_collections.ConfigDict:
  """Every field the linear_probe job reads, set to the paper's linear evaluation.

  The training fields (augment, optimizer, schedule, max_train_minutes) are read by the 'sgd'
  protocol only; 'lbfgs' reads `lbfgs`.
  """
  config = common.evaluation_config(
      "linear_probe", base_learning_rate=0.1, global_batch_size=512, num_epochs=100.0,
      log_every_steps=100, eval_every_steps=1000)
  config.probe_protocol = protocol   # 'sgd': augmented SGD probe; 'lbfgs': transfer protocol
  config.lbfgs = common.lbfgs_config()
  config.evals.knn = common.knn_config()  # on the same features as the probe
  # The CIFAR-100 reproduction's MLP probe (off; experiments/reproduction_study.sh uses it).
  config.evals.mlp = common.mlp_probe_config()
  return config


def cpu(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The probe of cifar10_pretrain.py:cpu (and of its baselines)."""
  config.model.width_multiplier = 0.5
  config.model.head_layers = 2
  config.global_batch_size = 256
  return config


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same code paths on synthetic_shapes with the tiny smoke model."""
  config = common.shrink_evaluation_to_smoke(config, num_train_steps=100)
  config.evals.knn.k = 20
  config.lbfgs.l2_num = 12
  return config


VARIANTS = {
    "r18": (lambda: probe_config("sgd"), "the official linear eval: SGD on crop + flip, 100 "
            "epochs"),
    "r18_lbfgs": (lambda: probe_config("lbfgs"), "the transfer protocol: L-BFGS on frozen "
                  "features"),
    "cpu": (lambda: cpu(probe_config("lbfgs")), "L-BFGS probe of cifar10_pretrain.py:cpu's "
            "encoder"),
    "smoke": (lambda: smoke(probe_config("sgd")), "tiny, on synthetic_shapes (probes the "
              "quickstart and smoke exports)"),
}
DEFAULT_VARIANT = "r18"


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  return common.select_variant(variant, VARIANTS, default=DEFAULT_VARIANT)
