"""Evaluators: plug-ins that score a training state, in big_vision's manner.

Each is built from a block of `config.evals` (e.g. `config.evals.knn`) and answers
`run(state) -> {metric: value}`; the training loop calls it every `every_steps` steps (0: only at
the end) and at the last step, and a job can call it once on its own (the linear-probe job is the
standalone form of the first three):
- `knn.KnnEvaluator`: weighted k-NN top-1 of the representation (a label-cheap monitor);
- `linear.LinearEvaluator`: the paper's transfer protocol, L-BFGS logistic regression;
- `mlp.MLPProbeEvaluator`: a 3-layer MLP with dropout trained with Adam on raw features taken with
  batch norm in training mode by default (a CIFAR-100 reproduction's probe, for ablations);
- `classification.ClassificationEvaluator`: top-1/top-5/per-class accuracy of a classifier,
  keeping its last outputs for the prediction grid and the confusion matrix.
`from_config.create_representation_evaluators` builds the enabled k-NN, L-BFGS and MLP blocks of
`config.evals`, each on the features of its block's `batch_norm` mode (default: running averages).
"""
import abc
from typing import Any, Mapping


class Evaluator(abc.ABC):
  """Scores a state; `every_steps` says how often the loop asks (0: only at the end), `at_start`
  whether it also scores the initial state of a new run (the random-init baseline)."""
  every_steps: int = 0
  at_start: bool = False

  @abc.abstractmethod
  def run(self, state: Any) -> Mapping[str, float]:
    """Metrics of `state`, the same on every process."""


class RepresentationEvaluator(Evaluator):
  """An evaluator of a representation on a train and an eval split (k-NN, L-BFGS, MLP).

  `config` is its `config.evals` block: every_steps, at_start, train_examples and eval_examples
  (0 = the whole split) and its own fields; `representations` (a `features.SplitFeatures`)
  extracts a split once per state for every evaluator that shares it; `seed` draws whatever
  randomness a fitted probe uses.
  """

  def __init__(self, config: Mapping[str, Any], representations: Any, *, train_split: str,
               eval_split: str, num_classes: int, seed: int = 0):
    self.every_steps = config["every_steps"]
    self.at_start = config["at_start"]
    self._config = config
    self._representations = representations
    self._splits = (train_split, eval_split)
    self._num_classes = num_classes
    self._seed = seed

  def _train_and_eval(self, state: Any) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """The representations (and labels) of the train and eval examples this evaluator uses."""
    return tuple(self._representations(state, split, max_examples=self._config[limit])
                 for split, limit in zip(self._splits, ("train_examples", "eval_examples")))
