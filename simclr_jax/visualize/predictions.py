"""Pictures of a classifier's test predictions: an image grid and a confusion matrix (PNG).

The grid shows each image with its predicted and true class names, green when right and red when
wrong, as in the study that classified tf_flowers / imagenette / cifar100 images with a SimCLR
encoder. The confusion matrix is row-normalised (each true class sums to 1), so classes of
different sizes compare.
"""
import math
import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

CORRECT_COLOR = "#1a9e2f"
WRONG_COLOR = "#d62020"
# Beyond this many classes the matrix has no tick labels / no numbers in the cells (unreadable).
MAX_LABELLED_CLASSES = 40
MAX_ANNOTATED_CLASSES = 12
MAX_NAME_CHARS = 18  # longer class names (ImageNet's) are shortened with an ellipsis in the grid


def _class_name(class_names: Sequence[str], label: int) -> str:
  name = class_names[label] if 0 <= label < len(class_names) else str(label)
  return name if len(name) <= MAX_NAME_CHARS else name[:MAX_NAME_CHARS - 1] + "\u2026"


def _as_display_image(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image
  return np.clip(image.astype(np.float32), 0.0, 1.0)


def plot_prediction_grid(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                         class_names: Sequence[str], path: str, *,
                         confidences: np.ndarray | None = None, columns: int = 8,
                         title: str | None = None) -> str:
  """Writes a grid of `images` [N, H, W, 3] titled 'predicted / true' to `path`; returns `path`."""
  images, labels, predictions = np.asarray(images), np.asarray(labels), np.asarray(predictions)
  if images.ndim != 4 or len(images) == 0:
    raise ValueError(f"images must be a non-empty [N, H, W, C] batch, got shape {images.shape}")
  if labels.shape != (len(images),) or predictions.shape != (len(images),):
    raise ValueError(f"labels and predictions must be [{len(images)}], got {labels.shape} and "
                     f"{predictions.shape}")
  columns = max(1, min(columns, len(images)))
  rows = math.ceil(len(images) / columns)
  figure, axes = plt.subplots(rows, columns, figsize=(1.9 * columns, 2.2 * rows + 0.4),
                              squeeze=False)
  for index, axis in enumerate(axes.flat):
    axis.axis("off")
    if index >= len(images):
      continue
    axis.imshow(_as_display_image(images[index]), interpolation="nearest")
    correct = predictions[index] == labels[index]
    predicted = _class_name(class_names, int(predictions[index]))
    if confidences is not None:
      predicted += f" ({100 * float(confidences[index]):.0f}%)"
    axis.set_title(f"pred: {predicted}\ntrue: {_class_name(class_names, int(labels[index]))}",
                   fontsize=7.5, color=CORRECT_COLOR if correct else WRONG_COLOR)
  accuracy = float(np.mean(predictions == labels))
  header = f"{title}  " if title else ""
  figure.suptitle(f"{header}{int(np.sum(predictions == labels))}/{len(images)} correct "
                  f"({100 * accuracy:.0f}%): green right, red wrong", fontsize=10)
  figure.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  figure.savefig(path, dpi=110)
  plt.close(figure)
  return path


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """Counts [true class, predicted class]."""
  matrix = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(matrix, (np.asarray(labels, np.int64), np.asarray(predictions, np.int64)), 1)
  return matrix


def plot_confusion_matrix(labels: np.ndarray, predictions: np.ndarray,
                          class_names: Sequence[str], path: str, *,
                          title: str | None = None) -> str:
  """Writes the row-normalised confusion matrix of `predictions` vs `labels` to `path`."""
  num_classes = len(class_names)
  counts = confusion_matrix(labels, predictions, num_classes)
  fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
  size = min(4 + 0.45 * num_classes, 24)
  figure, axis = plt.subplots(figsize=(size + 1.5, size))
  image = axis.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
  figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04, label="fraction of the true class")
  if num_classes <= MAX_LABELLED_CLASSES:
    axis.set_xticks(range(num_classes), class_names, rotation=60, ha="right", fontsize=8)
    axis.set_yticks(range(num_classes), class_names, fontsize=8)
  if num_classes <= MAX_ANNOTATED_CLASSES:
    for true_class in range(num_classes):
      for predicted_class in range(num_classes):
        value = fractions[true_class, predicted_class]
        axis.text(predicted_class, true_class, f"{value:.2f}", ha="center", va="center",
                  fontsize=7, color="white" if value > 0.5 else "black")
  axis.set_xlabel("predicted class")
  axis.set_ylabel("true class")
  accuracy = np.trace(counts) / max(counts.sum(), 1)
  axis.set_title(f"{title + ': ' if title else ''}top-1 {100 * accuracy:.1f}% "
                 f"on {counts.sum()} images")
  figure.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  figure.savefig(path, dpi=110)
  plt.close(figure)
  return path
