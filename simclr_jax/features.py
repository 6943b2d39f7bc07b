"""Encoders loaded from exports, classifiers built on them, features extracted in inference mode.

Shared by the linear probe, fine-tuning, k-NN and the prediction-grid tool. The representation is
`h` (the pooled ResNet output, `projection_layer=0`) or the output of projection-head layer i
(`projection_layer=i`, SimCLRv2 fine-tunes from layer 1). Everything runs on any device count:
batches are split over the mesh axis `data`, variables replicated.
"""
import os
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from simclr_jax import export
from simclr_jax import models
from simclr_jax import sharding

# Model config fields that decide the network's function; all must match between the run's
# config.model and the export (bn_momentum only matters while training, so it may differ).
ARCHITECTURE_FIELDS = ("depth", "width_multiplier", "cifar_stem", "sk_ratio", "tf_same_padding",
                       "head_layers", "head_hidden_dim", "projection_dim", "bn_epsilon")
SUPERVISED_HEAD = "supervised_head"


class Classifier(models.SimCLRModel):
  """ResNet encoder, projection head (when the representation is one of its layers) and a linear
  head `supervised_head` (the official `head_supervised`), with the export's variable names.

  A SimCLRModel subclass for its architecture fields, so `models.model_kwargs` builds both from
  one `config.model`; `__call__` is its own (no probe, the head on the chosen representation).
  """
  projection_layer: int = 0

  def setup(self):
    bn = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, axis_name=self.axis_name,
              dtype=self.dtype)
    self.encoder = models.ResNet(self.depth, width_multiplier=self.width_multiplier,
                                 cifar_stem=self.cifar_stem, sk_ratio=self.sk_ratio,
                                 tf_same_padding=self.tf_same_padding, **bn,
                                 conv_general_dilated=models.conv_function(self.conv_backend),
                                 native_batch_norm=self.norm_backend == "native")
    if self.projection_layer > 0:
      self.projection_head = models.ProjectionHead(self.head_layers, self.head_hidden_dim,
                                                   self.projection_dim, **bn)
    self.supervised_head = models.LinearHead(self.num_classes)

  def represent(self, images, *, train: bool, stop_gradient_after_block: int = -1):
    """The representation [N, D] (float32) of float images in [0, 1]."""
    outputs = self.encoder(images, train=train,
                           stop_gradient_after_block=stop_gradient_after_block)
    if self.projection_layer == 0:
      return outputs["h"]
    _, hiddens = self.projection_head(outputs["h"], train=train)
    return hiddens[self.projection_layer]

  def __call__(self, images, *, train: bool, stop_gradient_after_block: int = -1):
    """(logits [N, num_classes], representation [N, D])."""
    representation = self.represent(images, train=train,
                                    stop_gradient_after_block=stop_gradient_after_block)
    return self.supervised_head(representation), representation


def create_classifier(model_config: Mapping[str, Any], *, num_classes: int,
                      projection_layer: int = 0, axis_name: str | None = None,
                      dtype: Any = jnp.float32, conv_backend: str = "xla",
                      norm_backend: str = "jax") -> Classifier:
  kwargs = models.model_kwargs(model_config)
  if isinstance(projection_layer, bool) or projection_layer not in range(kwargs["head_layers"] + 1):
    raise ValueError(
        f"projection_layer={projection_layer!r}: 0 takes h, 1..{kwargs['head_layers']} the output "
        f"of that projection-head layer (the model has head_layers={kwargs['head_layers']})")
  return Classifier(num_classes=num_classes, projection_layer=projection_layer,
                    axis_name=axis_name, dtype=dtype, conv_backend=conv_backend,
                    norm_backend=norm_backend, **kwargs)


def representation_name(projection_layer: int) -> str:
  return "h" if projection_layer == 0 else f"projection_head_layer_{projection_layer}"


def resolve_export_dir(path: str) -> str:
  """An export directory, or the workdir of the run that wrote one into `export/`."""
  if not path:
    raise ValueError("no export given: set init_from to an encoder export directory (a pretraining "
                     "workdir's export/, or a probe/fine-tune workdir)")
  nested = os.path.join(path, "export")
  if (not os.path.isfile(os.path.join(path, export.MODEL_CONFIG_FILE))
      and os.path.isfile(os.path.join(nested, export.MODEL_CONFIG_FILE))):
    return nested
  return path


def check_architecture(model_config: Mapping[str, Any], export_config: Mapping[str, Any],
                       export_dir: str) -> None:
  """Raises ValueError listing every architecture field where the run config and export differ."""
  run = models.model_kwargs(model_config)
  exported = models.model_kwargs(export_config)
  differences = [f"{field}: config.model has {run[field]!r}, the export has {exported[field]!r}"
                 for field in ARCHITECTURE_FIELDS if run[field] != exported[field]]
  if differences:
    raise ValueError(f"the encoder export {export_dir} does not match config.model ("
                     + "; ".join(differences) + "); set config.model to the export's values")


def _check_variables_fit(classifier: Classifier, variables: Mapping[str, Any], image_size: int,
                         export_dir: str) -> None:
  """The export's arrays must have exactly the shapes the network expects."""
  expected = jax.eval_shape(
      lambda: classifier.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)),
                              train=False))
  for collection in ("params", "batch_stats"):
    for module in variables[collection]:
      want = jax.tree.map(lambda x: x.shape, expected[collection][module])
      have = jax.tree.map(np.shape, variables[collection][module])
      if jax.tree.structure(want) != jax.tree.structure(have) or want != have:
        raise ValueError(f"the {collection}/{module} arrays in {export_dir} do not fit the network "
                         "described by its model.json (a corrupt or hand-edited export)")


def load_encoder_variables(init_from: str, model_config: Mapping[str, Any], *,
                           projection_layer: int, image_size: int
                           ) -> tuple[export.EncoderExport, dict]:
  """The export at `init_from` and its variables {'params', 'batch_stats'} for a Classifier.

  Raises FileNotFoundError (no export there), ValueError (corrupt, or its architecture differs
  from `model_config`, or it lacks the projection head the representation needs).
  """
  export_dir = resolve_export_dir(init_from)
  encoder_export = export.load_encoder(export_dir)
  check_architecture(model_config, encoder_export.model_config, export_dir)
  modules = ["encoder"] + (["projection_head"] if projection_layer > 0 else [])
  missing = [module for module in modules if module not in encoder_export.params]
  if missing:
    raise ValueError(f"the export {export_dir} has no {missing} parameters, needed for the "
                     f"representation {representation_name(projection_layer)!r}")
  variables = {
      "params": {module: encoder_export.params[module] for module in modules},
      "batch_stats": {module: encoder_export.batch_stats[module] for module in modules},
  }
  classifier = create_classifier(model_config, num_classes=1, projection_layer=projection_layer)
  _check_variables_fit(classifier, variables, image_size, export_dir)
  return encoder_export, variables


def load_classifier_export(path: str, *, projection_layer: int | None = None
                           ) -> tuple[Classifier, dict, export.EncoderExport]:
  """(classifier, its variables, the export) from an export holding a `supervised_head`.

  `path` is the export or the workdir of a probe / fine-tune (their export/ holds the encoder
  with the trained head). `projection_layer` defaults to the one recorded in the export's
  metadata (0 when absent, e.g. a converted supervised TF1 checkpoint).
  """
  export_dir = resolve_export_dir(path)
  encoder_export = export.load_encoder(export_dir)
  if SUPERVISED_HEAD not in encoder_export.params:
    raise ValueError(
        f"the export {export_dir} has no classifier head ('{SUPERVISED_HEAD}'): give the workdir "
        "of a linear probe or fine-tune (or its export/), or a converted checkpoint with its "
        "supervised head")
  if projection_layer is None:
    projection_layer = int(encoder_export.metadata.get("projection_layer", 0))
  num_classes = int(np.shape(encoder_export.params[SUPERVISED_HEAD]["dense"]["bias"])[0])
  classifier = create_classifier(encoder_export.model_config, num_classes=num_classes,
                                 projection_layer=projection_layer)
  modules = ["encoder"] + (["projection_head"] if projection_layer > 0 else [])
  variables = {
      "params": {module: encoder_export.params[module]
                 for module in modules + [SUPERVISED_HEAD]},
      "batch_stats": {module: encoder_export.batch_stats[module] for module in modules},
  }
  return classifier, variables, encoder_export


def images_to_float(images: jax.Array) -> jax.Array:
  """uint8 pipeline images to the model's float [0, 1]."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def make_feature_fn(classifier: Classifier, mesh: jax.sharding.Mesh
                    ) -> Callable[[Mapping[str, Any], jax.Array], jax.Array]:
  """jitted (variables, images) -> representation, BN in inference mode, sharded over `data`."""
  def represent(variables, images):
    return classifier.apply(variables, images_to_float(images), train=False,
                            method=Classifier.represent)
  return jax.jit(represent, in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
                 out_shardings=sharding.batch_sharded(mesh))


def make_logits_fn(classifier: Classifier, mesh: jax.sharding.Mesh
                   ) -> Callable[[Mapping[str, Any], jax.Array], jax.Array]:
  """jitted (variables, images) -> logits in inference mode, sharded over `data`."""
  def logits(variables, images):
    return classifier.apply(variables, images_to_float(images), train=False)[0]
  return jax.jit(logits, in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
                 out_shardings=sharding.batch_sharded(mesh))


def run_over_dataset(function: Callable[[Mapping[str, Any], jax.Array], jax.Array],
                     variables: Mapping[str, Any], batches: Iterable[Mapping[str, Any]], *,
                     keep_images: int = 0, max_examples: int = 0) -> dict[str, np.ndarray]:
  """Applies `function` to the batches of an eval iterator; unpadded host results in order.

  Returns {'outputs': [N, ...], 'labels': [N]} and, with `keep_images > 0`, the first
  `keep_images` images as 'images' (for prediction grids). `max_examples > 0` stops after the
  batch that reaches that many examples (all processes see the same batches, so they stop
  together).
  """
  outputs, labels, images = [], [], []
  num_images = num_examples = 0
  for batch in batches:
    result = function(variables, batch["image"])
    mask = sharding.to_host(batch["mask"]).astype(bool)
    outputs.append(sharding.to_host(result)[mask])
    labels.append(sharding.to_host(batch["label"])[mask])
    if num_images < keep_images:
      kept = sharding.to_host(batch["image"])[mask][:keep_images - num_images]
      images.append(kept)
      num_images += len(kept)
    num_examples += int(mask.sum())
    if max_examples and num_examples >= max_examples:
      break
  if not outputs:
    raise ValueError("the eval iterator yielded no batches (an empty split?)")
  result = {"outputs": np.concatenate(outputs), "labels": np.concatenate(labels).astype(np.int32)}
  if keep_images:
    result["images"] = np.concatenate(images)
  return result
