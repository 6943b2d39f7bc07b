"""Weighted k-NN: agrees with a plain NumPy implementation, chunking and masks change nothing."""
import numpy as np
import pytest

from simclr_jax.evaluators import knn


def numpy_knn_accuracy(train_features, train_labels, test_features, test_labels, *, num_classes,
                       k, temperature):
  """The InstDisc monitor written out directly: normalise, top-k cosine, exp(s/T) class votes."""
  normalize = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  similarity = normalize(test_features) @ normalize(train_features).T
  neighbours = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
  votes = np.zeros((len(test_features), num_classes))
  for row, columns in enumerate(neighbours):
    for column in columns:
      votes[row, train_labels[column]] += np.exp(similarity[row, column] / temperature)
  return float(np.mean(votes.argmax(axis=1) == test_labels))


def clustered_data(rng, n, num_classes, dim, noise, centres=None):
  if centres is None:
    centres = rng.normal(size=(num_classes, dim))
  labels = rng.integers(0, num_classes, size=n)
  return (centres[labels] + noise * rng.normal(size=(n, dim))).astype(np.float32), labels


@pytest.mark.parametrize("k,temperature", [(1, 0.1), (7, 0.1), (20, 0.5), (200, 0.07)])
def test_matches_numpy_reference(k, temperature):
  rng = np.random.default_rng(k)
  centres = rng.normal(size=(5, 16))
  train_x, train_y = clustered_data(rng, 300, 5, 16, noise=1.5, centres=centres)
  test_x, test_y = clustered_data(rng, 300, 5, 16, noise=1.5, centres=centres)
  expected = numpy_knn_accuracy(train_x, train_y, test_x, test_y, num_classes=5, k=min(k, 300),
                                temperature=temperature)
  got = knn.knn_accuracy(train_x, train_y, test_x, test_y, num_classes=5, k=k,
                         temperature=temperature, chunk_size=64)
  assert got == pytest.approx(expected, abs=1 / 300 + 1e-9)
  assert 0.2 < expected < 1.0  # the case is neither trivial nor hopeless


def test_chunk_size_and_masks_do_not_change_the_result():
  rng = np.random.default_rng(1)
  train_x, train_y = clustered_data(rng, 200, 4, 8, noise=1.0)
  test_x, test_y = train_x[::3] + 0.5, train_y[::3]
  reference = knn.knn_accuracy(train_x, train_y, test_x, test_y, num_classes=4, k=10)
  for chunk_size in (1, 7, 1000):
    assert knn.knn_accuracy(train_x, train_y, test_x, test_y, num_classes=4, k=10,
                            chunk_size=chunk_size) == reference
  # Padding rows (garbage features, mask False) on both sides are ignored.
  pad = lambda x, value: np.concatenate([x, np.full((5,) + x.shape[1:], value, x.dtype)])
  padded = knn.knn_accuracy(pad(train_x, 100.0), pad(train_y, 0), pad(test_x, -100.0),
                            pad(test_y, 3), num_classes=4, k=10,
                            train_mask=np.arange(205) < 200,
                            test_mask=np.arange(len(test_y) + 5) < len(test_y))
  assert padded == reference


def test_separable_clusters_are_classified_perfectly():
  rng = np.random.default_rng(2)
  train_x, train_y = clustered_data(rng, 100, 3, 32, noise=0.01)
  assert knn.knn_accuracy(train_x, train_y, train_x, train_y, num_classes=3, k=5) == 1.0


@pytest.mark.parametrize("kwargs,message", [
    (dict(k=0), "k must be"),
    (dict(temperature=0.0), "temperature"),
    (dict(num_classes=2), r"labels must lie in \[0, 2\)"),
])
def test_bad_arguments_raise(kwargs, message):
  rng = np.random.default_rng(3)
  x, y = clustered_data(rng, 20, 3, 4, noise=0.1)
  arguments = dict(num_classes=3, k=5, temperature=0.1) | kwargs
  with pytest.raises(ValueError, match=message):
    knn.knn_accuracy(x, y, x, y, **arguments)


def test_feature_width_mismatch_raises():
  with pytest.raises(ValueError, match="same d"):
    knn.knn_accuracy(np.ones((4, 3)), np.zeros(4), np.ones((4, 2)), np.zeros(4), num_classes=1)
