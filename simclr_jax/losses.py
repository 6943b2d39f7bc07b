"""NT-Xent (the SimCLR contrastive loss) and classification metrics, global over devices.

Both functions run unchanged on one device (`axis_name=None`) and inside `jax.shard_map` over a data
axis (`axis_name='data'`), where they see every device's examples and return values that are
identical on every device and equal to the one-device result on the same global batch.
"""
from typing import Any

import jax
import jax.numpy as jnp

# The logit of an anchor with itself, so it never counts as a candidate (the official LARGE_NUM).
SELF_SIMILARITY_LOGIT = -1e9
# tf.math.l2_normalize's epsilon, so a zero embedding normalises to zero rather than NaN.
L2_NORMALIZE_EPSILON = 1e-12


def l2_normalize(x: jax.Array) -> jax.Array:
  """x / |x| over the last axis (a zero vector stays zero, as tf.math.l2_normalize)."""
  squared_norm = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared_norm, L2_NORMALIZE_EPSILON))


def _check_temperature(temperature: Any) -> None:
  if isinstance(temperature, jax.core.Tracer):
    return  # A traced temperature (e.g. a schedule) cannot be inspected here.
  try:
    is_positive = float(temperature) > 0
  except (TypeError, ValueError):
    is_positive = False
  if not is_positive:
    raise ValueError(f"temperature must be a positive scalar, got {temperature!r}")


def _sum_over_devices(values, axis_name):
  return values if axis_name is None else jax.lax.psum(values, axis_name)


def nt_xent(z1: jax.Array, z2: jax.Array, *, temperature: float,
            axis_name: Any = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """SimCLR's normalised-temperature cross-entropy over the global batch.

  Row i of `z1` and of `z2` embeds two views of the same image. Each of the 2N anchors (N images
  over all devices) is classified among 2N-1 candidates: its other view (the positive) and the
  2N-2 views of the other images; the anchor itself is masked out. Similarities are cosine
  similarities divided by `temperature`, computed in float32 (float64 for float64 inputs) at full
  matmul precision whatever the input dtype: at tau=0.1 a bfloat16 similarity error of 1e-2 would
  move a logit by 0.1.

  Under `jax.shard_map` with `axis_name`, this device's rows are scored against every device's
  rows (`all_gather`), so memory is O(local_n * N) per device, never N x N. The positive of local
  row i is global column `axis_index * local_n + i`.

  Scale: `loss` is the official objective (google-research/simclr `add_contrastive_loss`): the
  sum of the two directions' mean cross-entropies, i.e. the sum over the 2N anchors divided by N,
  about 2 log(2N-1) at random init. It is twice the paper's mean over the 2N anchors, which
  `metrics['contrastive_loss_per_anchor']` reports. Optimising the official scale lets official
  hyperparameters apply unchanged: LARS adds weight decay to the gradient before its trust ratio
  (so the decay's weight against the loss depends on the loss's scale), and the batch-norm and
  bias parameters it excludes from the trust ratio step by `lr * gradient`.

  Gradients (verified on jax 0.10.2 with shard_map's default `check_vma=True`, see
  tests/test_losses.py): `loss` is the psum of this device's share, so `jax.grad` inside
  `shard_map` gives each device the gradient of the GLOBAL loss w.r.t. its own rows (the transpose
  of `all_gather` is `psum_scatter`; the transpose of `psum` to an unvarying value is the
  identity). For replicated (unvarying, `P()`) parameters shard_map's autodiff already sums the
  per-device contributions: the gradient equals the one-device gradient, identical on every
  device. A trainer must NOT `psum` parameter gradients again (that multiplies them by the device
  count); `pmean` of them is a no-op. With `check_vma=False` the gradients come out wrong
  (embedding gradients x device count), so do not turn it off.

  Args:
    z1: [n, d] this device's embeddings of the first views (any float dtype).
    z2: [n, d] the second views, same shape.
    temperature: positive scalar tau.
    axis_name: mesh axis (or tuple of axes) the batch is sharded over inside `shard_map`, or None
      on a single device.

  Returns:
    (loss, metrics): float32 scalars (float64 for float64 inputs), identical on every device.
    `contrastive_loss_per_anchor` is the paper's loss (`loss` / 2), `contrastive_accuracy` the
    fraction of first views whose largest view-to-view logit (against the N second views) is
    their positive, and `contrastive_entropy` the mean entropy of that softmax, as the official
    code logs them.
  """
  if z1.ndim != 2 or z1.shape != z2.shape:
    raise ValueError(
        f"z1 and z2 must both be [n, d] with the same shape, got {z1.shape} and {z2.shape}")
  _check_temperature(temperature)
  compute_dtype = jnp.result_type(z1.dtype, z2.dtype, jnp.float32)
  z1 = l2_normalize(z1.astype(compute_dtype))
  z2 = l2_normalize(z2.astype(compute_dtype))
  local_n = z1.shape[0]
  if axis_name is None:
    z1_all, z2_all, first_row = z1, z2, 0
  else:
    z1_all = jax.lax.all_gather(z1, axis_name, tiled=True)
    z2_all = jax.lax.all_gather(z2, axis_name, tiled=True)
    first_row = jax.lax.axis_index(axis_name) * local_n
  global_n = z1_all.shape[0]
  positive_columns = first_row + jnp.arange(local_n)
  is_self = positive_columns[:, None] == jnp.arange(global_n)[None, :]

  def similarity(anchors, candidates):
    return jnp.dot(anchors, candidates.T, precision=jax.lax.Precision.HIGHEST) / temperature

  def cross_entropy_sum(other_view_logits, same_view_logits):
    same_view_logits = jnp.where(is_self, SELF_SIMILARITY_LOGIT, same_view_logits)
    log_normalizer = jnp.logaddexp(jax.nn.logsumexp(other_view_logits, axis=1),
                                   jax.nn.logsumexp(same_view_logits, axis=1))
    positive_logits = jnp.take_along_axis(other_view_logits, positive_columns[:, None], axis=1)
    return jnp.sum(log_normalizer - positive_logits[:, 0])

  logits_ab = similarity(z1, z2_all)
  loss_sum = (cross_entropy_sum(logits_ab, similarity(z1, z1_all)) +
              cross_entropy_sum(similarity(z2, z1_all), similarity(z2, z2_all)))
  log_probs_ab = jax.nn.log_softmax(logits_ab, axis=1)
  correct = jnp.sum(jnp.argmax(logits_ab, axis=1) == positive_columns)
  entropy_sum = -jnp.sum(jnp.exp(log_probs_ab) * log_probs_ab)
  loss_sum, correct, entropy_sum = _sum_over_devices((loss_sum, correct, entropy_sum), axis_name)
  metrics = {
      "contrastive_loss_per_anchor": loss_sum / (2 * global_n),
      "contrastive_accuracy": correct.astype(jnp.float32) / global_n,
      "contrastive_entropy": entropy_sum / global_n,
  }
  return loss_sum / global_n, metrics


def classification_metrics(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None,
                           axis_name: Any = None) -> dict[str, jax.Array]:
  """Softmax cross-entropy and top-1/top-5 accuracy over the masked examples of all devices.

  `loss` is differentiable and, like `nt_xent`'s, a psum of per-device shares: under `shard_map`
  it is the global mean and its gradient needs no further reduction. A `mask` (the eval pipeline's
  padding flag) makes every real example count exactly once; with no valid example the loss and
  accuracies are 0, not NaN.

  Args:
    logits: [n, num_classes] (computed in float32).
    labels: [n] integer class ids.
    mask: optional [n] bool, True for examples that count.
    axis_name: mesh axis inside `shard_map`, or None.

  Returns:
    dict with `loss`, `top1`, `top5` (fractions; top5 is 1 with <= 5 classes) and `count` (number
    of examples counted, float32), identical on every device.
  """
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(
        f"logits must be [n, num_classes] and labels [n], got {logits.shape} and {labels.shape}")
  if mask is None:
    mask = jnp.ones(labels.shape, jnp.bool_)
  elif mask.shape != labels.shape:
    raise ValueError(f"mask must have the labels' shape {labels.shape}, got {mask.shape}")
  logits = logits.astype(jnp.float32)
  cross_entropy = -jnp.take_along_axis(
      jax.nn.log_softmax(logits, axis=1), labels[:, None], axis=1)[:, 0]
  _, top5_classes = jax.lax.top_k(logits, min(5, logits.shape[1]))
  # where, not multiply: a padding example's label may be out of range (NaN cross-entropy).
  masked_sum = lambda values: jnp.sum(jnp.where(mask, values, 0.0))
  sums = {
      "loss": masked_sum(cross_entropy),
      "top1": masked_sum(jnp.argmax(logits, axis=1) == labels),
      "top5": masked_sum(jnp.any(top5_classes == labels[:, None], axis=1)),
      "count": masked_sum(1.0),
  }
  sums = _sum_over_devices(sums, axis_name)
  denominator = jnp.maximum(sums["count"], 1.0)
  return {name: value if name == "count" else value / denominator for name, value in sums.items()}
