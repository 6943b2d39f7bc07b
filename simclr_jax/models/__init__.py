"""SimCLR models, Flax Linen used purely: `init`/`apply`, params and batch statistics as pytrees.

- `ModelConfig` (model_config.py): `config.model`, the one list of model fields.
- `SimCLRModel` (simclr.py): encoder + projection head + online probe, for pretraining.
- `Classifier` (classifier.py): encoder (+ head layers) + linear head, for probes and fine-tunes.
- `ResNet` (resnet.py), `ProjectionHead`, `LinearHead` (heads.py), `BatchNorm` (batch_norm.py):
  the building blocks, laid out like the official SimCLR code so its checkpoints import.
"""
import jax.numpy as jnp

from simclr_jax.models.batch_norm import BatchNorm, statistics_over
from simclr_jax.models.classifier import (SUPERVISED_HEAD, Classifier, check_projection_layer,
                                          representation_name)
from simclr_jax.models.heads import LinearHead, ProjectionHead
from simclr_jax.models.model_config import (TRAINING_ONLY_FIELDS, ModelConfig, build_encoder,
                                            build_projection_head)
from simclr_jax.models.resnet import (DEPTHS, FEATURE_NAMES, BasicBlock, BottleneckBlock, ResNet,
                                      scaled_channels)
from simclr_jax.models.simclr import SimCLRModel, create_model

# config.dtype -> the compute dtype; parameters, BN statistics and losses stay float32.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

__all__ = [
    "COMPUTE_DTYPES", "DEPTHS", "FEATURE_NAMES", "SUPERVISED_HEAD", "TRAINING_ONLY_FIELDS",
    "BasicBlock", "BatchNorm", "BottleneckBlock", "Classifier", "LinearHead", "ModelConfig",
    "ProjectionHead", "ResNet", "SimCLRModel", "build_encoder", "build_projection_head",
    "check_projection_layer", "create_model", "representation_name", "scaled_channels",
    "statistics_over",
]
