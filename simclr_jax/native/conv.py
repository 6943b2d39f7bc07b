"""Convolutions from oneDNN, called by XLA through its FFI, for training on the CPU backend.

XLA's CPU convolutions compute the kernel gradient at 10-20% of the machine's matmul speed
(experiments/results/conv_layers.md), and it is a third of a training step's convolution work.
oneDNN, which PyTorch and TensorFlow use on CPUs, runs all three passes near matmul speed. The
kernels are in `onednn_conv.cc`: XLA calls them as custom calls with the operands' own buffers,
on the thread that runs the computation, so they work on any number of CPU devices per process
and inside `shard_map`. Two backends besides 'xla' (XLA's own convolutions):

- 'onednn': float32, the forward pass and both gradients.
- 'onednn_bf16': operands rounded to bfloat16, products summed and results returned in float32,
  as a TPU's default precision does for float32 convolutions; for CPUs with bfloat16 matrix units
  (AMX, AVX512-BF16). Parameters, batch norm and the loss stay float32. On a CPU without those
  units compare it with 'onednn' before choosing it.

Either backend takes bfloat16 operands as they are (a model with `dtype=bfloat16`, whose maps stay
in bfloat16 between layers) and returns bfloat16 results and gradients: no casts around the
kernels and half the memory traffic; the kernel gradient is summed in float32 and rounded once.

`conv_general_dilated` has `lax.conv_general_dilated`'s signature, which is what `nn.Conv` calls.
It handles NHWC/HWIO convolutions of two float32 or two bfloat16 operands without dilation or
groups, which covers every convolution of the ResNets here. Anything else goes to
`lax.conv_general_dilated` unchanged. Gradients are first order only, and forward-mode
differentiation raises an error.
"""
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from simclr_jax.native import build
from simclr_jax.native.varying import vary_alike

FORWARD, BACKWARD_DATA, BACKWARD_WEIGHTS = TARGETS = (
    "simclr_conv_forward", "simclr_conv_backward_data", "simclr_conv_backward_weights")
KERNELS = build.Kernels("onednn_conv.cc", TARGETS, build.onednn_build)
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def conv_function(backend: str) -> Callable:
  """The `conv_general_dilated` for `nn.Conv` of a resolved conv backend: lax's for 'xla', the
  oneDNN one computing in float32 ('onednn') or bfloat16 ('onednn_bf16')."""
  if backend == "xla":
    return jax.lax.conv_general_dilated
  KERNELS.register()  # a missing compiler or oneDNN fails here, not when tracing
  return functools.partial(conv_general_dilated, compute_dtype=_COMPUTE_DTYPES[backend])


def _output_shape(x_shape, kernel_shape, strides, padding) -> tuple[int, ...]:
  spatial = tuple((size + low + high - window) // stride + 1 for size, window, stride, (low, high)
                  in zip(x_shape[1:3], kernel_shape[:2], strides, padding))
  return (x_shape[0], *spatial, kernel_shape[3])


def _call(target: str, result_shape, *operands, strides, padding, dtype=jnp.float32):
  """One oneDNN pass; its `dtype` result varies over the same mesh axes as the operands."""
  KERNELS.register()
  result = jax.typeof(operands[0]).update(shape=result_shape, dtype=dtype)
  return jax.ffi.ffi_call(target, result, vmap_method="sequential")(
      *operands, strides=np.asarray(strides, np.int64),
      padding_low=np.asarray([low for low, _ in padding], np.int64),
      padding_high=np.asarray([high for _, high in padding], np.int64))


def forward(x, kernel, strides: Sequence[int] = (1, 1),
            padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0))):
  """The forward custom call alone on NHWC x and HWIO kernel, both float32 or both bfloat16 (no
  casts, no gradient; float32 result): the kernels' own speed, e.g. a matmul-shaped 1x1
  convolution as the benchmarks' bfloat16 ceiling."""
  strides = tuple(strides)
  padding = tuple(tuple(pair) for pair in padding)
  return _call(FORWARD, _output_shape(x.shape, kernel.shape, strides, padding), x, kernel,
               strides=strides, padding=padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _onednn_conv(x, kernel, strides, padding, compute_dtype):
  """The convolution of x and kernel (one dtype) computed in `compute_dtype`, in x's dtype."""
  return _onednn_conv_forward(x, kernel, strides, padding, compute_dtype)[0]


def _onednn_conv_forward(x, kernel, strides, padding, compute_dtype):
  operands = (x.astype(compute_dtype), kernel.astype(compute_dtype))
  y = _call(FORWARD, _output_shape(x.shape, kernel.shape, strides, padding), *operands,
            strides=strides, padding=padding, dtype=x.dtype)
  return y, operands


def _onednn_conv_backward(strides, padding, compute_dtype, residuals, dy):
  """Both gradients in the primal dtype, which is dy's (y has x's and kernel's dtype)."""
  x, kernel = residuals
  operand_dy = dy.astype(compute_dtype)
  dx = _call(BACKWARD_DATA, x.shape, operand_dy, kernel, strides=strides, padding=padding,
             dtype=dy.dtype)
  dkernel = _call(BACKWARD_WEIGHTS, kernel.shape, x, operand_dy, strides=strides,
                  padding=padding, dtype=dy.dtype)
  return dx, dkernel


_onednn_conv.defvjp(_onednn_conv_forward, _onednn_conv_backward)


def _is_supported(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                  feature_group_count, batch_group_count) -> bool:
  no_dilation = all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
  return (lhs.ndim == 4 and lhs.dtype == rhs.dtype and lhs.dtype in _OPERAND_DTYPES
          and no_dilation
          and feature_group_count == 1 and batch_group_count == 1
          and not isinstance(padding, str)
          and all(low >= 0 and high >= 0 for low, high in padding)
          and _is_nhwc_hwio(lhs, rhs, dimension_numbers))


def _is_nhwc_hwio(lhs, rhs, dimension_numbers) -> bool:
  as_numbers = functools.partial(jax.lax.conv_dimension_numbers, lhs.shape, rhs.shape)
  return as_numbers(dimension_numbers) == as_numbers(_DIMENSION_NUMBERS)


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision=None,
                         preferred_element_type=None, *, compute_dtype=jnp.float32):
  """`lax.conv_general_dilated`, run by oneDNN where it can be (see the module docstring)."""
  if preferred_element_type is None and _is_supported(
      lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
      batch_group_count):
    strides = tuple(int(s) for s in window_strides)
    padding = tuple((int(low), int(high)) for low, high in padding)
    if lhs.dtype == jnp.bfloat16:  # already rounded: compute in bfloat16 on either backend
      compute_dtype = jnp.bfloat16
    return _onednn_conv(*vary_alike(lhs, rhs), strides, padding, compute_dtype)
  return jax.lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)


_COMPUTE_DTYPES = {"onednn": jnp.float32, "onednn_bf16": jnp.bfloat16}
_OPERAND_DTYPES = (jnp.float32, jnp.bfloat16)
