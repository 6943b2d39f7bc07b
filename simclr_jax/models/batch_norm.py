"""Batch norm with the ReLU and residual sum that follow it in a ResNet, fused on the CPU backend.

`BatchNorm` is `nn.BatchNorm` (the same variables, statistics and running averages, so
checkpoints, exports and the TF1 converter see no difference) whose call also takes the block's
`residual` and `relu`. With `native=True` a training-mode call on float32 or bfloat16 maps (in the
module's own dtype) runs as native C++ kernels (`simclr_jax.native.batch_norm_train`:
nn.BatchNorm under XLA takes 1.4-1.9x as long on ResNet-18's maps). Anything else (running
averages, other dtypes, `axis_index_groups`, masks) is `nn.BatchNorm`'s own code.

`statistics_over(mask)` makes every batch norm layer of a model in training mode take its batch
statistics over the rows of `mask` only: an eval batch's padding then changes nothing.
"""
import contextlib
from typing import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from simclr_jax import native


class BatchNorm(nn.BatchNorm):
  """`nn.BatchNorm`, then `+ residual` and a ReLU if asked; native kernels if `native`."""
  native: bool = False

  @nn.compact
  def __call__(self, x, use_running_average=None, *, residual=None, relu: bool = False,
               mask=None):
    running = nn.merge_param("use_running_average", self.use_running_average,
                             use_running_average)
    if not (self.native and not running and mask is None and self._fusable(x, residual)):
      y = super().__call__(x, use_running_average, mask=mask)
      y = y if residual is None else y + residual
      return nn.relu(y) if relu else y
    features = (x.shape[-1],)
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), features)
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
    scale = self.param("scale", self.scale_init, features, self.param_dtype)
    bias = self.param("bias", self.bias_init, features, self.param_dtype)
    axis_name = None if self.is_initializing() else self.axis_name
    y, mean, var = native.batch_norm_train(x, scale, bias, residual, relu, self.epsilon,
                                           axis_name)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y

  def _fusable(self, x, residual) -> bool:
    """Whether the kernels give what nn.BatchNorm would: maps of one type, float32 or bfloat16,
    that is also the output's (nn.BatchNorm's `dtype`, or float32 when None)."""
    output_dtype = jnp.dtype(self.dtype or jnp.promote_types(x.dtype, jnp.float32))
    maps = (x.dtype in (jnp.float32, jnp.bfloat16) and x.dtype == output_dtype
            and (residual is None or residual.dtype == x.dtype))
    return (maps and x.ndim >= 2 and self.axis in (-1, x.ndim - 1) and self.use_scale
            and self.use_bias and self.axis_index_groups is None
            and self.param_dtype == jnp.float32 and self.force_float32_reductions
            and self.use_fast_variance)


@contextlib.contextmanager
def statistics_over(mask: jax.Array) -> Iterator[None]:
  """Within it, batch norm layers (`nn.BatchNorm` and this `BatchNorm`) in training mode compute
  their statistics over the examples whose `mask` [N] is True (an interceptor adds the mask to
  each layer's call, so no model needs a mask argument)."""
  def add_mask(call, args, kwargs, context):
    if (isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__"
        and kwargs.get("mask") is None):
      rows = args[0]
      kwargs = dict(kwargs, mask=mask.reshape(mask.shape + (1,) * (rows.ndim - 1)))
    return call(*args, **kwargs)

  with nn.intercept_methods(add_mask):
    yield
