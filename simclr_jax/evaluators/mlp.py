"""A small MLP with dropout trained on frozen features: the probe of a CIFAR-100 reproduction.

That report (6.9% top-1 for SimCLR on CIFAR-100) evaluated its encoder with a 3-layer MLP with
dropout, trained with Adam on raw (unstandardised) features taken with batch norm in training
mode; this evaluator offers that protocol, so an ablation can switch its choices on one at a time
(the features' batch-norm mode is the block's `batch_norm`, see `features.BATCH_NORM_MODES`).
Not the paper's protocol (a linear classifier: `linear.LinearEvaluator`).
"""
import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from simclr_jax.evaluators import RepresentationEvaluator


class MLP(nn.Module):
  """Dense-ReLU-Dropout per hidden size, then Dense to the classes (logits)."""
  hidden_sizes: Sequence[int]
  num_classes: int
  dropout_rate: float

  @nn.compact
  def __call__(self, x, *, train: bool):
    for size in self.hidden_sizes:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(nn.Dense(size)(x)))
    return nn.Dense(self.num_classes)(x)


def _train_step(mlp: MLP, optimizer: optax.GradientTransformation):
  """jit: (params, opt_state, features, labels, dropout key) -> (params, opt_state, loss)."""
  def loss_fn(params, features, labels, key):
    logits = mlp.apply({"params": params}, features, train=True, rngs={"dropout": key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def step(params, opt_state, features, labels, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, features, labels, key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def fit_mlp_probe(features: np.ndarray, labels: np.ndarray, *, num_classes: int,
                  hidden_sizes: Sequence[int] = (512, 256), dropout_rate: float = 0.5,
                  learning_rate: float = 1e-3, epochs: int = 20, batch_size: int = 256,
                  seed: int = 0) -> tuple[MLP, Mapping[str, Any], float]:
  """(the MLP, its trained params, the mean train loss of the last epoch); Adam on shuffled
  minibatches, deterministic given `seed`.

  Each epoch is a fresh permutation cut into `batch_size` batches (every batch the same shape,
  one compiled step); its remainder is left out, a different one each epoch.
  """
  features = np.asarray(features, np.float32)
  labels = np.asarray(labels, np.int32)
  if features.ndim != 2 or labels.shape != features.shape[:1] or len(labels) == 0:
    raise ValueError(f"features must be [n, d] and labels [n] with n > 0, got {features.shape} "
                     f"and {labels.shape}")
  mlp = MLP(tuple(hidden_sizes), num_classes, dropout_rate)
  init_key, dropout_key = jax.random.split(jax.random.key(seed))
  params = mlp.init(init_key, jnp.zeros((1, features.shape[1])), train=False)["params"]
  optimizer = optax.adam(learning_rate)
  opt_state = optimizer.init(params)
  step = _train_step(mlp, optimizer)
  batch_size = min(batch_size, len(features))
  order_rng = np.random.default_rng(seed)
  num_steps = 0
  for _ in range(epochs):
    order = order_rng.permutation(len(features))
    losses = []
    for start in range(0, len(order) - batch_size + 1, batch_size):
      batch = order[start:start + batch_size]
      params, opt_state, loss = step(params, opt_state, features[batch], labels[batch],
                                     jax.random.fold_in(dropout_key, num_steps))
      losses.append(loss)
      num_steps += 1
  return mlp, params, float(np.mean(jax.device_get(losses)))


@functools.partial(jax.jit, static_argnums=0)
def _predict(mlp: MLP, params: Mapping[str, Any], features: jax.Array) -> jax.Array:
  return jnp.argmax(mlp.apply({"params": params}, features, train=False), axis=1)


def predict(mlp: MLP, params: Mapping[str, Any], features: np.ndarray) -> np.ndarray:
  """Class predictions [n] with dropout off."""
  return np.asarray(_predict(mlp, params, np.asarray(features, np.float32)))


class MLPProbeEvaluator(RepresentationEvaluator):
  """Top-1 on the eval split of an MLP probe trained on the train split's features
  (`config.evals.mlp`: hidden_sizes, dropout_rate, learning_rate, epochs, batch_size and
  batch_norm beside the common fields), trained from `seed`."""

  def run(self, state: Any) -> dict[str, float]:
    config = self._config
    train, test = self._train_and_eval(state)
    mlp, params, train_loss = fit_mlp_probe(
        train["outputs"], train["labels"], num_classes=self._num_classes,
        hidden_sizes=config["hidden_sizes"], dropout_rate=config["dropout_rate"],
        learning_rate=config["learning_rate"], epochs=config["epochs"],
        batch_size=config["batch_size"], seed=self._seed)
    top1 = float(np.mean(predict(mlp, params, test["outputs"]) == test["labels"]))
    return {"mlp_top1": top1, "mlp_train_loss": train_loss}
