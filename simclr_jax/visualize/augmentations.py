"""Augmentation previews: each image next to several of its augmented views (PNG grid).

Seeing the views is the quickest check of an augmentation config: crops that are too small, a
colour jitter that is too strong, or a blur that wipes out 32 px images show at a glance.
Views alternate between view index 0 and 1, so per-view probabilities (e.g. blur p=(1.0, 0.1))
show as they act in training.
"""
from typing import Sequence

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from simclr_jax import augment  # noqa: E402

TRAINING_VIEWS = 2  # the view index of column v is v % 2, as in two-view training


def augmented_views(images: np.ndarray, aug_config, *, image_size: int, num_views: int,
                    seed: int = 0) -> np.ndarray:
  """[N, num_views, image_size, image_size, 3] float views of `images` [N, H, W, 3]."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3 or not len(images):
    raise ValueError(f"images must be a non-empty [N, H, W, 3] batch, got shape {images.shape}")
  if num_views < 1:
    raise ValueError(f"num_views={num_views} must be at least 1")
  augment_view = augment.build_augmentation(aug_config, image_size)
  keys = jax.random.split(jax.random.key(seed), (len(images), num_views))
  views = np.empty((len(images), num_views, image_size, image_size, 3), np.float32)
  for view_index in range(min(num_views, TRAINING_VIEWS)):
    columns = np.arange(view_index, num_views, TRAINING_VIEWS)
    per_image = jax.vmap(lambda key, image: augment_view(key, image, view_index),
                         in_axes=(0, None))
    views[:, columns] = np.asarray(jax.jit(jax.vmap(per_image))(keys[:, columns], images))
  return views


def plot_augmentation_grid(originals: np.ndarray, views: np.ndarray, path: str, *,
                           row_labels: Sequence[str] | None = None,
                           title: str | None = None) -> str:
  """Writes a grid to `path`: one row per image, the original first, then its views."""
  originals, views = np.asarray(originals), np.asarray(views)
  if views.ndim != 5 or len(views) != len(originals):
    raise ValueError(f"views must be [N, V, H, W, 3] with N={len(originals)} images, got "
                     f"{views.shape}")
  rows, num_views = views.shape[:2]
  figure, axes = plt.subplots(rows, num_views + 1, figsize=(1.4 * (num_views + 1), 1.4 * rows),
                              squeeze=False)
  for row in range(rows):
    cells = [originals[row]] + list(views[row])
    for column, (axis, image) in enumerate(zip(axes[row], cells)):
      image = image if image.dtype == np.uint8 else np.clip(image, 0.0, 1.0)
      axis.imshow(image, interpolation="nearest")
      axis.set_xticks([])
      axis.set_yticks([])
      if row == 0:
        axis.set_title("original" if column == 0 else f"view {column}", fontsize=9)
      if column == 0:
        for spine in axis.spines.values():
          spine.set_edgecolor("#333333")
          spine.set_linewidth(2)
        if row_labels is not None:
          axis.set_ylabel(str(row_labels[row]), fontsize=8)
  if title:
    figure.suptitle(title, fontsize=10)
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)
  return path
