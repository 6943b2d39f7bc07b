"""Training-mode batch norm with the ReLU and residual sum that follow it in a ResNet, as four
passes of C++ kernels (`batch_norm.cc`) on the CPU backend, two forward and two backward, each
reading the map once: nn.BatchNorm under XLA takes 1.4-1.9x as long on ResNet-18's maps, mostly
in its reductions (experiments/results/train_step.md). Between the passes the per-channel
statistics are summed over `axis_name` (global batch norm inside `shard_map`), so the kernels see
one device's shard like the convolutions do. Maps are float32 or bfloat16 (then read as floats
and written rounded); statistics, parameters and their gradients are float32 either way. The Flax
module is `simclr_jax.models.BatchNorm`.
"""
import functools

import jax
import jax.numpy as jnp

from simclr_jax.native import build
from simclr_jax.native.varying import vary_alike

MOMENTS, APPLY, APPLY_RESIDUAL, GRAD_SUMS, GRAD_INPUT, GRAD_INPUT_RESIDUAL = TARGETS = (
    "simclr_bn_moments", "simclr_bn_apply", "simclr_bn_apply_residual", "simclr_bn_grad_sums",
    "simclr_bn_grad_input", "simclr_bn_grad_input_residual")
KERNELS = build.Kernels("batch_norm.cc", TARGETS)


def batch_norm_train(x, scale, bias, residual, relu: bool, epsilon: float, axis_name):
  """(y, mean, var) of training-mode batch norm over all axes but the last: y = x normalised,
  times scale plus bias, plus `residual` (None: nothing; else x's dtype), then max(., 0) if
  `relu`, in x's dtype (float32 or bfloat16); mean and var are the float32 batch statistics (over
  `axis_name` too, if given)."""
  if residual is None:
    x, scale, bias = vary_alike(x, scale, bias)
  else:
    x, scale, bias, residual = vary_alike(x, scale, bias, residual)
  return _fused_batch_norm(x, scale, bias, residual, relu, epsilon, axis_name)


def _call(target: str, result_type, **operands_and_attrs):
  """Custom call `target` on the array keyword arguments, in order, with the bools as
  attributes; `result_type` is one result's type or a list of them."""
  KERNELS.register()
  operands = [v for v in operands_and_attrs.values() if not isinstance(v, bool)]
  attrs = {k: v for k, v in operands_and_attrs.items() if isinstance(v, bool)}
  return jax.ffi.ffi_call(target, result_type, vmap_method="sequential")(*operands, **attrs)


def _sums_type(x):
  """Type of the float32 [2, C] per-channel sums of map x (varying over x's mesh axes, like x)."""
  return jax.typeof(x).update(shape=(2, x.shape[-1]), dtype=jnp.float32)


def _global_sums(local_sums, axis_name):
  return local_sums if axis_name is None else jax.lax.psum(local_sums, axis_name)


def _count(x, axis_name) -> int:
  rows = x.size // x.shape[-1]
  return rows if axis_name is None else rows * jax.lax.axis_size(axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused_batch_norm(x, scale, bias, residual, relu: bool, epsilon: float, axis_name):
  """`batch_norm_train` of operands varying alike."""
  return _fused_forward(x, scale, bias, residual, relu, epsilon, axis_name)[0]


def _fused_forward(x, scale, bias, residual, relu, epsilon, axis_name):
  count = _count(x, axis_name)
  sums = _global_sums(_call(MOMENTS, _sums_type(x), x=x), axis_name)
  mean = sums[0] / count
  var = jnp.maximum(sums[1] / count - mean * mean, 0.0)
  inverse_std = jax.lax.rsqrt(var + epsilon)
  multiplier = scale * inverse_std
  shift = bias - mean * multiplier
  if residual is None:
    y = _call(APPLY, jax.typeof(x), x=x, scale=multiplier, shift=shift, relu=relu)
  else:
    y = _call(APPLY_RESIDUAL, jax.typeof(x), x=x, scale=multiplier, shift=shift,
              residual=residual, relu=relu)
  return (y, mean, var), (x, y, scale, mean, inverse_std, residual is None)


def _fused_backward(relu, epsilon, axis_name, saved, cotangents):
  """Gradients through the normalisation and the statistics (tested against NumPy float64 and
  nn.BatchNorm's autodiff). With g the gradient past the ReLU's mask, x only enters through
  x * scale / std and the sums [sum x, sum x^2], so dx = a * g + b * x + c per channel, where b
  and c carry the gradients reaching the global mean and variance (from the shift, the std and
  the returned statistics); the per-channel sums of g and g * x they need are summed over
  `axis_name`. The parameters' gradients stay per device: `vary_alike`'s cast, which made them
  vary like x, sums them."""
  del epsilon
  x, y, scale, mean, inverse_std, no_residual = saved
  dy, dmean, dvar = cotangents
  count = _count(x, axis_name)
  local = _call(GRAD_SUMS, _sums_type(x), dy=dy, x=x, y=y, relu=relu)
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
    dx = _call(GRAD_INPUT, jax.typeof(x), dy=dy, x=x, y=y, a=a, b=b, c=c, relu=relu)
    dresidual = None
  else:
    dx, dresidual = _call(GRAD_INPUT_RESIDUAL, [jax.typeof(x)] * 2, dy=dy, x=x, y=y, a=a, b=b,
                          c=c, relu=relu)
  return dx, dscale_local, dbias_local, dresidual


_fused_batch_norm.defvjp(_fused_forward, _fused_backward)
