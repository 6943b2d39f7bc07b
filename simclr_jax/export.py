"""Encoder exports: the hand-off between pretraining and probing, fine-tuning and conversion.

An export is a directory holding `model.json` (the model config that rebuilds the network) and an
Orbax checkpoint `variables/` with `{'params': {...}, 'batch_stats': {...}}` for the encoder and,
where present, the projection head (and a supervised head, for imported checkpoints). It is
device-layout free: it restores on any number of devices. Loading checks the export against the
network a run builds (architecture fields, array shapes) and names any mismatch.
"""
import dataclasses
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
import orbax.checkpoint as ocp

from simclr_jax import errors
from simclr_jax import models

MODEL_CONFIG_FILE = "model.json"
VARIABLES_DIR = "variables"


@dataclasses.dataclass(frozen=True)
class EncoderExport:
  model_config: ml_collections.ConfigDict
  params: Mapping[str, Any]
  batch_stats: Mapping[str, Any]
  metadata: Mapping[str, Any]


def save_encoder(directory: str, *, model_config: Mapping[str, Any], params: Mapping[str, Any],
                 batch_stats: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> str:
  """Writes an export; `params`/`batch_stats` are trees keyed by module ('encoder', ...)."""
  directory = os.path.abspath(directory)
  if os.path.exists(os.path.join(directory, VARIABLES_DIR)):
    raise FileExistsError(f"{directory} already holds an export; choose a new directory")
  os.makedirs(directory, exist_ok=True)
  host = lambda tree: jax.tree.map(lambda x: np.asarray(jax.device_get(x)), dict(tree))
  variables = {"params": host(params), "batch_stats": host(batch_stats)}
  if jax.process_index() == 0:
    with open(os.path.join(directory, MODEL_CONFIG_FILE), "w") as f:
      json.dump({"model": dict(model_config), "metadata": dict(metadata or {})}, f, indent=2,
                sort_keys=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(directory, VARIABLES_DIR), variables)
  return directory


def load_encoder(directory: str) -> EncoderExport:
  """Reads an export as host NumPy arrays, with an error that says what is missing or broken."""
  directory = os.path.abspath(directory)
  config_path = os.path.join(directory, MODEL_CONFIG_FILE)
  variables_path = os.path.join(directory, VARIABLES_DIR)
  if not os.path.isfile(config_path) or not os.path.isdir(variables_path):
    raise errors.MissingInput(
        f"{directory} is not an encoder export: expected {MODEL_CONFIG_FILE} and {VARIABLES_DIR}/ "
        "(written by pretraining at the end of the run, or by the TF1 checkpoint converter)")
  try:
    with open(config_path) as f:
      description = json.load(f)
    model_config = ml_collections.ConfigDict(description["model"])
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise errors.InvalidInput(f"{config_path} is corrupt: {e}") from e
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      variables = checkpointer.restore(variables_path)
  except Exception as e:  # Orbax raises several types for truncated or foreign files.
    raise errors.InvalidInput(
        f"the variables in {variables_path} cannot be read ({type(e).__name__}: {e})") from e
  to_numpy = lambda tree: jax.tree.map(np.asarray, tree)
  return EncoderExport(model_config=model_config, params=to_numpy(variables["params"]),
                       batch_stats=to_numpy(variables.get("batch_stats", {})),
                       metadata=description.get("metadata", {}))


def resolve_export_dir(path: str) -> str:
  """An export directory, or the workdir of the run that wrote one into `export/`."""
  if not path:
    raise errors.InvalidInput(
        "no export given: set init_from to an encoder export directory (a pretraining "
        "workdir's export/, or a probe/fine-tune workdir)")
  nested = os.path.join(path, "export")
  if (not os.path.isfile(os.path.join(path, MODEL_CONFIG_FILE))
      and os.path.isfile(os.path.join(nested, MODEL_CONFIG_FILE))):
    return nested
  return path


def check_architecture(model_config: Mapping[str, Any], export_config: Mapping[str, Any],
                       export_dir: str) -> None:
  """Raises errors.InvalidInput listing every architecture field where the run config and export
  differ."""
  run = models.ModelConfig.from_mapping(model_config).architecture()
  exported = models.ModelConfig.from_mapping(export_config).architecture()
  differences = [f"{field}: config.model has {run[field]!r}, the export has {exported[field]!r}"
                 for field in run if run[field] != exported[field]]
  if differences:
    raise errors.InvalidInput(f"the encoder export {export_dir} does not match config.model ("
                     + "; ".join(differences) + "); set config.model to the export's values")


def _representation_modules(projection_layer: int) -> list[str]:
  return ["encoder"] + (["projection_head"] if projection_layer > 0 else [])


def _check_variables_fit(classifier: models.Classifier, variables: Mapping[str, Any],
                         image_size: int, export_dir: str) -> None:
  """The export's arrays must have exactly the shapes the network expects."""
  expected = jax.eval_shape(
      lambda: classifier.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)),
                              train=False))
  for collection in ("params", "batch_stats"):
    for module in variables[collection]:
      want = jax.tree.map(lambda x: x.shape, expected[collection][module])
      have = jax.tree.map(np.shape, variables[collection][module])
      if jax.tree.structure(want) != jax.tree.structure(have) or want != have:
        raise errors.InvalidInput(
            f"the {collection}/{module} arrays in {export_dir} do not fit the network "
            "described by its model.json (a corrupt or hand-edited export)")


def load_encoder_variables(init_from: str, model_config: Mapping[str, Any], *,
                           projection_layer: int, image_size: int
                           ) -> tuple[EncoderExport, dict]:
  """The export at `init_from` and its variables {'params', 'batch_stats'} for a Classifier.

  Raises errors.MissingInput (no export there), errors.InvalidInput (corrupt, or its architecture
  differs from `model_config`, or it lacks the projection head the representation needs).
  """
  export_dir = resolve_export_dir(init_from)
  encoder_export = load_encoder(export_dir)
  check_architecture(model_config, encoder_export.model_config, export_dir)
  modules = _representation_modules(projection_layer)
  missing = [module for module in modules if module not in encoder_export.params]
  if missing:
    raise errors.InvalidInput(
        f"the export {export_dir} has no {missing} parameters, needed for the "
        f"representation {models.representation_name(projection_layer)!r}")
  variables = {collection: {module: getattr(encoder_export, collection)[module]
                            for module in modules} for collection in ("params", "batch_stats")}
  classifier = models.Classifier(models.ModelConfig.from_mapping(model_config), num_classes=1,
                                 projection_layer=projection_layer)
  _check_variables_fit(classifier, variables, image_size, export_dir)
  return encoder_export, variables


def load_classifier_export(path: str, *, projection_layer: int | None = None
                           ) -> tuple[models.Classifier, dict, EncoderExport]:
  """(classifier, its variables, the export) from an export holding a `supervised_head`.

  `path` is the export or the workdir of a probe / fine-tune (their export/ holds the encoder
  with the trained head). `projection_layer` defaults to the one recorded in the export's
  metadata (0 when absent, e.g. a converted supervised TF1 checkpoint).
  """
  export_dir = resolve_export_dir(path)
  encoder_export = load_encoder(export_dir)
  if models.SUPERVISED_HEAD not in encoder_export.params:
    raise errors.InvalidInput(
        f"the export {export_dir} has no classifier head ('{models.SUPERVISED_HEAD}'): give the "
        "workdir of a linear probe or fine-tune (or its export/), or a converted checkpoint with "
        "its supervised head")
  if projection_layer is None:
    projection_layer = int(encoder_export.metadata.get("projection_layer", 0))
  num_classes = int(np.shape(encoder_export.params[models.SUPERVISED_HEAD]["dense"]["bias"])[0])
  classifier = models.Classifier(models.ModelConfig.from_mapping(encoder_export.model_config),
                                 num_classes=num_classes, projection_layer=projection_layer)
  modules = _representation_modules(projection_layer)
  variables = {
      "params": {module: encoder_export.params[module]
                 for module in modules + [models.SUPERVISED_HEAD]},
      "batch_stats": {module: encoder_export.batch_stats[module] for module in modules},
  }
  return classifier, variables, encoder_export


def replace_export(directory: str, *, model_config: Mapping[str, Any], params: Mapping[str, Any],
                   batch_stats: Mapping[str, Any], metadata: Mapping[str, Any]) -> str:
  """`save_encoder` into `directory` after removing an older export there (a probe's or a
  fine-tune's export/ is rewritten when the run is continued)."""
  if jax.process_index() == 0 and os.path.isdir(directory):
    logging.info("replacing the previous export in %s", directory)
    shutil.rmtree(directory)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("export_cleared")
  return save_encoder(directory, model_config=model_config, params=params,
                      batch_stats=batch_stats, metadata=metadata)
