"""Batch norm with the ReLU and residual sum that follow it in a ResNet, fused on the CPU backend.

`BatchNorm` is `nn.BatchNorm` (the same variables, statistics and running averages, so
checkpoints, exports and the TF1 converter see no difference) whose call also takes the block's
`residual` and `relu`. With `native=True` a training-mode call on float32 maps runs as four passes
of C++ kernels (simclr_jax/native/batch_norm.cc), two forward and two backward, each reading the
map once: nn.BatchNorm under XLA takes 1.4-1.9x as long on ResNet-18's maps, mostly in its
reductions (experiments/results/train_step.md).
Between the passes the per-channel statistics are summed over `axis_name` (global batch norm
inside `shard_map`), so the kernels see one device's shard like the convolutions do. Anything
else (running averages, other dtypes, `axis_index_groups`, masks) is `nn.BatchNorm`'s own code.

`resolve_norm_backend('auto')` picks 'native' on the CPU backend when the kernels can be built
(a C++ compiler, see `simclr_jax.native`), 'jax' (`nn.BatchNorm`) otherwise.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from simclr_jax import native, sharding

NORM_BACKENDS = ("auto", "jax", "native")


def resolve_norm_backend(backend: str, platform: str | None = None) -> str:
  """'jax' or 'native' for `config.norm_backend`; 'auto' picks 'native' where it can run.
  `platform` defaults to this run's. Raises ValueError for an unknown name or 'native' where
  the kernels cannot run."""
  return native.resolve_backend(
      "norm_backend", backend, choices=NORM_BACKENDS, portable="jax", native_default="native",
      unavailable_reason=native.batch_norm_kernels_unavailable_reason,
      fallback="XLA's slower batch norm", platform=platform)


def _call(target: str, result_type, **operands_and_attrs):
  """Custom call `target` on the array keyword arguments, in order, with the bools as
  attributes; `result_type` is one result's type or a list of them."""
  native.register_batch_norm_kernels()
  operands = [v for v in operands_and_attrs.values() if not isinstance(v, bool)]
  attrs = {k: v for k, v in operands_and_attrs.items() if isinstance(v, bool)}
  return jax.ffi.ffi_call(target, result_type, vmap_method="sequential")(*operands, **attrs)


def _sums_type(x):
  """Type of the [2, C] per-channel sums of map x (varying over x's mesh axes, like x)."""
  return jax.typeof(x).update(shape=(2, x.shape[-1]))


def _global_sums(local_sums, axis_name):
  return local_sums if axis_name is None else jax.lax.psum(local_sums, axis_name)


def _count(x, axis_name) -> int:
  rows = x.size // x.shape[-1]
  return rows if axis_name is None else rows * jax.lax.axis_size(axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def fused_batch_norm(x, scale, bias, residual, relu: bool, epsilon: float, axis_name):
  """(y, mean, var) of training-mode batch norm over all axes but the last, in float32:
  y = x normalised, times scale plus bias, plus `residual` (None: nothing), then max(., 0) if
  `relu`; mean and var are the batch statistics (over `axis_name` too, if given)."""
  return _fused_forward(x, scale, bias, residual, relu, epsilon, axis_name)[0]


def _fused_forward(x, scale, bias, residual, relu, epsilon, axis_name):
  count = _count(x, axis_name)
  sums = _global_sums(_call("simclr_bn_moments", _sums_type(x), x=x), axis_name)
  mean = sums[0] / count
  var = jnp.maximum(sums[1] / count - mean * mean, 0.0)
  inverse_std = jax.lax.rsqrt(var + epsilon)
  multiplier = scale * inverse_std
  shift = bias - mean * multiplier
  if residual is None:
    y = _call("simclr_bn_apply", jax.typeof(x), x=x, scale=multiplier, shift=shift, relu=relu)
  else:
    y = _call("simclr_bn_apply_residual", jax.typeof(x), x=x, scale=multiplier, shift=shift,
              residual=residual, relu=relu)
  return (y, mean, var), (x, y, scale, mean, inverse_std, residual is None)


def _fused_backward(relu, epsilon, axis_name, saved, cotangents):
  """Gradients through the normalisation and the statistics (tested against NumPy float64 and
  nn.BatchNorm's autodiff). With g the gradient past the ReLU's mask, x only enters through
  x * scale / std and the sums [sum x, sum x^2], so dx = a * g + b * x + c per channel, where b
  and c carry the gradients reaching the global mean and variance (from the shift, the std and
  the returned statistics); the per-channel sums of g and g * x they need are summed over
  `axis_name`. The parameters' gradients stay per device: `sharding.vary_alike`'s cast, which
  made them vary like x, sums them."""
  del epsilon
  x, y, scale, mean, inverse_std, no_residual = saved
  dy, dmean, dvar = cotangents
  count = _count(x, axis_name)
  local = _call("simclr_bn_grad_sums", _sums_type(x), dy=dy, x=x, y=y, relu=relu)
  dscale_local = inverse_std * (local[1] - mean * local[0])  # sum g (x - mean) / std
  dbias_local = local[0]  # sum g
  total = _global_sums(local, axis_name)
  dmultiplier = total[1] - mean * total[0]  # d loss / d (scale / std), through the shift too
  dvar_total = dvar - 0.5 * scale * inverse_std**3 * dmultiplier
  dmean_total = dmean - scale * inverse_std * total[0] - 2 * mean * dvar_total
  a = scale * inverse_std
  b = 2 * dvar_total / count
  c = dmean_total / count
  if no_residual:
    dx = _call("simclr_bn_grad_input", jax.typeof(x), dy=dy, x=x, y=y, a=a, b=b, c=c, relu=relu)
    dresidual = None
  else:
    dx, dresidual = _call("simclr_bn_grad_input_residual", [jax.typeof(x)] * 2, dy=dy, x=x,
                          y=y, a=a, b=b, c=c, relu=relu)
  return dx, dscale_local, dbias_local, dresidual


fused_batch_norm.defvjp(_fused_forward, _fused_backward)


class BatchNorm(nn.BatchNorm):
  """`nn.BatchNorm`, then `+ residual` and a ReLU if asked; native kernels if `native`."""
  native: bool = False

  @nn.compact
  def __call__(self, x, use_running_average=None, *, residual=None, relu: bool = False):
    running = nn.merge_param("use_running_average", self.use_running_average,
                             use_running_average)
    if not (self.native and not running and self._fusable(x, residual)):
      y = super().__call__(x, use_running_average)
      y = y if residual is None else y + residual
      return nn.relu(y) if relu else y
    features = (x.shape[-1],)
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), features)
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
    scale = self.param("scale", self.scale_init, features, self.param_dtype)
    bias = self.param("bias", self.bias_init, features, self.param_dtype)
    axis_name = None if self.is_initializing() else self.axis_name
    operands = sharding.vary_alike(x, scale, bias, *(() if residual is None else (residual,)))
    x, scale, bias = operands[:3]
    y, mean, var = fused_batch_norm(x, scale, bias, operands[3] if residual is not None else None,
                                    relu, self.epsilon, axis_name)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y

  def _fusable(self, x, residual) -> bool:
    float32 = x.dtype == jnp.float32 and (residual is None or residual.dtype == jnp.float32)
    return (float32 and x.ndim >= 2 and self.axis in (-1, x.ndim - 1) and self.use_scale
            and self.use_bias and self.axis_index_groups is None
            and self.param_dtype == jnp.float32 and self.force_float32_reductions
            and self.use_fast_variance
            and (self.dtype is None or self.dtype == jnp.float32))
