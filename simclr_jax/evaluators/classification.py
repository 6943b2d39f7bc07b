"""Classification metrics of a classifier on the eval split, and the pictures of its predictions.

`ClassificationEvaluator` wraps a job's `outputs_of(state) -> {'outputs': logits, 'labels',
'images'}` (a fine-tuned network's logits, or a linear head on frozen features): it reports
top-1, top-5 and mean per-class accuracy and keeps the last outputs, from which the job draws
predictions.png (the first eval images with predicted vs true labels) and confusion_matrix.png.
"""
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from simclr_jax.evaluators import Evaluator
from simclr_jax.visualize import predictions as prediction_plots

PREDICTIONS_FILE = "predictions.png"
CONFUSION_MATRIX_FILE = "confusion_matrix.png"
# Images shown in the prediction grid (the first ones of the eval split, in order).
GRID_IMAGES = 32


def classification_results(logits: np.ndarray, labels: np.ndarray,
                           num_classes: int) -> dict[str, float]:
  """top1, top5 and mean per-class accuracy (the mean over classes present in `labels`)."""
  logits, labels = np.asarray(logits, np.float32), np.asarray(labels)
  predictions = logits.argmax(axis=1)
  top5 = np.argsort(-logits, axis=1, kind="stable")[:, :min(5, num_classes)]
  correct = predictions == labels
  present = np.unique(labels)
  return {
      "top1": float(correct.mean()),
      "top5": float(np.any(top5 == labels[:, None], axis=1).mean()),
      "mean_per_class_accuracy": float(np.mean([correct[labels == c].mean() for c in present])),
      "num_eval_examples": int(len(labels)),
  }


class ClassificationEvaluator(Evaluator):
  """`test_top1` every `every_steps`; `last_outputs` and `last_results` after each run."""

  def __init__(self, outputs_of: Callable[[Any], Mapping[str, np.ndarray]], *, every_steps: int,
               num_classes: int):
    self.every_steps = every_steps
    self._outputs_of = outputs_of
    self._num_classes = num_classes
    self.last_outputs: Mapping[str, np.ndarray] | None = None
    self.last_results: dict[str, float] = {}

  def run(self, state: Any) -> dict[str, float]:
    self.last_outputs = self._outputs_of(state)
    self.last_results = classification_results(self.last_outputs["outputs"],
                                               self.last_outputs["labels"], self._num_classes)
    return {"test_top1": self.last_results["top1"]}


def write_pictures(workdir: str, outputs: Mapping[str, np.ndarray], class_names: Sequence[str],
                   title: str) -> None:
  """predictions.png (the kept eval images) and confusion_matrix.png (all eval images)."""
  if jax.process_index() > 0:
    return
  logits, labels, images = outputs["outputs"], outputs["labels"], outputs["images"]
  shown = logits[:len(images)].astype(np.float64)
  probabilities = np.exp(shown - shown.max(axis=1, keepdims=True))
  probabilities /= probabilities.sum(axis=1, keepdims=True)
  prediction_plots.plot_prediction_grid(
      images, labels[:len(images)], shown.argmax(axis=1), class_names,
      os.path.join(workdir, PREDICTIONS_FILE), confidences=probabilities.max(axis=1), title=title)
  prediction_plots.plot_confusion_matrix(labels, logits.argmax(axis=1), class_names,
                                         os.path.join(workdir, CONFUSION_MATRIX_FILE), title=title)
