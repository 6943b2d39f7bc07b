"""SimCLR models: ResNet encoder + projection head + online linear probe, built from `config.model`.

Variables are grouped under 'encoder', 'projection_head' and 'linear_head' (in both the 'params'
and 'batch_stats' collections), the names encoder exports and the TF1 converter rely on.
"""
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from simclr_jax.models.batch_norm import NORM_BACKENDS, BatchNorm, resolve_norm_backend
from simclr_jax.models.heads import LinearHead, ProjectionHead, validate_head_args
from simclr_jax.models.onednn_conv import CONV_BACKENDS, conv_function, resolve_conv_backend
from simclr_jax.models.resnet import (DEPTHS, FEATURE_NAMES, BasicBlock, BottleneckBlock, ResNet,
                                      resnet_output_dim, scaled_channels, validate_resnet_args)

__all__ = [
    "CONV_BACKENDS", "DEPTHS", "FEATURE_NAMES", "NORM_BACKENDS", "BasicBlock", "BatchNorm",
    "BottleneckBlock", "LinearHead", "ProjectionHead", "ResNet", "SimCLRModel", "conv_function",
    "create_model", "encoder_output_dim", "model_kwargs", "resolve_conv_backend",
    "resolve_norm_backend", "scaled_channels",
]

# Fields of `config.model` with their defaults; depth and width_multiplier must be given.
MODEL_CONFIG_DEFAULTS = {
    "cifar_stem": False,
    "sk_ratio": 0.0,
    "tf_same_padding": False,
    "head_layers": 2,
    "head_hidden_dim": 0,
    "projection_dim": 128,
    "bn_momentum": 0.9,
    "bn_epsilon": 1e-5,
}
REQUIRED_MODEL_FIELDS = ("depth", "width_multiplier")


class SimCLRModel(nn.Module):
  """Encoder f, projection head g and an online linear probe on stop_gradient(h)."""
  depth: int
  num_classes: int
  width_multiplier: float = 1.0
  cifar_stem: bool = False
  sk_ratio: float = 0.0
  tf_same_padding: bool = False
  head_layers: int = 2
  head_hidden_dim: int = 0
  projection_dim: int = 128
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  axis_name: str | None = None
  dtype: Any = jnp.float32
  conv_backend: str = "xla"  # or 'onednn', 'onednn_bf16': see onednn_conv
  norm_backend: str = "jax"  # or 'native': see batch_norm

  def __post_init__(self):
    super().__post_init__()
    conv_function(self.conv_backend)  # a bad name fails here, not at the first call
    if self.norm_backend not in ("jax", "native"):
      raise ValueError(f"norm backend {self.norm_backend!r}: 'jax' or 'native' (resolve 'auto' "
                       "first)")

  @nn.compact
  def __call__(self, x, *, train: bool):
    """Returns dict(h=, z=, probe_logits=, hiddens=, stem=, block1=, ..., block4=).

    The probe sees stop_gradient(h), so its loss never shapes the encoder.
    """
    bn = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, axis_name=self.axis_name,
              dtype=self.dtype)
    encoder = ResNet(self.depth, width_multiplier=self.width_multiplier, cifar_stem=self.cifar_stem,
                     sk_ratio=self.sk_ratio, tf_same_padding=self.tf_same_padding, **bn,
                     conv_general_dilated=conv_function(self.conv_backend),
                     native_batch_norm=self.norm_backend == "native", name="encoder")
    features = encoder(x, train=train)
    projection_head = ProjectionHead(self.head_layers, self.head_hidden_dim, self.projection_dim,
                                     **bn, name="projection_head")
    z, hiddens = projection_head(features["h"], train=train)
    probe_logits = LinearHead(self.num_classes, name="linear_head")(
        jax.lax.stop_gradient(features["h"]))
    return dict(features, z=z, probe_logits=probe_logits, hiddens=hiddens)


def model_kwargs(model_config: Mapping[str, Any]) -> dict:
  """`config.model` as validated SimCLRModel keyword arguments (defaults filled in)."""
  given = {key: model_config[key] for key in model_config.keys()}
  allowed = set(REQUIRED_MODEL_FIELDS) | set(MODEL_CONFIG_DEFAULTS)
  unknown = sorted(set(given) - allowed)
  if unknown:
    raise ValueError(f"unknown model config fields {unknown}; allowed: {sorted(allowed)}")
  missing = [key for key in REQUIRED_MODEL_FIELDS if key not in given]
  if missing:
    raise ValueError(f"model config lacks {missing} (required: {list(REQUIRED_MODEL_FIELDS)})")
  kwargs = dict(MODEL_CONFIG_DEFAULTS, **given)
  for key in ("cifar_stem", "tf_same_padding"):
    if not isinstance(kwargs[key], bool):
      raise ValueError(f"model config {key} must be True or False, got {kwargs[key]!r}")
  validate_resnet_args(kwargs["depth"], kwargs["width_multiplier"], kwargs["sk_ratio"],
                       kwargs["bn_momentum"], kwargs["bn_epsilon"])
  validate_head_args(kwargs["head_layers"], kwargs["head_hidden_dim"], kwargs["projection_dim"])
  return kwargs


def create_model(model_config: Mapping[str, Any], *, num_classes: int, axis_name: str | None = None,
                 dtype: Any = jnp.float32, conv_backend: str = "xla",
                 norm_backend: str = "jax") -> SimCLRModel:
  """Builds the SimCLR model described by `config.model` (a ConfigDict or plain mapping)."""
  return SimCLRModel(num_classes=num_classes, axis_name=axis_name, dtype=dtype,
                     conv_backend=conv_backend, norm_backend=norm_backend,
                     **model_kwargs(model_config))


def encoder_output_dim(model_config: Mapping[str, Any]) -> int:
  """Width of the representation h for `config.model`."""
  kwargs = model_kwargs(model_config)
  return resnet_output_dim(kwargs["depth"], kwargs["width_multiplier"])
