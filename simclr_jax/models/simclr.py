"""The pretraining model: encoder f, projection head g, and an online linear probe on
stop_gradient(h). Variables are grouped under 'encoder', 'projection_head' and 'linear_head', the
names encoder exports and the TF1 converter rely on."""
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from simclr_jax.models.heads import LinearHead
from simclr_jax.models.model_config import ModelConfig, build_encoder, build_projection_head


class SimCLRModel(nn.Module):
  """`__call__` returns dict(h=, z=, probe_logits=, hiddens=, stem=, block1=, ..., block4=)."""
  config: ModelConfig
  num_classes: int
  axis_name: str | None = None
  dtype: Any = jnp.float32
  conv_backend: str = "xla"  # resolved names: see simclr_jax.native.resolve_backend
  norm_backend: str = "jax"

  @nn.compact
  def __call__(self, x, *, train: bool):
    """The probe sees stop_gradient(h), so its loss never shapes the encoder."""
    features = build_encoder(self.config, axis_name=self.axis_name, dtype=self.dtype,
                             conv_backend=self.conv_backend, norm_backend=self.norm_backend,
                             name="encoder")(x, train=train)
    z, hiddens = build_projection_head(self.config, axis_name=self.axis_name, dtype=self.dtype,
                                       name="projection_head")(features["h"], train=train)
    probe_logits = LinearHead(self.num_classes, name="linear_head")(
        jax.lax.stop_gradient(features["h"]))
    return dict(features, z=z, probe_logits=probe_logits, hiddens=hiddens)


def create_model(model_config: Mapping[str, Any], *, num_classes: int,
                 **runtime: Any) -> SimCLRModel:
  """The SimCLRModel of `config.model` (a ConfigDict or mapping); `runtime` takes axis_name,
  dtype and the resolved conv_backend / norm_backend."""
  return SimCLRModel(ModelConfig.from_mapping(model_config), num_classes=num_classes, **runtime)
