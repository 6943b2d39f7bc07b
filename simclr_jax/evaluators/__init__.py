"""Evaluators: plug-ins that score a training state, in big_vision's manner.

Each is built from a block of `config.evals` (e.g. `config.evals.knn`) and answers
`run(state) -> {metric: value}`; the training loop calls it every `every_steps` steps (0: only at
the end) and at the last step, and a job can call it once on its own (the linear-probe job is the
standalone form of all three):
- `knn.KnnEvaluator`: weighted k-NN top-1 of the representation (a label-cheap monitor);
- `linear.LinearEvaluator`: the paper's transfer protocol, L-BFGS logistic regression;
- `classification.ClassificationEvaluator`: top-1/top-5/per-class accuracy of a classifier,
  keeping its last outputs for the prediction grid and the confusion matrix.
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
