"""ResNet v1.5 encoders laid out like the official SimCLR v1/v2 code (google-research/simclr).

The official TF graph is matched layer for layer (initialisers, BN settings, zero-initialised last
gamma, SimCLRv2 selective kernels with the ResNet-D stem and shortcuts) so that published TF
checkpoints can be imported and reproduce their accuracy. Two deliberate, documented choices:

- Padding. Official strided convs pad (k-1)//2 on each side (`fixed_padding`), which for the
  odd kernels used here is the symmetric padding we use in both modes. The official max-pool
  uses TF 'SAME' (extra row/column at the bottom/right): `tf_same_padding=True` reproduces it,
  the default pads the max-pool symmetrically. The ResNet-D shortcut average-pool (SK models)
  always pads as the official code does: a 2x2 window has no symmetric padding.
- Basic blocks (ResNet-18/34) use a projection shortcut only where the shape changes (standard
  ResNet: 11,176,512 parameters for ResNet-18); the official TF code also adds one to the first
  block of group 1. No official ResNet-18/34 checkpoint was published, so no import needs it.
"""
import functools
import math
import numbers
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from simclr_jax import native
from simclr_jax.models.batch_norm import BatchNorm

# depth -> (block kind, number of blocks in each of the 4 groups), as in the official resnet_v1().
BLOCK_GROUPS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
DEPTHS = tuple(sorted(BLOCK_GROUPS))
FEATURE_NAMES = ("stem", "block1", "block2", "block3", "block4")
SK_MIN_DIM = 32  # official sk_conv2d: min_dim of the mixing bottleneck

# tf.variance_scaling_initializer() defaults (TF1: scale 1, fan_in, truncated normal).
conv_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
ModuleFactory = Callable[..., nn.Module]


def scaled_channels(channels: int, width_multiplier: float) -> int:
  """Channels of a layer at a width multiplier (exactly `channels * w` for integer `w`)."""
  return max(1, int(round(channels * width_multiplier)))


def is_integer(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def validate_resnet_args(depth, width_multiplier, sk_ratio=0.0, bn_momentum=0.9, bn_epsilon=1e-5):
  """Raises ValueError naming the bad value and what is allowed."""
  if not is_integer(depth) or depth not in BLOCK_GROUPS:
    raise ValueError(f"ResNet depth must be one of {DEPTHS}, got {depth!r}")
  if not (_is_real(width_multiplier) and math.isfinite(width_multiplier)
          and width_multiplier > 0):
    raise ValueError(f"width_multiplier must be a finite number > 0, got {width_multiplier!r}")
  if not _is_real(sk_ratio) or not math.isfinite(sk_ratio) or sk_ratio < 0:
    raise ValueError(f"sk_ratio must be a finite number >= 0 (0 = no selective kernels, "
                     f"SimCLRv2 uses 0.0625), got {sk_ratio!r}")
  if not _is_real(bn_momentum) or not 0.0 <= bn_momentum < 1.0:
    raise ValueError(f"bn_momentum must be in [0, 1), got {bn_momentum!r}")
  if not _is_real(bn_epsilon) or not bn_epsilon > 0:
    raise ValueError(f"bn_epsilon must be > 0, got {bn_epsilon!r}")


def resnet_output_dim(depth: int, width_multiplier: float) -> int:
  """Width of the pooled representation h."""
  validate_resnet_args(depth, width_multiplier)
  expansion = 4 if BLOCK_GROUPS[depth][0] == "bottleneck" else 1
  return expansion * scaled_channels(512, width_multiplier)


def _symmetric_padding(kernel_size: int):
  pad = (kernel_size - 1) // 2
  return ((pad, pad), (pad, pad))


def _conv(conv: ModuleFactory, features: int, kernel_size: int, strides: int, name: str):
  """A square conv with the official padding (symmetric for odd kernels, at any stride)."""
  return conv(features, (kernel_size, kernel_size), strides=(strides, strides),
              padding=_symmetric_padding(kernel_size), name=name)


def _resnet_d_downsample(x: jax.Array, strides: int) -> jax.Array:
  """ResNet-D shortcut pooling exactly as the official code.

  Stride 2: zero-pad one row/column at the bottom/right, then 2x2 VALID average (zeros counted).
  Stride 1: 2x2 average with TF 'SAME' padding, which leaves the padding out of the count.
  """
  if strides > 1:
    return nn.avg_pool(x, (2, 2), strides=(strides, strides), padding=((0, 1), (0, 1)),
                       count_include_pad=True)
  return nn.avg_pool(x, (2, 2), strides=(1, 1), padding="SAME", count_include_pad=False)


def _projection_shortcut(x, features, strides, resnet_d, conv, norm):
  if resnet_d:
    x = _resnet_d_downsample(x, strides)
    strides = 1
  x = _conv(conv, features, 1, strides, "shortcut_conv")(x)
  return norm(name="shortcut_bn")(x)


def _selective_kernel_conv(x, filters, strides, sk_ratio, conv, norm, dtype):
  """SimCLRv2 selective-kernel 3x3 conv (official sk_conv2d): two streams mixed by attention."""
  streams = _conv(conv, 2 * filters, 3, strides, "conv2")(x)
  streams = norm(name="bn2")(streams, relu=True)
  streams = jnp.stack(jnp.split(streams, 2, axis=-1))  # [2, N, H, W, filters]
  summary = jnp.mean(jnp.sum(streams, axis=0), axis=(1, 2), keepdims=True)
  mid_dim = max(int(filters * sk_ratio), SK_MIN_DIM)
  summary = _conv(conv, mid_dim, 1, 1, "sk_reduce_conv")(summary)
  summary = norm(name="sk_reduce_bn")(summary, relu=True)
  mixing = _conv(conv, 2 * filters, 1, 1, "sk_mix_conv")(summary)
  mixing = jnp.stack(jnp.split(mixing, 2, axis=-1))
  mixing = jax.nn.softmax(mixing.astype(jnp.float32), axis=0).astype(dtype)
  return jnp.sum(streams * mixing, axis=0)


class BasicBlock(nn.Module):
  """conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN(gamma 0) (+ shortcut) -> ReLU."""
  filters: int
  strides: int
  conv: ModuleFactory
  norm: ModuleFactory
  resnet_d: bool = False

  @nn.compact
  def __call__(self, x):
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.filters:
      shortcut = _projection_shortcut(x, self.filters, self.strides, self.resnet_d, self.conv,
                                      self.norm)
    y = _conv(self.conv, self.filters, 3, self.strides, "conv1")(x)
    y = self.norm(name="bn1")(y, relu=True)
    y = _conv(self.conv, self.filters, 3, 1, "conv2")(y)
    return self.norm(scale_init=nn.initializers.zeros, name="bn2")(y, residual=shortcut, relu=True)


class BottleneckBlock(nn.Module):
  """v1.5 bottleneck: 1x1 -> 3x3(stride; selective kernel if sk_ratio > 0) -> 1x1(4x, gamma 0)."""
  filters: int
  strides: int
  conv: ModuleFactory
  norm: ModuleFactory
  sk_ratio: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    features_out = 4 * self.filters
    shortcut = x
    if self.strides != 1 or x.shape[-1] != features_out:
      shortcut = _projection_shortcut(x, features_out, self.strides, self.sk_ratio > 0, self.conv,
                                      self.norm)
    y = _conv(self.conv, self.filters, 1, 1, "conv1")(x)
    y = self.norm(name="bn1")(y, relu=True)
    if self.sk_ratio > 0:
      y = _selective_kernel_conv(y, self.filters, self.strides, self.sk_ratio, self.conv,
                                 self.norm, self.dtype)
    else:
      y = _conv(self.conv, self.filters, 3, self.strides, "conv2")(y)
      y = self.norm(name="bn2")(y, relu=True)
    y = _conv(self.conv, features_out, 1, 1, "conv3")(y)
    return self.norm(scale_init=nn.initializers.zeros, name="bn3")(y, residual=shortcut, relu=True)


class ResNet(nn.Module):
  """ResNet v1.5 encoder returning named feature maps and the pooled representation `h`.

  Inputs are float images in [0, 1], NHWC, without mean/std normalisation (as the official code).
  With `axis_name`, BN statistics are averaged over that mesh axis (global BN under shard_map).
  Computation runs in `dtype`; parameters are float32 and `h` is float32 (float64 when `dtype`
  is: tests compare whole training steps against float64 references).
  """
  depth: int
  width_multiplier: float = 1.0
  cifar_stem: bool = False
  sk_ratio: float = 0.0
  tf_same_padding: bool = False
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  axis_name: str | None = None
  dtype: Any = jnp.float32
  conv_backend: str = "xla"  # resolved; 'onednn', 'onednn_bf16': CPU kernels (simclr_jax.native)
  norm_backend: str = "jax"  # resolved; 'native': batch norm (+ ReLU, + residual) CPU kernels

  def __post_init__(self):
    super().__post_init__()
    validate_resnet_args(self.depth, self.width_multiplier, self.sk_ratio, self.bn_momentum,
                         self.bn_epsilon)
    native.check_resolved(conv_backend=self.conv_backend, norm_backend=self.norm_backend)

  @nn.compact
  def __call__(self, x, *, train: bool, stop_gradient_after_block: int = -1):
    """Returns {'stem', 'block1'..'block4': feature maps in `dtype`, 'h': [N, C] float32}.

    `stop_gradient_after_block=k >= 0` freezes the stem (k=0) and block groups 1..k: no gradient
    reaches them and their BN uses the running statistics even when `train` is True (the official
    `fine_tune_after_block`).
    """
    if not is_integer(stop_gradient_after_block) or stop_gradient_after_block not in range(-1, 5):
      raise ValueError("stop_gradient_after_block must be -1 (train everything) or 0..4 (freeze "
                       f"the stem and block groups up to it), got {stop_gradient_after_block!r}")
    if x.ndim != 4:
      raise ValueError(f"ResNet expects NHWC images of rank 4, got shape {x.shape}")
    block_kind, group_sizes = BLOCK_GROUPS[self.depth]
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_kernel_init,
                             dtype=self.dtype, param_dtype=jnp.float32,
                             conv_general_dilated=native.conv_function(self.conv_backend))

    def norm_for_stage(stage: int) -> ModuleFactory:
      frozen = stage <= stop_gradient_after_block
      return functools.partial(BatchNorm, use_running_average=frozen or not train,
                               momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                               axis_name=self.axis_name, dtype=self.dtype,
                               param_dtype=jnp.float32, native=self.norm_backend == "native")

    def end_of_stage(stage: int, x: jax.Array) -> jax.Array:
      features[FEATURE_NAMES[stage]] = x
      return jax.lax.stop_gradient(x) if stage == stop_gradient_after_block else x

    features = {}
    x = self._stem(x, conv, norm_for_stage(0))
    x = end_of_stage(0, x)
    for group, num_blocks in enumerate(group_sizes, start=1):
      norm = norm_for_stage(group)
      filters = scaled_channels(64 * 2 ** (group - 1), self.width_multiplier)
      for index in range(num_blocks):
        strides = 2 if group > 1 and index == 0 else 1
        name = f"block{group}_{index}"
        if block_kind == "bottleneck":
          x = BottleneckBlock(filters, strides, conv, norm, sk_ratio=self.sk_ratio,
                              dtype=self.dtype, name=name)(x)
        else:
          x = BasicBlock(filters, strides, conv, norm, resnet_d=self.sk_ratio > 0, name=name)(x)
      x = end_of_stage(group, x)
    features["h"] = jnp.mean(x.astype(jnp.promote_types(self.dtype, jnp.float32)), axis=(1, 2))
    return features

  def _stem(self, x, conv, norm):
    """CIFAR: 3x3/1 conv. ImageNet: 7x7/2 conv (ResNet-D: three 3x3 convs) + 3x3/2 max-pool."""
    width = scaled_channels(64, self.width_multiplier)
    if self.cifar_stem:
      x = _conv(conv, width, 3, 1, "stem_conv")(x)
      return norm(name="stem_bn")(x, relu=True)
    if self.sk_ratio > 0:  # ResNet-D deep stem: three 3x3 convs instead of one 7x7.
      half_width = scaled_channels(32, self.width_multiplier)
      x = _conv(conv, half_width, 3, 2, "stem_conv1")(x)
      x = norm(name="stem_bn1")(x, relu=True)
      x = _conv(conv, half_width, 3, 1, "stem_conv2")(x)
      x = norm(name="stem_bn2")(x, relu=True)
      x = _conv(conv, width, 3, 1, "stem_conv")(x)
    else:
      x = _conv(conv, width, 7, 2, "stem_conv")(x)
    x = norm(name="stem_bn")(x, relu=True)
    padding = "SAME" if self.tf_same_padding else _symmetric_padding(3)
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=padding)
