"""The representation evaluators of a job's `config.evals`, by block name.

A block's `batch_norm` (one of `features.BATCH_NORM_MODES`; 'running_average' where the block has
no such field) chooses the features it is scored on; evaluators asking for the same mode share
one `features.SplitFeatures`, so a split is extracted once per mode and state.
"""
from typing import Any, Callable, Mapping

from simclr_jax import features
from simclr_jax.evaluators import RepresentationEvaluator
from simclr_jax.evaluators import knn
from simclr_jax.evaluators import linear
from simclr_jax.evaluators import mlp

REPRESENTATION_EVALUATORS: dict[str, type[RepresentationEvaluator]] = {
    "knn": knn.KnnEvaluator, "linear": linear.LinearEvaluator, "mlp": mlp.MLPProbeEvaluator}


def create_representation_evaluators(
    evals: Mapping[str, Mapping[str, Any]],
    representations: Callable[[str], features.SplitFeatures], *, train_split: str,
    eval_split: str, num_classes: int, seed: int) -> list[RepresentationEvaluator]:
  """The enabled blocks of `evals`; `representations(batch_norm_mode)` makes the features of a
  mode (called once per mode in use)."""
  shared: dict[str, features.SplitFeatures] = {}
  evaluators = []
  for name, block in evals.items():
    if not block["enabled"]:
      continue
    mode = block.get("batch_norm", "running_average")
    if mode not in shared:
      shared[mode] = representations(mode)
    evaluators.append(REPRESENTATION_EVALUATORS[name](
        block, shared[mode], train_split=train_split, eval_split=eval_split,
        num_classes=num_classes, seed=seed))
  return evaluators
