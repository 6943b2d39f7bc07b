"""Encoder exports: the hand-off between pretraining and probing, fine-tuning and conversion.

An export is a directory holding `model.json` (the model config that rebuilds the network) and an
Orbax checkpoint `variables/` with `{'params': {...}, 'batch_stats': {...}}` for the encoder and,
where present, the projection head (and a supervised head, for imported checkpoints). It is
device-layout free: it restores on any number of devices.
"""
import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

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
    raise FileNotFoundError(
        f"{directory} is not an encoder export: expected {MODEL_CONFIG_FILE} and {VARIABLES_DIR}/ "
        "(written by pretraining at the end of the run, or by the TF1 checkpoint converter)")
  try:
    with open(config_path) as f:
      description = json.load(f)
    model_config = ml_collections.ConfigDict(description["model"])
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"{config_path} is corrupt: {e}") from e
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      variables = checkpointer.restore(variables_path)
  except Exception as e:  # Orbax raises several types for truncated or foreign files.
    raise ValueError(f"the variables in {variables_path} cannot be read ({type(e).__name__}: {e})"
                     ) from e
  to_numpy = lambda tree: jax.tree.map(np.asarray, tree)
  return EncoderExport(model_config=model_config, params=to_numpy(variables["params"]),
                       batch_stats=to_numpy(variables.get("batch_stats", {})),
                       metadata=description.get("metadata", {}))
