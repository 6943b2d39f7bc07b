r"""Exports the randomly initialised encoder of a pretraining config: the probes' baseline.

  python -m simclr_jax.tools.export_random_init --config=configs/cifar10_pretrain.py:cpu \
      --workdir=/tmp/cifar10_cpu_init --config.data_dir=DIR_WITH_PREPARED_TFDS_CIFAR10

writes WORKDIR/export, the network the config's pretraining would start from (same seed), so
`--config.init_from=WORKDIR/export` probes "the same encoder at random init".
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from simclr_jax.jobs import pretrain

_CONFIG = config_flags.DEFINE_config_file("config", None, "A pretraining config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory to write export/ into.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  print(f"wrote {pretrain.export_initialization(_CONFIG.value, _WORKDIR.value)}")


if __name__ == "__main__":
  app.run(main)
