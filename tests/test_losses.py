"""NT-Xent and classification metrics: the official objective and the paper's per-anchor mean,
gradients, and 8 devices == 1 device."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from simclr_jax import losses

# Jitted once per shape: op-by-op dispatch of the losses is what would make this file slow.
nt_xent = jax.jit(losses.nt_xent, static_argnames=("temperature", "axis_name"))
classification_metrics = jax.jit(losses.classification_metrics, static_argnames=("axis_name",))


def reference_nt_xent(z1, z2, temperature):
  """(official loss, paper's per-anchor loss, accuracy, entropy), plainly in float64 NumPy.

  The official code (objective.py) sums the two directions' means over the N first / second
  views: the sum over the 2N anchors divided by N. The paper's loss divides it by 2N.
  """
  z1 = np.asarray(z1, np.float64)
  z2 = np.asarray(z2, np.float64)
  n = len(z1)
  views = np.concatenate([z1, z2]) / np.linalg.norm(np.concatenate([z1, z2]), axis=1,
                                                    keepdims=True)
  total = 0.0
  for anchor in range(2 * n):
    positive = (anchor + n) % (2 * n)
    candidates = [k for k in range(2 * n) if k != anchor]
    logits = np.array([views[anchor] @ views[k] / temperature for k in candidates])
    log_normalizer = logits.max() + math.log(np.exp(logits - logits.max()).sum())
    total += log_normalizer - views[anchor] @ views[positive] / temperature
  correct, entropy = 0, 0.0
  for i in range(n):
    logits = np.array([views[i] @ views[n + k] / temperature for k in range(n)])
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    correct += int(np.argmax(logits) == i)
    entropy -= np.sum(probs * np.log(probs))
  return total / n, total / (2 * n), correct / n, entropy / n


def random_views(seed, n, d, noise=1.0):
  """Two views of n embeddings; small `noise` makes the positives easy to find."""
  rng = np.random.default_rng(seed)
  base = rng.normal(size=(n, d)).astype(np.float32)
  return (base + noise * rng.normal(size=(n, d)).astype(np.float32),
          base + noise * rng.normal(size=(n, d)).astype(np.float32))


@pytest.mark.parametrize("n,d,temperature,noise", [
    (2, 3, 0.5, 1.0), (8, 16, 0.1, 0.5), (32, 128, 0.2, 1.0), (5, 7, 1.0, 0.3), (12, 4, 0.05, 0.2)])
def test_nt_xent_equals_the_official_objective_and_the_papers_mean(n, d, temperature, noise):
  z1, z2 = random_views(n * d, n, d, noise)
  loss, metrics = nt_xent(jnp.asarray(z1), jnp.asarray(z2), temperature=temperature)
  expected_loss, expected_per_anchor, expected_accuracy, expected_entropy = reference_nt_xent(
      z1, z2, temperature)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["contrastive_loss_per_anchor"], expected_per_anchor,
                             rtol=1e-5)
  np.testing.assert_allclose(metrics["contrastive_accuracy"], expected_accuracy, rtol=1e-6)
  np.testing.assert_allclose(metrics["contrastive_entropy"], expected_entropy, rtol=1e-5,
                             atol=1e-6)
  assert loss.dtype == jnp.float32


def test_loss_at_random_init_is_about_2_log_2n_minus_1():
  z1, z2 = random_views(0, 256, 128, noise=10.0)  # unrelated views, like an untrained encoder
  loss, metrics = nt_xent(jnp.asarray(z1), jnp.asarray(z2), temperature=0.5)
  assert abs(float(loss) - 2 * math.log(2 * 256 - 1)) < 0.1
  assert abs(float(metrics["contrastive_loss_per_anchor"]) - math.log(2 * 256 - 1)) < 0.05
  assert abs(float(metrics["contrastive_entropy"]) - math.log(256)) < 0.05


def test_gradients_match_finite_differences_in_float64():
  z1, z2 = random_views(1, 6, 5, noise=0.5)
  with jax.enable_x64(True):
    loss = jax.jit(lambda a, b: losses.nt_xent(a, b, temperature=0.2)[0])
    check_grads(loss, (jnp.asarray(z1, jnp.float64), jnp.asarray(z2, jnp.float64)), order=1,
                modes=["rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("noise", [0.05, 1.2])  # positives ~20 logits above the rest; loss ~2
def test_stable_at_low_temperature_with_bfloat16_inputs(noise):
  z1, z2 = random_views(2, 64, 32, noise)
  loss_and_grads = jax.jit(jax.value_and_grad(
      lambda a, b: nt_xent(a, b, temperature=0.05), argnums=(0, 1), has_aux=True))
  (loss32, metrics32), grads32 = loss_and_grads(jnp.asarray(z1), jnp.asarray(z2))
  (loss16, metrics16), grads16 = loss_and_grads(jnp.asarray(z1, jnp.bfloat16),
                                                jnp.asarray(z2, jnp.bfloat16))
  assert loss16.dtype == jnp.float32 and np.isfinite(float(loss16))
  assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads16)
  # atol: float32 cancellation in log-normaliser minus positive (both ~20) at a loss of ~8e-5.
  np.testing.assert_allclose(loss32, reference_nt_xent(z1, z2, 0.05)[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss16, loss32, rtol=0.01, atol=1e-6)
  np.testing.assert_allclose(metrics16["contrastive_entropy"], metrics32["contrastive_entropy"],
                             rtol=0.01)
  assert float(metrics16["contrastive_accuracy"]) == float(metrics32["contrastive_accuracy"])
  for g16, g32 in zip(grads16, grads32):
    np.testing.assert_allclose(np.asarray(g16, np.float32), g32, atol=0.05 * np.abs(g32).max())


def test_self_similarity_never_counts_even_for_identical_views():
  z = jnp.asarray(random_views(3, 4, 8)[0])
  loss, metrics = nt_xent(z, z, temperature=0.1)
  # Unmasked, each anchor's similarity with itself would tie with its positive: loss >= 2 log 2.
  assert float(metrics["contrastive_accuracy"]) == 1.0
  assert float(loss) < 0.2


@pytest.mark.parametrize("z1_shape,z2_shape,temperature,message", [
    ((4, 8), (4, 9), 0.1, r"\(4, 8\) and \(4, 9\)"),
    ((4, 8), (5, 8), 0.1, r"\(4, 8\) and \(5, 8\)"),
    ((4,), (4,), 0.1, r"\[n, d\]"),
    ((4, 8), (4, 8), 0.0, "temperature must be a positive scalar, got 0.0"),
    ((4, 8), (4, 8), -0.5, "got -0.5"),
    ((4, 8), (4, 8), "warm", "got 'warm'"),
])
def test_nt_xent_rejects_bad_input(z1_shape, z2_shape, temperature, message):
  with pytest.raises(ValueError, match=message):
    losses.nt_xent(jnp.ones(z1_shape), jnp.ones(z2_shape), temperature=temperature)


def test_classification_metrics_match_numpy():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(40, 10)).astype(np.float32)
  labels = rng.integers(0, 10, size=40).astype(np.int32)
  mask = rng.random(40) < 0.7
  metrics = classification_metrics(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
  log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  top5 = np.argsort(-logits, axis=1)[:, :5]
  np.testing.assert_allclose(metrics["loss"], -log_probs[mask, labels[mask]].mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["top1"], (logits.argmax(1) == labels)[mask].mean(),
                             rtol=1e-6)
  np.testing.assert_allclose(metrics["top5"], (top5 == labels[:, None]).any(1)[mask].mean(),
                             rtol=1e-6)
  assert float(metrics["count"]) == mask.sum()


def test_classification_metrics_edge_cases():
  logits = jnp.asarray([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
  labels = jnp.asarray([2, 1])
  metrics = classification_metrics(logits, labels)
  assert float(metrics["top1"]) == 0.5 and float(metrics["top5"]) == 1.0  # 3 classes < 5
  padded = classification_metrics(logits, jnp.asarray([2, 99]), jnp.asarray([True, False]))
  assert float(padded["loss"]) == pytest.approx(2.4076, abs=1e-4)  # padding label out of range
  empty = classification_metrics(logits, labels, jnp.zeros(2, jnp.bool_))
  assert {name: float(value) for name, value in empty.items()} == {
      "loss": 0.0, "top1": 0.0, "top5": 0.0, "count": 0.0}
  with pytest.raises(ValueError, match=r"\(2, 3\) and \(3,\)"):
    losses.classification_metrics(logits, jnp.asarray([0, 1, 2]))
  with pytest.raises(ValueError, match=r"mask must have the labels' shape \(2,\), got \(3,\)"):
    losses.classification_metrics(logits, labels, jnp.ones(3, jnp.bool_))


def data_mesh(num_devices):
  return jax.make_mesh((num_devices,), ("data",), devices=jax.devices()[:num_devices])


def losses_and_gradients(params, x1, x2, offset1, offset2, logits, labels, mask, axis_name):
  """Both losses, their metrics and gradients in one backward pass, as a trainer's step does.

  The offsets (zeros, sharded like the batch) are added to the embeddings, so their gradients are
  the gradients w.r.t. the embeddings; `params` are a replicated Dense projection.
  """
  def total_loss(params, z_offsets, logits):
    z1 = nn.Dense(8).apply(params, x1) + z_offsets[0]
    z2 = nn.Dense(8).apply(params, x2) + z_offsets[1]
    contrastive, contrastive_metrics = losses.nt_xent(z1, z2, temperature=0.2,
                                                      axis_name=axis_name)
    classification = losses.classification_metrics(logits, labels, mask, axis_name=axis_name)
    return contrastive + classification["loss"], (contrastive, contrastive_metrics, classification)

  (_, outputs), grads = jax.value_and_grad(total_loss, argnums=(0, 1, 2), has_aux=True)(
      params, (offset1, offset2), logits)
  return outputs, grads


def sharded_losses_and_gradients(mesh, params, *batch):
  """`losses_and_gradients` inside shard_map, inputs placed as their in_specs say (jax>=0.9)."""
  examples = jax.P("data")
  run = jax.jit(jax.shard_map(
      lambda *args: losses_and_gradients(*args, axis_name="data"), mesh=mesh,
      in_specs=(jax.P(),) + (examples,) * len(batch),
      out_specs=((jax.P(), jax.P(), jax.P()), (jax.P(), (examples, examples), examples))))
  return run(jax.device_put(params, jax.NamedSharding(mesh, jax.P())),
             *jax.device_put(batch, jax.NamedSharding(mesh, examples)))


def test_eight_devices_equal_one_device():
  """Loss, metrics and every gradient (embeddings, replicated Dense params) match 1 device."""
  x1, x2 = random_views(5, 16, 6, noise=0.5)
  rng = np.random.default_rng(6)
  zeros = np.zeros((16, 8), np.float32)
  batch = (x1, x2, zeros, zeros, rng.normal(size=(16, 10)).astype(np.float32),
           rng.integers(0, 10, size=16).astype(np.int32), rng.random(16) < 0.6)
  params = nn.Dense(8).init(jax.random.key(0), x1)
  unsharded = jax.jit(losses_and_gradients, static_argnames="axis_name")(
      params, *batch, axis_name=None)
  one = sharded_losses_and_gradients(data_mesh(1), params, *batch)
  eight = sharded_losses_and_gradients(data_mesh(8), params, *batch)
  for result in (one, eight):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 result, unsharded)
  assert float(np.abs(unsharded[1][0]["params"]["kernel"]).max()) > 1e-3  # a real gradient
