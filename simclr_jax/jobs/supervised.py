"""What the two jobs that train with labels share: the classifier, checks, and their outputs.

The outputs of a linear probe or fine-tune in its workdir: results.json (flat: numbers plus
'mode', 'dataset', a few descriptive strings), metrics.jsonl + TensorBoard events,
predictions.png, confusion_matrix.png, and export/ — the encoder plus its trained linear head
`supervised_head`, an encoder export that `simclr_jax.tools.predict`, a later probe or the
safetensors export can read.
"""
import dataclasses
import functools
import os
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np

from simclr_jax import config_checks
from simclr_jax import export
from simclr_jax import features
from simclr_jax import input_pipeline
from simclr_jax import models
from simclr_jax import native
from simclr_jax import sharding
from simclr_jax import workdir_files
from simclr_jax.evaluators import classification


def validate_config(config: ml_collections.ConfigDict, *, mode: str, num_devices: int) -> None:
  """The fields every supervised job has (a probe without SGD skips `check_training`)."""
  config_checks.check_mode(config, mode)
  config_checks.check_model_and_compute(config)
  config_checks.check_batch(config, num_devices)
  config_checks.require(config.eval_every_steps >= 0,
                        f"eval_every_steps={config.eval_every_steps} must be >= 0 (0 = only at "
                        "the end)")
  models.check_projection_layer(models.ModelConfig.from_mapping(config.model),
                                config.projection_layer)
  config_checks.check_evals(config)


@dataclasses.dataclass(frozen=True)
class Start:
  """What a supervised job knows before it builds anything."""
  workdir: str                            # absolute
  mesh: jax.sharding.Mesh
  info: input_pipeline.DatasetInfo
  split_sizes: dict[str, int]             # train and eval split spec -> examples
  finished: dict[str, Any] | None         # the results of this same run, if it finished


def start(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh | None, *,
          validate: Callable[..., None]) -> Start:
  """The opening of every supervised job: the mesh (default: every device along 'data'), the
  config validated, the dataset and its splits checked, a finished run found."""
  workdir = os.path.abspath(workdir)
  mesh = mesh if mesh is not None else sharding.create_mesh()
  validate(config, num_devices=mesh.devices.size)
  info = config_checks.dataset_info(config)
  return Start(workdir=workdir, mesh=mesh, info=info, split_sizes=split_sizes(config, mesh),
               finished=workdir_files.finished_results(workdir, config))


def split_sizes(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> dict[str, int]:
  """{split spec: size} of the train and eval splits; reads no data, fails early on a bad
  dataset or split spec (the input pipeline names the available ones)."""
  with config_checks.user_input():
    return {split: input_pipeline.create_eval_iterator(
        config.dataset, data_dir=config.data_dir or None, split=split,
        global_batch_size=config.global_batch_size, image_size=config.image_size,
        mesh=mesh).num_examples for split in (config.train_split, config.eval_split)}


def create_classifier(config: ml_collections.ConfigDict, num_classes: int, *,
                      axis_name: str | None, platform: str | None = None) -> models.Classifier:
  """The classifier of `config`, its backends resolved for `platform` (default: this run's)."""
  return models.Classifier(
      models.ModelConfig.from_mapping(config.model), num_classes=num_classes,
      projection_layer=config.projection_layer, axis_name=axis_name,
      dtype=models.COMPUTE_DTYPES[config.dtype],
      conv_backend=native.resolve_backend("conv_backend", config.conv_backend, platform),
      norm_backend=native.resolve_backend("norm_backend", config.norm_backend, platform))


def eval_batches(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """split -> the eval iterator of `split` (centre crop, in order, padded)."""
  return lambda split: input_pipeline.create_eval_iterator(
      config.dataset, data_dir=config.data_dir or None, split=split,
      global_batch_size=config.global_batch_size, image_size=config.image_size, mesh=mesh)


def assert_unchanged(before: Mapping[str, Any], after: Mapping[str, Any], what: str) -> None:
  """Raises RuntimeError naming the first array of `after` that differs from `before`."""
  after = sharding.to_host(after)
  if jax.tree.structure(before) != jax.tree.structure(after):
    raise RuntimeError(f"{what} changed structure: {jax.tree.structure(before)} became "
                       f"{jax.tree.structure(after)}")
  flat_before = dict(jax.tree_util.tree_leaves_with_path(before))
  for path, value in jax.tree_util.tree_leaves_with_path(after):
    if not np.array_equal(np.asarray(flat_before[path]), np.asarray(value)):
      raise RuntimeError(f"{what} changed at {jax.tree_util.keystr(path)}: the encoder was "
                         "meant to be frozen (a bug in the evaluation step)")


def finish(workdir: str, config: ml_collections.ConfigDict, *,
           info: input_pipeline.DatasetInfo, test: Mapping[str, np.ndarray], title: str,
           model_config: Mapping[str, Any], params: Mapping[str, Any],
           batch_stats: Mapping[str, Any], source: str, num_devices: int,
           report: Mapping[str, Any]) -> dict[str, Any]:
  """The end of a supervised job: the results of `test` ({'outputs': logits, 'labels',
  'images'}), its pictures and the classifier export (the encoder export format, so a later
  probe can start from it). results.json is the caller's to write, last."""
  results = {"mode": config.mode, "dataset": config.dataset,
             "representation": models.representation_name(config.projection_layer),
             "num_devices": int(num_devices),
             **classification.classification_results(test["outputs"], test["labels"],
                                                      info.num_classes),
             **report}
  classification.write_pictures(workdir, test, info.class_names, title)
  export.replace_export(
      os.path.join(workdir, workdir_files.EXPORT_DIR), model_config=dict(model_config),
      params=params, batch_stats=batch_stats,
      metadata={"dataset": config.dataset, "image_size": config.image_size,
                "num_classes": info.num_classes, "class_names": list(info.class_names),
                "projection_layer": config.projection_layer, "source": source,
                "init_from": config.init_from})
  return results


def representations(classifier: models.Classifier, variables: Mapping[str, Any],
                    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                    batch_norm: str = "running_average") -> features.SplitFeatures:
  """The frozen representation of every split, extracted once, with batch norm in `batch_norm`
  mode (`features.BATCH_NORM_MODES`; the variables are never updated)."""
  return features.SplitFeatures(
      features.representation_function(
          functools.partial(classifier.apply, method=models.Classifier.represent), batch_norm,
          mesh),
      variables_of=lambda state: variables, make_batches=eval_batches(config, mesh),
      description=models.representation_name(config.projection_layer), frozen=True)
