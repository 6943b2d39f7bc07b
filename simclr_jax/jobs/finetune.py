"""Fine-tuning an encoder export (or a random init: the supervised baseline) with labels.

The paper's recipe (SimCLR v1 appendix B.5, v2 section 4): SGD with Nesterov momentum, no weight
decay and no warmup by default, crop + flip, cosine decay; 1% / 10% label subsets that are
class-balanced and deterministic for a seed. The linear head `supervised_head` sits on h or on
projection-head layer `projection_layer` (v2 fine-tunes from layer 1).

The head starts at zero with `zero_init_head` (the official `--zero_init_logits_layer`): its first
steps then cannot push large, random logits back into a pretrained encoder.

`fine_tune_after_block=k` (the official flag): k=-1 trains everything; k in 0..4 freezes the stem
(k=0) and block groups 1..k in two ways at once, as the official code: the model stops gradients
after block k and runs those layers' BN on running statistics, and the optimizer gives their
parameters zero updates (`trainable_mask`), so weight decay or momentum cannot move them either;
this is checked at the end. Batch norm elsewhere is global: the update step is
`jit(shard_map(...))` over 'data' with BN statistics averaged over devices, and the loss is the
mean over the global batch, so 1 and 8 devices take the same step.

The tuned network goes to workdir/export in the encoder export format of pretraining
(`simclr_jax.export`), with its head: a linear probe (`init_from=<workdir>`) or
`simclr_jax.tools.predict` reads it, for a fine-tuned and a from-scratch encoder alike.
"""
import hashlib
import json
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from simclr_jax import augment
from simclr_jax import config_checks
from simclr_jax import export
from simclr_jax import features
from simclr_jax import input_pipeline
from simclr_jax import loop
from simclr_jax import losses
from simclr_jax import models
from simclr_jax import optim
from simclr_jax import sharding
from simclr_jax import workdir_files
from simclr_jax.evaluators import classification
from simclr_jax.jobs import supervised

DATA_AXIS = sharding.DATA_AXIS
LABEL_SUBSET_FILE = "label_subset.json"
_BLOCK_GROUP = re.compile(r"^block([1-4])_\d+$")


def encoder_stage(layer_name: str) -> int:
  """0 for the stem's layers, g for block group g's."""
  match = _BLOCK_GROUP.match(layer_name)
  return int(match.group(1)) if match else 0


def trainable_mask(params: Mapping[str, Any], *, fine_tune_after_block: int,
                   projection_layer: int) -> Any:
  """True for parameters that fine-tuning updates.

  Frozen: encoder stages <= fine_tune_after_block, and projection-head layers beyond the
  representation (they do not reach the logits).
  """
  def trainable(path, _):
    names = [key.key for key in path]  # params are nested dicts
    if names[0] == "encoder":
      return encoder_stage(names[1]) > fine_tune_after_block
    if names[0] == "projection_head":
      return int(names[1].rsplit("_", 1)[1]) < projection_layer
    return True
  return jax.tree_util.tree_map_with_path(trainable, params)


def frozen_encoder_part(variables: Mapping[str, Any], fine_tune_after_block: int) -> dict:
  """The encoder layers of stages <= fine_tune_after_block, from params or batch_stats."""
  return {name: value for name, value in variables["encoder"].items()
          if encoder_stage(name) <= fine_tune_after_block}


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int) -> None:
  supervised.validate_config(config, mode="finetune", num_devices=num_devices)
  config_checks.check_augmentations(config, host_crop_views=(0, 1))
  config_checks.check_training(config)
  require = config_checks.require
  require(config.fine_tune_after_block in range(-1, 5),
          f"fine_tune_after_block={config.fine_tune_after_block!r}; allowed: -1 (train "
          "everything) or 0..4 (freeze the stem and block groups up to it)")
  if config.from_scratch:
    require(not config.init_from, f"from_scratch=True trains from a random init, but init_from="
            f"{config.init_from!r} is set; clear one of them")
  else:
    require(bool(config.init_from), "init_from is empty: give an encoder export directory, or "
            "set from_scratch=True for the supervised baseline from random init")
  require(0 < config.label_fraction <= 1,
          f"label_fraction={config.label_fraction} must be in (0, 1] (1 = all labels)")
  require(config.labels_per_class >= 0,
          f"labels_per_class={config.labels_per_class} must be >= 0 (0 = unused)")
  require(not (config.label_fraction < 1 and config.labels_per_class > 0),
          f"label_fraction={config.label_fraction} and labels_per_class="
          f"{config.labels_per_class} both choose a label subset; set only one")


def choose_label_subset(config: ml_collections.ConfigDict, train_size: int
                        ) -> tuple[np.ndarray | None, dict]:
  """(example indices or None for all, what results.json records about the subset)."""
  record = {"label_fraction": float(config.label_fraction),
            "labels_per_class": int(config.labels_per_class), "label_subset_seed": config.seed}
  if config.label_fraction >= 1 and config.labels_per_class == 0:
    record.update(num_labeled_examples=train_size, label_subset_hash="all")
    return None, record
  subset = np.asarray(input_pipeline.label_subset(
      config.dataset, data_dir=config.data_dir or None, split=config.train_split,
      fraction=config.label_fraction if config.label_fraction < 1 else None,
      per_class=config.labels_per_class or None, seed=config.seed))
  record.update(num_labeled_examples=int(len(subset)),
                label_subset_hash=hashlib.sha256(np.sort(subset).astype(np.int64).tobytes()
                                                 ).hexdigest()[:16])
  return subset, record


def make_finetune_step(classifier: models.Classifier, optimizer: optax.GradientTransformation,
                       augment_view, *, fine_tune_after_block: int,
                       learning_rate_fn: optax.Schedule, mesh: jax.sharding.Mesh):
  """The fine-tuning step (`sharding.shard_step`): global BN, one augmented view per image."""
  def step_on_shard(state: loop.TrainState, images, indices, labels):
    images = augment.augment_batch(augment_view, images, indices, state.rng, state.step,
                                   num_views=1)

    def loss_fn(params):
      (logits, _), updated = classifier.apply(
          {"params": sharding.vary_over_data(params), "batch_stats": state.batch_stats}, images,
          train=True, stop_gradient_after_block=fine_tune_after_block, mutable=["batch_stats"])
      metrics = losses.classification_metrics(logits, labels, axis_name=DATA_AXIS)
      return metrics["loss"], (metrics, updated["batch_stats"])

    grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(optimizer, grads, batch_stats)
    metrics = dict(loss=metrics["loss"], train_top1=metrics["top1"],
                   learning_rate=learning_rate_fn(state.step), grad_norm=optax.global_norm(grads),
                   param_norm=optax.global_norm(new_state.params))
    return new_state, {name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()}

  return sharding.shard_step(step_on_shard, mesh)


def initial_variables(config: ml_collections.ConfigDict, classifier: models.Classifier
                      ) -> tuple[dict, dict, dict]:
  """(params, batch_stats, model config to export) on the host, before any training.

  From an export, only the linear head is initialised here (initialising a whole ResNet compiles
  its random initialisers, which takes seconds on a CPU); from scratch, everything, with the
  'rbg' PRNG as pretraining's `create_train_state` (a third of threefry's compile time).
  """
  key = jax.random.PRNGKey(config.seed)
  images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  if config.from_scratch:
    variables = sharding.to_host(jax.jit(lambda seed: classifier.init(
        jax.random.key(seed, impl="rbg"), images, train=False))(np.uint32(config.seed)))
    params, batch_stats = dict(variables["params"]), dict(variables["batch_stats"])
    model_config = config.model.to_dict()
  else:
    encoder_export, pretrained = export.load_encoder_variables(
        config.init_from, config.model, projection_layer=config.projection_layer,
        image_size=config.image_size)
    shapes = jax.eval_shape(lambda: classifier.init(key, images, train=False))
    feature_dim = shapes["params"][models.SUPERVISED_HEAD]["dense"]["kernel"].shape[0]
    head = models.LinearHead(classifier.num_classes)
    params = dict(pretrained["params"], **{models.SUPERVISED_HEAD: sharding.to_host(
        head.init(key, jnp.zeros((1, feature_dim), jnp.float32))["params"])})
    batch_stats = dict(pretrained["batch_stats"])
    # The export's architecture (checked equal to config.model) with this run's BN momentum.
    model_config = dict(encoder_export.model_config.to_dict(),
                        bn_momentum=config.model.bn_momentum)
  if config.zero_init_head:
    params[models.SUPERVISED_HEAD] = jax.tree.map(np.zeros_like, params[models.SUPERVISED_HEAD])
  return params, batch_stats, model_config


def run(config: ml_collections.ConfigDict, workdir: str, *,
        mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
  """Fine-tunes on `config.dataset` (or a label subset of it); returns the results dict.

  `mesh` defaults to every device of every process along 'data'. Rerunning the same command on
  the workdir resumes from its newest checkpoint, or returns the results of a finished run.
  """
  workdir = os.path.abspath(workdir)
  mesh = mesh if mesh is not None else sharding.create_mesh()
  validate_config(config, num_devices=mesh.devices.size)
  info = input_pipeline.get_dataset_info(config.dataset, data_dir=config.data_dir or None)
  sizes = supervised.split_sizes(config, mesh)
  finished = workdir_files.finished_results(workdir, config)
  if finished is not None:
    return finished
  classifier = supervised.create_classifier(config, info.num_classes, axis_name=DATA_AXIS)
  params, batch_stats, model_config = initial_variables(config, classifier)
  subset, subset_record = choose_label_subset(config, sizes[config.train_split])
  num_examples = subset_record["num_labeled_examples"]
  optimizer, schedule, total_steps = optim.optimizer_from_config(
      config, num_examples,
      trainable_mask=trainable_mask(params, fine_tune_after_block=config.fine_tune_after_block,
                                    projection_layer=config.projection_layer))
  initial_frozen = {
      "params": frozen_encoder_part(params, config.fine_tune_after_block),
      "batch_stats": frozen_encoder_part(batch_stats, config.fine_tune_after_block)}

  def initialize() -> loop.TrainState:
    state = loop.TrainState(step=np.zeros((), np.int32), params=params, batch_stats=batch_stats,
                            opt_state=optimizer.init(params),
                            rng=jax.random.split(jax.random.PRNGKey(config.seed))[1])
    return jax.device_put(state, sharding.replicated(mesh))

  augment_view = augment.build_augmentation(config.augment, config.image_size,
                                            crop_on_device=config.host_crop_views == 0,
                                            backend=config.augment_backend)
  finetune_step = make_finetune_step(
      classifier, optimizer, augment_view, fine_tune_after_block=config.fine_tune_after_block,
      learning_rate_fn=schedule, mesh=mesh)
  eval_classifier = classifier.clone(axis_name=None)
  logits_fn = features.sharded_apply(lambda variables, images: eval_classifier.apply(
      variables, images, train=False)[0], mesh)
  test_accuracy = classification.ClassificationEvaluator(
      lambda state: features.run_over_dataset(
          logits_fn, {"params": state.params, "batch_stats": state.batch_stats},
          supervised.eval_batches(config, mesh)(config.eval_split),
          keep_images=classification.GRID_IMAGES, description="logits"),
      every_steps=config.eval_every_steps, num_classes=info.num_classes)

  def finish(state: loop.TrainState, summary: dict[str, Any]) -> dict[str, Any]:
    params, batch_stats = sharding.to_host((state.params, state.batch_stats))
    if config.fine_tune_after_block >= 0:
      supervised.assert_unchanged(initial_frozen, {
          "params": frozen_encoder_part(params, config.fine_tune_after_block),
          "batch_stats": frozen_encoder_part(batch_stats, config.fine_tune_after_block)},
          f"the frozen encoder stages 0..{config.fine_tune_after_block}")
    if jax.process_index() == 0 and subset is not None:
      with open(os.path.join(workdir, LABEL_SUBSET_FILE), "w") as f:
        json.dump({"split": config.train_split, "indices": sorted(int(i) for i in subset),
                   **subset_record}, f)
    origin = "random init" if config.from_scratch else "pretrained"
    return supervised.finish(
        workdir, config, info=info, test=test_accuracy.last_outputs,
        title=f"fine-tuned ({origin}) on {config.dataset}", model_config=model_config,
        params=params, batch_stats=batch_stats, source="simclr_jax.jobs.finetune",
        num_devices=mesh.devices.size,
        report=dict(summary, fine_tune_after_block=int(config.fine_tune_after_block),
                    from_scratch=int(bool(config.from_scratch)), **subset_record))

  return loop.run(
      config, workdir, initialize=initialize, train_step=finetune_step,
      make_batches=lambda start_step: input_pipeline.train_iterator_from_config(
          config, mesh=mesh, start_step=start_step, subset=subset),
      total_steps=total_steps, num_examples=num_examples, finish=finish,
      evaluators=[test_accuracy],
      identity={"init_from": config.init_from,
                "label_subset_hash": subset_record["label_subset_hash"]})
