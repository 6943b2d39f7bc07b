"""Weighted k-nearest-neighbour accuracy on L2-normalised features (a label-cheap encoder monitor).

The InstDisc / SSL-library monitor: every test feature votes with its k most cosine-similar train
features, each vote weighted exp(similarity / temperature) and added to its neighbour's class; the
class with the largest total wins. Test features are processed in chunks, so memory is
O(chunk_size * num_train) whatever the test set size.
"""
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from simclr_jax.evaluators import RepresentationEvaluator
from simclr_jax.losses import l2_normalize


@functools.partial(jax.jit, static_argnames=("num_classes", "k"))
def knn_predict(train_features: jax.Array, train_labels: jax.Array, train_valid: jax.Array,
                test_features: jax.Array, *, num_classes: int, k: int,
                temperature: float) -> jax.Array:
  """Class scores [n_test, num_classes] of a chunk of test features (all features normalised).

  `train_valid` False rows (padding) are never anyone's neighbour.
  """
  similarity = jnp.dot(test_features, train_features.T, precision=jax.lax.Precision.HIGHEST)
  similarity = jnp.where(train_valid[None, :], similarity, -jnp.inf)
  top_similarity, top_index = jax.lax.top_k(similarity, k)
  weights = jnp.where(jnp.isfinite(top_similarity), jnp.exp(top_similarity / temperature), 0.0)
  votes = jax.nn.one_hot(train_labels[top_index], num_classes, dtype=jnp.float32)
  return jnp.einsum("nk,nkc->nc", weights, votes)


def knn_accuracy(train_features, train_labels, test_features, test_labels, *, num_classes: int,
                 k: int = 200, temperature: float = 0.1, train_mask=None, test_mask=None,
                 chunk_size: int = 256) -> float:
  """Top-1 accuracy of the weighted k-NN classifier over the (unmasked) test examples.

  Args:
    train_features: [n_train, d] features (any scale; they are L2-normalised here).
    train_labels: [n_train] integer labels in [0, num_classes).
    test_features: [n_test, d].
    test_labels: [n_test].
    num_classes: number of classes.
    k: neighbours per test example (clipped to the number of valid train examples).
    temperature: vote weight exp(cosine similarity / temperature).
    train_mask, test_mask: optional bool [n] (the eval pipeline's padding flags); False rows are
      ignored.
    chunk_size: test examples scored at once; bounds memory to chunk_size * n_train floats.
  """
  train_features = np.asarray(train_features)
  test_features = np.asarray(test_features)
  train_labels = np.asarray(train_labels).astype(np.int32)
  test_labels = np.asarray(test_labels).astype(np.int32)
  if train_features.ndim != 2 or test_features.ndim != 2 or (
      train_features.shape[1] != test_features.shape[1]):
    raise ValueError("train_features and test_features must be [n, d] with the same d, got "
                     f"{train_features.shape} and {test_features.shape}")
  if train_labels.shape != train_features.shape[:1] or test_labels.shape != test_features.shape[:1]:
    raise ValueError("labels must be [n] matching their features, got "
                     f"{train_labels.shape} for {train_features.shape} and "
                     f"{test_labels.shape} for {test_features.shape}")
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k must be an integer >= 1, got {k!r}")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature!r}")
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
  train_valid = (np.ones(len(train_labels), bool) if train_mask is None
                 else np.asarray(train_mask, bool))
  test_valid = np.ones(len(test_labels), bool) if test_mask is None else np.asarray(test_mask, bool)
  for name, labels, valid in (("train", train_labels, train_valid),
                              ("test", test_labels, test_valid)):
    if valid.shape != labels.shape:
      raise ValueError(f"{name}_mask must have shape {labels.shape}, got {valid.shape}")
    if valid.any() and (labels[valid].min() < 0 or labels[valid].max() >= num_classes):
      raise ValueError(f"{name} labels must lie in [0, {num_classes}), got "
                       f"[{labels[valid].min()}, {labels[valid].max()}]")
  num_train = int(train_valid.sum())
  if num_train == 0:
    raise ValueError("k-NN needs at least one valid train example")
  num_test = int(test_valid.sum())
  if num_test == 0:
    return 0.0

  test_features = test_features[test_valid]
  test_labels = test_labels[test_valid]
  train_features = l2_normalize(jnp.asarray(train_features, jnp.float32))
  train_labels = jnp.asarray(train_labels)
  train_valid = jnp.asarray(train_valid)
  num_chunks = -(-num_test // chunk_size)
  padded = np.zeros((num_chunks * chunk_size, test_features.shape[1]), np.float32)
  padded[:num_test] = test_features
  correct = 0
  for start in range(0, num_test, chunk_size):
    scores = knn_predict(train_features, train_labels, train_valid,
                         l2_normalize(jnp.asarray(padded[start:start + chunk_size])),
                         num_classes=num_classes, k=min(k, num_train), temperature=temperature)
    predictions = np.asarray(jnp.argmax(scores, axis=1))[:num_test - start]
    correct += int(np.sum(predictions == test_labels[start:start + chunk_size]))
  return correct / num_test


class KnnEvaluator(RepresentationEvaluator):
  """k-NN top-1 of a representation: a memory bank of train examples, held-out queries
  (`config.evals.knn`: k and temperature beside the common fields)."""

  def run(self, state: Any) -> dict[str, float]:
    train, test = self._train_and_eval(state)
    return {"knn_top1": knn_accuracy(train["outputs"], train["labels"], test["outputs"],
                                     test["labels"], num_classes=self._num_classes,
                                     k=self._config["k"],
                                     temperature=self._config["temperature"])}
