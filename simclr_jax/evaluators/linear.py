"""Multinomial logistic regression on fixed features, fit with L-BFGS: the transfer-probe protocol.

As in the SimCLR paper's transfer experiments (after Kornblith et al. 2019): features are
standardised, an L2-regularised softmax regression is fit with L-BFGS for each strength on a
log-spaced grid, the strength is chosen by accuracy on a held-out part of train, and the chosen
strength is refit on all of train. Pure JAX (`optax.lbfgs` in a `lax.while_loop`), one compiled
solver for every strength; each fit runs until its gradient norm falls below the tolerance.
(Fitting the grid under `vmap` is slower on CPU: every strength then waits for the slowest.)
"""
import dataclasses
import functools
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from simclr_jax import features
from simclr_jax.evaluators import RepresentationEvaluator

# A feature whose standard deviation is below this is constant (e.g. a dead ReLU channel): it is
# centred but not scaled, so it stays 0 instead of becoming noise / 0.
_MIN_STD = 1e-6


@dataclasses.dataclass(frozen=True)
class Standardizer:
  mean: np.ndarray
  std: np.ndarray

  @classmethod
  def fit(cls, features: np.ndarray) -> "Standardizer":
    std = features.std(axis=0)
    return cls(mean=features.mean(axis=0), std=np.where(std < _MIN_STD, 1.0, std))

  def __call__(self, features: np.ndarray) -> np.ndarray:
    return ((features - self.mean) / self.std).astype(np.float32)


def _objective(weights, features, one_hot_labels, l2):
  """Mean softmax cross-entropy + l2/2 * |kernel|^2 (the bias is not regularised)."""
  logits = features @ weights["kernel"] + weights["bias"]
  cross_entropy = -jnp.sum(one_hot_labels * jax.nn.log_softmax(logits), axis=1)
  return jnp.mean(cross_entropy) + 0.5 * l2 * jnp.sum(weights["kernel"] ** 2)


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iterations"))
def fit_logistic_regression(features: jax.Array, labels: jax.Array, l2: float, *,
                            num_classes: int, max_iterations: int = 1000,
                            tolerance: float = 1e-5) -> tuple[dict, jax.Array]:
  """(weights {'kernel' [D, C], 'bias' [C]} minimising the objective, L-BFGS iterations used)."""
  one_hot_labels = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  objective = functools.partial(_objective, features=features, one_hot_labels=one_hot_labels,
                                l2=l2)
  value_and_grad = optax.value_and_grad_from_state(objective)
  solver = optax.lbfgs()

  def step(carry):
    weights, state = carry
    value, grad = value_and_grad(weights, state=state)
    updates, state = solver.update(grad, state, weights, value=value, grad=grad,
                                   value_fn=objective)
    return optax.apply_updates(weights, updates), state

  def not_converged(carry):
    _, state = carry
    iteration = optax.tree.get(state, "count")
    grad_norm = optax.tree.norm(optax.tree.get(state, "grad"))
    return (iteration == 0) | ((iteration < max_iterations) & (grad_norm >= tolerance))

  weights = {"kernel": jnp.zeros((features.shape[1], num_classes), jnp.float32),
             "bias": jnp.zeros((num_classes,), jnp.float32)}
  weights, state = jax.lax.while_loop(not_converged, step, (weights, solver.init(weights)))
  return weights, optax.tree.get(state, "count")


def accuracy(weights: dict, features: np.ndarray, labels: np.ndarray) -> float:
  logits = features @ np.asarray(weights["kernel"]) + np.asarray(weights["bias"])
  return float(np.mean(np.argmax(logits, axis=1) == labels))


@dataclasses.dataclass(frozen=True)
class TransferProbe:
  """The refit classifier on raw (unstandardised) features: logits = features @ kernel + bias."""
  kernel: np.ndarray
  bias: np.ndarray
  l2: float
  validation_accuracy: float
  validation_accuracies: np.ndarray  # one per grid strength
  l2_grid: np.ndarray
  iterations: int  # L-BFGS iterations of the final refit

  def logits(self, features: np.ndarray) -> np.ndarray:
    return features.astype(np.float32) @ self.kernel + self.bias


def fit_transfer_probe(features: np.ndarray, labels: np.ndarray, *, num_classes: int,
                       l2_grid: np.ndarray, validation_fraction: float, seed: int,
                       max_iterations: int = 1000, tolerance: float = 1e-5) -> TransferProbe:
  """Chooses the L2 strength on a held-out `validation_fraction` of train, then refits on all.

  The held-out part is a seeded random subset, so the choice is deterministic. The standardisation
  is folded into the returned kernel and bias.
  """
  features = np.asarray(features, np.float32)
  labels = np.asarray(labels, np.int32)
  l2_grid = np.asarray(l2_grid, np.float32)
  if not 0.0 < validation_fraction < 1.0:
    raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}")
  if l2_grid.ndim != 1 or len(l2_grid) == 0 or np.any(l2_grid < 0):
    raise ValueError(f"l2_grid must be a non-empty vector of strengths >= 0, got {l2_grid!r}")
  num_validation = int(round(validation_fraction * len(features)))
  if num_validation < 1 or num_validation >= len(features):
    raise ValueError(f"validation_fraction={validation_fraction} of {len(features)} train "
                     "examples leaves no validation or no fitting examples")
  order = np.random.default_rng(seed).permutation(len(features))
  validation, fitting = order[:num_validation], order[num_validation:]
  standardize = Standardizer.fit(features[fitting])
  fit = functools.partial(fit_logistic_regression, num_classes=num_classes,
                          max_iterations=max_iterations, tolerance=tolerance)
  fitting_features = jnp.asarray(standardize(features[fitting]))
  fitting_labels = jnp.asarray(labels[fitting])
  validation_features = standardize(features[validation])
  validation_accuracies = []
  for i, strength in enumerate(l2_grid):
    validation_accuracies.append(accuracy(fit(fitting_features, fitting_labels, strength)[0],
                                          validation_features, labels[validation]))
    logging.info("L-BFGS strength %d of %d: l2=%.3g, held-out top-1 %.4f (best so far %.4f)",
                 i + 1, len(l2_grid), strength, validation_accuracies[-1],
                 max(validation_accuracies))
  validation_accuracies = np.array(validation_accuracies)
  # Among equally accurate strengths, the strongest regularisation.
  best = max(range(len(l2_grid)), key=lambda i: (validation_accuracies[i], l2_grid[i]))

  standardize = Standardizer.fit(features)
  weights, iterations = fit(standardize(features), labels, l2_grid[best])
  kernel = np.asarray(weights["kernel"]) / standardize.std[:, None]
  bias = np.asarray(weights["bias"]) - standardize.mean @ kernel
  return TransferProbe(kernel=kernel.astype(np.float32), bias=bias.astype(np.float32),
                       l2=float(l2_grid[best]),
                       validation_accuracy=float(validation_accuracies[best]),
                       validation_accuracies=validation_accuracies, l2_grid=l2_grid,
                       iterations=int(iterations))


class LinearEvaluator(RepresentationEvaluator):
  """The transfer protocol on a representation: top-1 on the eval split of an L-BFGS probe fit on
  train features; the fitted probe stays in `last_probe` (a probe job exports it).

  `config` is a `config.evals.linear` / `config.lbfgs` block: every_steps, train_examples and
  eval_examples (0 = the whole split), validation_fraction, l2_min, l2_max, l2_num,
  max_iterations, tolerance.
  """

  def __init__(self, config: Mapping[str, Any], representations: features.SplitFeatures, *,
               train_split: str, eval_split: str, num_classes: int, seed: int):
    super().__init__(config, representations, train_split=train_split, eval_split=eval_split,
                     num_classes=num_classes, seed=seed)
    self.last_probe: TransferProbe | None = None

  def run(self, state: Any) -> dict[str, float]:
    config = self._config
    train, test = self._train_and_eval(state)
    probe = fit_transfer_probe(
        train["outputs"], train["labels"], num_classes=self._num_classes,
        l2_grid=np.geomspace(config["l2_min"], config["l2_max"], config["l2_num"]),
        validation_fraction=config["validation_fraction"], seed=self._seed,
        max_iterations=config["max_iterations"], tolerance=config["tolerance"])
    logging.info("L-BFGS probe: l2=%g chosen (held-out top-1 %.4f), refit in %d iterations",
                 probe.l2, probe.validation_accuracy, probe.iterations)
    self.last_probe = probe
    predictions = probe.logits(test["outputs"]).argmax(axis=1)
    return {"linear_top1": float(np.mean(predictions == test["labels"])),
            "linear_l2": probe.l2, "linear_validation_top1": probe.validation_accuracy}
