"""What the linear probe and fine-tuning share: config checks, metrics, pictures, outputs.

Outputs of an evaluation run in its workdir: results.json (flat: numbers plus 'mode', 'dataset',
a few descriptive strings and, for runs that train, `stopped_early_by_time_budget`),
metrics.jsonl + TensorBoard events (the trainer's writers), predictions.png,
confusion_matrix.png, and export/ — the encoder plus its trained linear head `supervised_head`,
an encoder export that `simclr_jax.tools.predict`, a later probe or the safetensors export can
read.
"""
import json
import os
import shutil
from typing import Any, Mapping

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from simclr_jax import augment
from simclr_jax import export
from simclr_jax import features
from simclr_jax import input_pipeline
from simclr_jax import knn
from simclr_jax import models
from simclr_jax import optim
from simclr_jax import sharding
from simclr_jax import train
from simclr_jax.visualize import predictions as prediction_plots

PREDICTIONS_FILE = "predictions.png"
CONFUSION_MATRIX_FILE = "confusion_matrix.png"
# Images shown in the prediction grid (the first ones of the eval split, in order).
GRID_IMAGES = 32


def require(condition: bool, message: str) -> None:
  if not condition:
    raise ValueError(f"invalid config: {message}")


def split_size(config: ml_collections.ConfigDict, split: str, mesh: jax.sharding.Mesh) -> int:
  """Examples in `split` (a TFDS split spec such as 'train' or 'train[:80%]'); reads no data.

  The input pipeline validates the spec and names the available splits when it is wrong.
  """
  return input_pipeline.create_eval_iterator(
      config.dataset, data_dir=train.data_dir(config), split=split,
      global_batch_size=config.global_batch_size, image_size=config.image_size,
      mesh=mesh).num_examples


def dataset_info(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                 ) -> tuple[input_pipeline.DatasetInfo, dict[str, int]]:
  """(info, {split spec: size}) for the train and eval splits; fails early on a bad dataset.

  A dataset without class labels is refused by the input pipeline with an error naming its
  features.
  """
  info = input_pipeline.get_dataset_info(config.dataset, data_dir=train.data_dir(config))
  sizes = {split: split_size(config, split, mesh)
           for split in (config.train_split, config.eval_split)}
  return info, sizes


def finished_results(workdir: str, config: ml_collections.ConfigDict) -> dict | None:
  """The results of a finished run of this same config in `workdir`, or None.

  A workdir that finished a different config is an error, so a rerun never returns stale numbers.
  A run its time budget stopped is unfinished (None): rerunning continues it from its checkpoint,
  with any budget, as long as the checkpoint's run record (seed, data, init_from) agrees.
  """
  results_path = os.path.join(workdir, train.RESULTS_FILE)
  config_path = os.path.join(workdir, train.CONFIG_FILE)
  if not (os.path.exists(results_path) and os.path.exists(config_path)):
    return None
  with open(results_path) as f:
    results = json.load(f)
  if results.get("stopped_early_by_time_budget"):
    logging.info("%s holds a %s run its time budget stopped at step %s: continuing it", workdir,
                 config.mode, results.get("step"))
    return None
  with open(config_path) as f:
    finished_config = f.read()
  if finished_config != config.to_json_best_effort(indent=2, sort_keys=True):
    raise ValueError(f"{workdir} holds a finished {config.mode} run of another config (see its "
                     f"{train.CONFIG_FILE}); use a new --workdir")
  logging.info("%s already holds this finished %s run; returning its results", workdir,
               config.mode)
  return results


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, train.CONFIG_FILE), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def validate_common(config: ml_collections.ConfigDict, *, mode: str, num_devices: int) -> None:
  require(config.mode == mode, f"mode={config.mode!r}, but this runs {mode!r}")
  require(config.dtype in train.COMPUTE_DTYPES,
          f"dtype={config.dtype!r}; allowed: {', '.join(train.COMPUTE_DTYPES)}")
  models.resolve_conv_backend(config.conv_backend)
  models.resolve_norm_backend(config.norm_backend)
  augment.resolve_backend(config.augment_backend)
  require(config.image_size > 0, f"image_size={config.image_size} must be positive")
  require(config.global_batch_size > 0 and config.global_batch_size % num_devices == 0,
          f"global_batch_size={config.global_batch_size} must be a positive multiple of the "
          f"number of devices ({num_devices})")
  require(config.num_train_steps > 0 or config.num_epochs > 0,
          f"num_epochs={config.num_epochs} or num_train_steps={config.num_train_steps} must be "
          "positive")
  for name in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    require(config[name] >= 1, f"{name}={config[name]} must be >= 1")
  require(config.max_train_minutes >= 0,
          f"max_train_minutes={config.max_train_minutes} must be >= 0 (0 = no budget)")
  require(config.eval_every_steps >= 0,
          f"eval_every_steps={config.eval_every_steps} must be >= 0 (0 = only at the end)")
  require(config.host_crop_views in (0, 1),
          f"host_crop_views={config.host_crop_views}; allowed: 0 (the device crops; fixed-size "
          "images) or 1 (the host crops; needed when image sizes vary, e.g. tf_flowers)")


def validate_training(config: ml_collections.ConfigDict) -> None:
  """The fields of an evaluation that trains with SGD on augmented views."""
  augment.validate(config.augment)
  require(config.optimizer.name in optim.OPTIMIZERS,
          f"optimizer.name={config.optimizer.name!r}; allowed: {', '.join(optim.OPTIMIZERS)}")


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


def write_pictures(workdir: str, *, images: np.ndarray, labels: np.ndarray, logits: np.ndarray,
                   class_names, title: str) -> None:
  """predictions.png (the first eval images) and confusion_matrix.png (all eval images)."""
  if jax.process_index() > 0:
    return
  probabilities = jax.nn.softmax(jnp.asarray(logits[:len(images)], jnp.float32), axis=1)
  prediction_plots.plot_prediction_grid(
      images, labels[:len(images)], logits[:len(images)].argmax(axis=1), class_names,
      os.path.join(workdir, PREDICTIONS_FILE), confidences=np.asarray(probabilities).max(axis=1),
      title=title)
  prediction_plots.plot_confusion_matrix(labels, logits.argmax(axis=1), class_names,
                                         os.path.join(workdir, CONFUSION_MATRIX_FILE), title=title)


def save_classifier_export(workdir: str, *, model_config: Mapping[str, Any],
                           params: Mapping[str, Any], batch_stats: Mapping[str, Any],
                           metadata: Mapping[str, Any]) -> str:
  """workdir/export: encoder (+ projection head) + supervised_head; replaces an older one."""
  directory = os.path.join(workdir, train.EXPORT_DIR)
  if jax.process_index() == 0 and os.path.isdir(directory):
    logging.info("replacing the previous classifier export in %s", directory)
    shutil.rmtree(directory)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("classifier_export_cleared")
  return export.save_encoder(directory, model_config=dict(model_config), params=params,
                             batch_stats=batch_stats, metadata=dict(metadata))


def classifier_metadata(config: ml_collections.ConfigDict, info: input_pipeline.DatasetInfo,
                        source: str) -> dict:
  return {"dataset": config.dataset, "image_size": config.image_size,
          "num_classes": info.num_classes, "class_names": list(info.class_names),
          "projection_layer": config.projection_layer, "source": source,
          "init_from": config.init_from}


def evaluation_results(config: ml_collections.ConfigDict, *, logits: np.ndarray,
                       labels: np.ndarray, num_classes: int, num_devices: int) -> dict[str, Any]:
  """What every evaluation's results.json starts with: what ran, then its test accuracies."""
  results = {"mode": config.mode, "dataset": config.dataset,
             "representation": features.representation_name(config.projection_layer),
             "num_devices": int(num_devices)}
  results.update(classification_results(logits, labels, num_classes))
  return results


def write_final_scalars(writer, step: int, results: Mapping[str, Any]) -> None:
  """The test top-1 curve's last point and final_<name> for every number in `results`."""
  writer.write_scalars(step, {"test_top1": results["top1"], **{
      f"final_{name}": value for name, value in results.items() if isinstance(value, float)}})


def write_outputs(workdir: str, config: ml_collections.ConfigDict, *, results: Mapping[str, Any],
                  info: input_pipeline.DatasetInfo, test: Mapping[str, np.ndarray],
                  logits: np.ndarray, title: str, model_config: Mapping[str, Any],
                  params: Mapping[str, Any], batch_stats: Mapping[str, Any], source: str) -> None:
  """The end of every evaluation: pictures of `test` (images, labels) with `logits`, the
  classifier export (the encoder export format, so a later probe can start from it) and
  results.json last, so that a run with results is a finished run."""
  write_pictures(workdir, images=test["images"], labels=test["labels"], logits=logits,
                 class_names=info.class_names, title=title)
  save_classifier_export(workdir, model_config=model_config, params=params,
                         batch_stats=batch_stats,
                         metadata=classifier_metadata(config, info, source))
  train.write_results(workdir, results)
  logging.info("%s results: %s", config.mode, results)


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


def augment_images(augment_view, images: jax.Array, indices: jax.Array, base_key: jax.Array,
                   step: jax.Array) -> jax.Array:
  """One view per train image, keyed by (step, global index) as in pretraining: device-count free.

  `images` is [B, H, W, 3] (the device crops) or [B, 1, S, S, 3] (the host cropped one view).
  """
  images = images[:, 0] if images.ndim == 5 else images
  keys = train.image_keys(base_key, step, indices)
  return jax.vmap(augment_view)(keys, features.images_to_float(images))


def dtype(config: ml_collections.ConfigDict):
  return train.COMPUTE_DTYPES[config.dtype]


def knn_top1(config: ml_collections.ConfigDict, train_features, train_labels, test_features,
             test_labels, num_classes: int) -> dict[str, float]:
  """{'knn_top1': ...} on the given features, or {} when knn_k is 0."""
  if not config.knn_k:
    return {}
  return {"knn_top1": knn.knn_accuracy(train_features, train_labels, test_features, test_labels,
                                       num_classes=num_classes, k=config.knn_k,
                                       temperature=config.knn_temperature)}

