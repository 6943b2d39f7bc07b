"""Convolutions from oneDNN (as shipped in TensorFlow), for training on the CPU backend.

XLA's CPU convolutions compute the kernel gradient at 10-20% of the machine's matmul speed
(experiments/results/conv_layers.md). The kernel gradient is a third of a training step's
convolution work. oneDNN computes both gradients near matmul speed, and makes the ResNet-18
pretraining step 1.5-2x faster (experiments/results/train_step.md). Two backends:

- 'onednn': float32. The forward pass stays XLA's, so inference and evaluation are unchanged; the
  backward pass is one host callback into TensorFlow's `Conv2DBackpropInput` and
  `Conv2DBackpropFilter` ops.
- 'onednn_bf16': the forward pass and both gradients in oneDNN bfloat16, for CPUs with bfloat16
  matrix units (AMX, AVX512-BF16); on this project's AMX machine the ResNet-18 step runs 1.4-1.7x
  faster than with 'onednn' (experiments/results/train_step.md). Operands are rounded to
  bfloat16, products summed in float32 and results rounded to bfloat16 (then returned as
  float32), as a TPU's default precision does for float32 convolutions. Parameters, batch norm
  and the loss stay float32. On a CPU without those units it has not been measured; compare it
  with 'onednn' there before choosing it.

On the CPU backend the arrays already live in host memory. On an accelerator every activation
would cross to the host, so `resolve_conv_backend('auto')` picks 'onednn' only on the CPU backend,
with one device per process (see there); 'onednn_bf16' is chosen by name.

`conv_general_dilated` has `lax.conv_general_dilated`'s signature, which is what `nn.Conv` calls.
It handles float32 NHWC/HWIO convolutions without dilation or groups, which covers every
convolution of the ResNets here. Anything else goes to `lax.conv_general_dilated` unchanged.
Gradients are first order only, and forward-mode differentiation raises an error.
"""
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

CONV_BACKENDS = ("auto", "xla", "onednn", "onednn_bf16")
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def resolve_conv_backend(backend: str, devices_per_process: int) -> str:
  """'xla', 'onednn' or 'onednn_bf16' for a computation over `devices_per_process` devices of
  each process.

  'auto' picks oneDNN on the CPU backend with one device per process. Several CPU devices in one
  process (`--xla_force_host_platform_device_count`) cannot use it: each callback's arguments are
  first placed on CPU device 0, and if device 0 is waiting in a collective (global batch norm) for
  the device that called back, neither proceeds.
  """
  if backend not in CONV_BACKENDS:
    raise ValueError(f"conv_backend={backend!r}; allowed: {', '.join(CONV_BACKENDS)}")
  one_cpu_device = jax.default_backend() == "cpu" and devices_per_process == 1
  if backend in _CONVOLUTIONS and not one_cpu_device:
    raise ValueError(
        f"conv_backend={backend!r} needs the CPU backend and one device per process; this run has "
        f"{devices_per_process} {jax.default_backend()} device(s) per process. Use 'auto' or "
        "'xla'.")
  if backend == "auto":
    return "onednn" if one_cpu_device else "xla"
  return backend


def conv_function(backend: str) -> Callable | None:
  """The `conv_general_dilated` for `nn.Conv` ('xla': None, which keeps lax's own).

  Imports TensorFlow here, outside any trace: a first import inside a callback crashes.
  """
  if backend == "xla":
    return None
  if backend not in _CONVOLUTIONS:
    raise ValueError(f"conv backend {backend!r}: 'xla', 'onednn' or 'onednn_bf16' (resolve 'auto' "
                     "first)")
  _tf()
  return _CONVOLUTIONS[backend]


def _tf_arguments(strides, padding: str) -> dict:
  return dict(strides=[1, *strides, 1], padding=padding, data_format="NHWC")


def _tf_same_padding(in_size: int, kernel_size: int, stride: int) -> tuple[int, int]:
  out_size = -(-in_size // stride)
  total = max((out_size - 1) * stride + kernel_size - in_size, 0)
  return total // 2, total - total // 2


def _as_same_or_valid(x, kernel, strides, padding):
  """(x, 'SAME' | 'VALID') equal to the explicit `padding`.

  TensorFlow's backward ops take oneDNN's fast path only for these two paddings: with explicit
  padding they fall back to kernels several times slower. Other paddings are applied with
  `jnp.pad`, outside the callback, where autodiff handles them.
  """
  if all(pair == (0, 0) for pair in padding):
    return x, "VALID"
  same = tuple(_tf_same_padding(x.shape[1 + axis], kernel.shape[axis], strides[axis])
               for axis in range(2))
  if tuple(padding) == same:
    return x, "SAME"
  return jnp.pad(x, ((0, 0), *padding, (0, 0))), "VALID"


def _tf():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf


# TensorFlow aborts the process on a tensor whose buffer is less aligned than this
# (EIGEN_MAX_ALIGN_BYTES on AVX-512 builds).
_TF_ALIGNMENT = 64


def _to_tf(array):
  """A TensorFlow tensor of a callback argument: the argument's own buffer through DLPack when
  TensorFlow can use it in place, a copy otherwise. In the wide, shallow layers a copy costs over
  half as much as the convolution (a 128x32x32x16 bfloat16 batch: ~1.3 ms to copy, ~2 ms to
  convolve)."""
  tf = _tf()
  if isinstance(array, jax.Array) and array.unsafe_buffer_pointer() % _TF_ALIGNMENT == 0:
    return tf.experimental.dlpack.from_dlpack(array.__dlpack__())
  return tf.convert_to_tensor(np.asarray(array))


def _from_tf(tensor) -> np.ndarray:
  """A NumPy view of a TensorFlow result's buffer (no copy). NumPy's DLPack has no bfloat16, so
  bfloat16 crosses as its uint16 bits."""
  tf = _tf()
  if tensor.dtype == tf.bfloat16:
    return np.from_dlpack(tf.bitcast(tensor, tf.uint16)).view(jnp.bfloat16)
  return np.from_dlpack(tensor)


def _forward_on_host(x, kernel, *, strides, padding):
  y = _tf().raw_ops.Conv2D(input=_to_tf(x), filter=_to_tf(kernel),
                           **_tf_arguments(strides, padding))
  return _from_tf(y)


def _backward_on_host(x, kernel, dy, *, strides, padding):
  tf = _tf()
  arguments = _tf_arguments(strides, padding)
  x, kernel, dy = _to_tf(x), _to_tf(kernel), _to_tf(dy)
  dx = tf.raw_ops.Conv2DBackpropInput(input_sizes=x.shape, filter=kernel, out_backprop=dy,
                                      **arguments)
  dkernel = tf.raw_ops.Conv2DBackpropFilter(input=x, filter_sizes=kernel.shape, out_backprop=dy,
                                            **arguments)
  return _from_tf(dx), _from_tf(dkernel)


def _on_host(function, result_shapes, *args):
  """`function(*args)` run on the host. Inside shard_map a callback's results come back typed as
  device-invariant; they are this device's, so they are cast to vary like `args` (which
  `_vary_alike` made alike; the last one stands for all)."""
  results = jax.pure_callback(function, result_shapes, *args, vmap_method="sequential")
  varying = tuple(sorted(jax.typeof(args[-1]).manual_axis_type.varying))
  if not varying:
    return results
  return jax.tree.map(lambda r: jax.lax.pcast(r, varying, to="varying"), results)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _onednn_conv(x, kernel, strides, padding, compute_dtype):
  if compute_dtype == jnp.float32:  # XLA's forward convolution is as fast as oneDNN's float32 one
    return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                        dimension_numbers=_DIMENSION_NUMBERS)
  x, kernel = x.astype(compute_dtype), kernel.astype(compute_dtype)
  shape = jax.eval_shape(functools.partial(jax.lax.conv_general_dilated, window_strides=strides,
                                           padding=padding, dimension_numbers=_DIMENSION_NUMBERS),
                         x, kernel)
  y = _on_host(functools.partial(_forward_on_host, strides=strides, padding=padding), shape,
               x, kernel)
  return y.astype(jnp.float32)


def _onednn_conv_forward(x, kernel, strides, padding, compute_dtype):
  residuals = (x.astype(compute_dtype), kernel.astype(compute_dtype))
  return _onednn_conv(x, kernel, strides, padding, compute_dtype), residuals


def _onednn_conv_backward(strides, padding, compute_dtype, residuals, dy):
  x, kernel = residuals
  gradients = _on_host(
      functools.partial(_backward_on_host, strides=strides, padding=padding),
      (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(kernel.shape, kernel.dtype)),
      x, kernel, dy.astype(compute_dtype))
  return tuple(g.astype(jnp.float32) for g in gradients)


_onednn_conv.defvjp(_onednn_conv_forward, _onednn_conv_backward)


def _vary_alike(*values):
  """`values` cast to vary over the same mesh axes, as JAX does before any primitive inside
  `shard_map`. The cast's transpose sums the kernel's gradient over the data axis, so the
  callback itself sees one device's shard like any other primitive."""
  varying = [jax.typeof(v).manual_axis_type.varying for v in values]
  axes = frozenset().union(*varying)
  missing = [tuple(sorted(axes - own)) for own in varying]
  return tuple(jax.lax.pcast(v, axes_to_add, to="varying") if axes_to_add else v
               for v, axes_to_add in zip(values, missing))


def _is_supported(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                  feature_group_count, batch_group_count) -> bool:
  no_dilation = all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
  return (lhs.ndim == 4 and lhs.dtype == rhs.dtype == jnp.float32 and no_dilation
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
    lhs, tf_padding = _as_same_or_valid(lhs, rhs, strides, padding)
    return _onednn_conv(*_vary_alike(lhs, rhs), strides, tf_padding, compute_dtype)
  return jax.lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)


_CONVOLUTIONS = {"onednn": conv_general_dilated,
                 "onednn_bf16": functools.partial(conv_general_dilated, compute_dtype=jnp.bfloat16)}
