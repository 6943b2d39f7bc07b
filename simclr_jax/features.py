"""The one feature extractor: a model function applied to every batch of an eval split.

Used by the evaluators (k-NN, L-BFGS, MLP, classification), the probe and fine-tune jobs and the
prediction tool. Everything runs on any device count: batches are split over the mesh axis
`data`, variables replicated, and results come back to the host unpadded and in order.

An encoder's representation is taken with its batch norm in one of `BATCH_NORM_MODES`:
'running_average' (inference mode, the protocol of the paper) or 'batch_statistics' (training
mode: each extraction batch normalised by its own statistics, as some reproductions did, so an
image's features depend on the batch it is in).
"""
import time
from typing import Any, Callable, Iterable, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from simclr_jax import models
from simclr_jax import sharding

BATCH_NORM_MODES = ("running_average", "batch_statistics")

# Seconds between progress lines of a long extraction.
_PROGRESS_SECONDS = 30.0


def images_to_float(images: jax.Array) -> jax.Array:
  """uint8 pipeline images to the model's float [0, 1]."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def sharded_apply(function: Callable[..., jax.Array], mesh: jax.sharding.Mesh, *,
                  masked: bool = False) -> Callable[..., jax.Array]:
  """jit of `function(variables, float images)` on batch-sharded pipeline images, called as
  (variables, images, mask); a `masked` function also receives the mask (False: padding).

  A plain jit (no shard_map): a reduction over the batch (batch statistics) is over the global
  batch, the partitioner inserting the collectives.
  """
  def apply(variables, images, mask):
    images = images_to_float(images)
    return function(variables, images, mask) if masked else function(variables, images)
  return jax.jit(apply, in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh),
                                      sharding.batch_sharded(mesh)),
                 out_shardings=sharding.batch_sharded(mesh))


def representation_function(apply: Callable[..., Any], batch_norm: str, mesh: jax.sharding.Mesh
                            ) -> Callable[..., jax.Array]:
  """`sharded_apply` of a representation in a `BATCH_NORM_MODES` mode.

  `apply(variables, float images, train=, **kwargs)` is a module's `apply` returning the
  representation. 'batch_statistics' runs it in training mode, the statistics taken over the
  real (unpadded) examples of each whole extraction batch, on any device count; the updated
  running averages are discarded. The module must have no `axis_name`: under jit the batch is
  one global array.
  """
  if batch_norm not in BATCH_NORM_MODES:
    raise ValueError(f"batch_norm={batch_norm!r}; allowed: {', '.join(BATCH_NORM_MODES)}")
  if batch_norm == "running_average":
    return sharded_apply(lambda variables, images: apply(variables, images, train=False), mesh)

  def with_batch_statistics(variables, images, mask):
    with models.statistics_over(mask):
      representation, _ = apply(variables, images, train=True, mutable=["batch_stats"])
    return representation
  return sharded_apply(with_batch_statistics, mesh, masked=True)


def run_over_dataset(function: Callable[..., jax.Array],
                     variables: Mapping[str, Any], batches: Iterable[Mapping[str, Any]], *,
                     keep_images: int = 0, max_examples: int = 0,
                     description: str = "features") -> dict[str, np.ndarray]:
  """Applies `function` (a `sharded_apply`) to the batches of an eval iterator; unpadded host
  results in order.

  Returns {'outputs': [N, ...], 'labels': [N]} and, with `keep_images > 0`, the first
  `keep_images` images as 'images' (for prediction grids). `max_examples > 0` stops after the
  batch that reaches that many examples (all processes see the same batches, so they stop
  together). Logs images/s and the ETA every half minute.
  """
  total = getattr(batches, "num_examples", 0)
  total = min(total, max_examples) if max_examples and total else total or max_examples
  outputs, labels, images = [], [], []
  num_images = num_examples = 0
  start = last_report = time.monotonic()
  iterator = iter(batches)
  try:
    for batch in iterator:
      result = function(variables, batch["image"], batch["mask"])
      mask = sharding.to_host(batch["mask"]).astype(bool)
      outputs.append(sharding.to_host(result)[mask])
      labels.append(sharding.to_host(batch["label"])[mask])
      if num_images < keep_images:
        kept = sharding.to_host(batch["image"])[mask][:keep_images - num_images]
        images.append(kept)
        num_images += len(kept)
      num_examples += int(mask.sum())
      now = time.monotonic()
      if now - last_report >= _PROGRESS_SECONDS:
        rate = num_examples / (now - start)
        eta = f", ETA {(total - num_examples) / rate:.0f} s" if total else ""
        logging.info("%s: %d%s images, %.0f images/s%s", description, num_examples,
                     f" of {total}" if total else "", rate, eta)
        last_report = now
      if max_examples and num_examples >= max_examples:
        break
  finally:
    if hasattr(iterator, "close"):
      iterator.close()  # stops a prefetch thread when the pass ends early
  if not outputs:
    raise ValueError("the eval iterator yielded no batches (an empty split?)")
  result = {"outputs": np.concatenate(outputs), "labels": np.concatenate(labels).astype(np.int32)}
  if max_examples:
    result = {name: value[:max_examples] for name, value in result.items()}
  if keep_images:
    result["images"] = np.concatenate(images)
  return result


class SplitFeatures:
  """The outputs of one model function on dataset splits, computed once per state.

  Evaluators that run on the same state (k-NN and the L-BFGS probe, say) share one instance, so
  a split is extracted once per evaluation round. `variables_of(state)` picks what `function`
  applies; `make_batches(split)` opens an eval iterator. States are told apart by their step,
  unless `frozen` (a probe's encoder): then a split is extracted once for the whole run.
  """

  def __init__(self, function: Callable[[Mapping[str, Any], jax.Array], jax.Array], *,
               variables_of: Callable[[Any], Mapping[str, Any]],
               make_batches: Callable[[str], Iterable[Mapping[str, Any]]], description: str,
               frozen: bool = False):
    self._function = function
    self._variables_of = variables_of
    self._make_batches = make_batches
    self._description = description
    self._frozen = frozen
    self._step = None
    self._cache: dict[tuple[str, int, int], dict[str, np.ndarray]] = {}

  def __call__(self, state: Any, split: str, *, max_examples: int = 0,
               keep_images: int = 0) -> dict[str, np.ndarray]:
    step = 0 if self._frozen else int(sharding.to_host(state.step))
    if step != self._step:
      self._step, self._cache = step, {}
    key = (split, max_examples, keep_images)
    if key not in self._cache:
      self._cache[key] = run_over_dataset(
          self._function, self._variables_of(state), self._make_batches(split),
          keep_images=keep_images, max_examples=max_examples,
          description=f"{self._description} of {split}")
    return self._cache[key]
