"""The supervised model of probes and fine-tunes: the same encoder (and projection head, when the
representation is one of its layers) with a linear head `supervised_head` (the official
`head_supervised`), under the variable names of an encoder export."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from simclr_jax.models.heads import LinearHead
from simclr_jax.models.model_config import ModelConfig, build_encoder, build_projection_head

SUPERVISED_HEAD = "supervised_head"


def representation_name(projection_layer: int) -> str:
  return "h" if projection_layer == 0 else f"projection_head_layer_{projection_layer}"


def check_projection_layer(config: ModelConfig, projection_layer: int) -> None:
  if isinstance(projection_layer, bool) or projection_layer not in range(config.head_layers + 1):
    raise ValueError(
        f"projection_layer={projection_layer!r}: 0 takes h, 1..{config.head_layers} the output "
        f"of that projection-head layer (the model has head_layers={config.head_layers})")


class Classifier(nn.Module):
  """Logits of a linear head on h (`projection_layer=0`) or on projection-head layer i (v2)."""
  config: ModelConfig
  num_classes: int
  projection_layer: int = 0
  axis_name: str | None = None
  dtype: Any = jnp.float32
  conv_backend: str = "xla"
  norm_backend: str = "jax"

  def setup(self):
    check_projection_layer(self.config, self.projection_layer)
    runtime = dict(axis_name=self.axis_name, dtype=self.dtype)
    self.encoder = build_encoder(self.config, conv_backend=self.conv_backend,
                                 norm_backend=self.norm_backend, **runtime)
    if self.projection_layer > 0:
      self.projection_head = build_projection_head(self.config, **runtime)
    self.supervised_head = LinearHead(self.num_classes)

  def represent(self, images, *, train: bool, stop_gradient_after_block: int = -1):
    """The representation [N, D] (float32) of float images in [0, 1]."""
    outputs = self.encoder(images, train=train,
                           stop_gradient_after_block=stop_gradient_after_block)
    if self.projection_layer == 0:
      return outputs["h"]
    _, hiddens = self.projection_head(outputs["h"], train=train)
    return hiddens[self.projection_layer]

  def __call__(self, images, *, train: bool, stop_gradient_after_block: int = -1):
    """(logits [N, num_classes], representation [N, D])."""
    representation = self.represent(images, train=train,
                                    stop_gradient_after_block=stop_gradient_after_block)
    return self.supervised_head(representation), representation
