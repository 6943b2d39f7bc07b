"""Projection and linear heads, laid out like the official SimCLR `model_util` heads."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from simclr_jax.models.resnet import is_integer

# Official linear_layer: tf.random_normal_initializer(stddev=.01).
dense_kernel_init = nn.initializers.normal(stddev=0.01)


def validate_head_args(num_layers, hidden_dim, out_dim):
  """Raises ValueError naming the bad value and what is allowed."""
  if not is_integer(num_layers) or num_layers < 1:
    raise ValueError("projection head num_layers (head_layers) must be an integer >= 1 "
                     f"(2 = SimCLR v1, 3 = v2), got {num_layers!r}")
  if not is_integer(hidden_dim) or hidden_dim < 0:
    raise ValueError("projection head hidden_dim (head_hidden_dim) must be an integer >= 0 "
                     f"(0 = width of h), got {hidden_dim!r}")
  if not is_integer(out_dim) or out_dim < 1:
    raise ValueError(f"projection head out_dim (projection_dim) must be an integer >= 1, "
                     f"got {out_dim!r}")


class ProjectionHead(nn.Module):
  """MLP head g(h): hidden layers Dense -> BN -> ReLU, last layer Dense -> BN without beta.

  Dense layers have no bias (BN follows). `num_layers=2` is SimCLR v1, 3 is v2 (whose fine-tuning
  starts from hiddens[1]). Returns (z, hiddens): hiddens[0] is h, hiddens[i] the output of layer i;
  all float32 (float64 when `dtype` is).
  """
  num_layers: int = 2
  hidden_dim: int = 0
  out_dim: int = 128
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  axis_name: str | None = None
  dtype: Any = jnp.float32

  def __post_init__(self):
    super().__post_init__()
    validate_head_args(self.num_layers, self.hidden_dim, self.out_dim)

  @nn.compact
  def __call__(self, h, *, train: bool):
    hidden_dim = self.hidden_dim or h.shape[-1]
    output_dtype = jnp.promote_types(self.dtype, jnp.float32)
    hiddens = [h.astype(output_dtype)]
    x = h
    for i in range(self.num_layers):
      is_last = i == self.num_layers - 1
      x = nn.Dense(self.out_dim if is_last else hidden_dim, use_bias=False,
                   kernel_init=dense_kernel_init, dtype=self.dtype, param_dtype=jnp.float32,
                   name=f"dense_{i}")(x)
      x = nn.BatchNorm(use_running_average=not train, use_bias=not is_last,
                       momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                       axis_name=self.axis_name, dtype=self.dtype, param_dtype=jnp.float32,
                       name=f"bn_{i}")(x)
      if not is_last:
        x = nn.relu(x)
      hiddens.append(x.astype(output_dtype))
    return hiddens[-1], tuple(hiddens)


class LinearHead(nn.Module):
  """Linear classifier (official head_supervised): Dense with kernel N(0, 0.01), zero bias."""
  num_classes: int

  def __post_init__(self):
    super().__post_init__()
    if not is_integer(self.num_classes) or self.num_classes < 1:
      raise ValueError(f"num_classes must be an integer >= 1, got {self.num_classes!r}")

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.num_classes, kernel_init=dense_kernel_init,
                    bias_init=nn.initializers.zeros, param_dtype=jnp.float32,
                    name="dense")(x.astype(jnp.float32))
