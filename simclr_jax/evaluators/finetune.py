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
"""
import hashlib
import json
import os
import re
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from simclr_jax import augment
from simclr_jax import checkpointing
from simclr_jax import features
from simclr_jax import input_pipeline
from simclr_jax import losses
from simclr_jax import models
from simclr_jax import optim
from simclr_jax import sharding
from simclr_jax import train
from simclr_jax.evaluators import common

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


def validate_finetune_config(config: ml_collections.ConfigDict, *, num_devices: int) -> None:
  common.validate_common(config, mode="finetune", num_devices=num_devices)
  augment.validate(config.augment)
  common.require(config.fine_tune_after_block in range(-1, 5),
                 f"fine_tune_after_block={config.fine_tune_after_block!r}; allowed: -1 (train "
                 "everything) or 0..4 (freeze the stem and block groups up to it)")
  if config.from_scratch:
    common.require(not config.init_from,
                   f"from_scratch=True trains from a random init, but init_from="
                   f"{config.init_from!r} is set; clear one of them")
  else:
    common.require(bool(config.init_from),
                   "init_from is empty: give an encoder export directory, or set "
                   "from_scratch=True for the supervised baseline from random init")
  common.require(0 < config.label_fraction <= 1,
                 f"label_fraction={config.label_fraction} must be in (0, 1] (1 = all labels)")
  common.require(config.labels_per_class >= 0,
                 f"labels_per_class={config.labels_per_class} must be >= 0 (0 = unused)")
  common.require(not (config.label_fraction < 1 and config.labels_per_class > 0),
                 f"label_fraction={config.label_fraction} and labels_per_class="
                 f"{config.labels_per_class} both choose a label subset; set only one")
  common.require(config.optimizer.name in optim.OPTIMIZERS,
                 f"optimizer.name={config.optimizer.name!r}; allowed: "
                 f"{', '.join(optim.OPTIMIZERS)}")


def choose_label_subset(config: ml_collections.ConfigDict, train_size: int
                        ) -> tuple[np.ndarray | None, dict]:
  """(example indices or None for all, what results.json records about the subset)."""
  record = {"label_fraction": float(config.label_fraction),
            "labels_per_class": int(config.labels_per_class), "label_subset_seed": config.seed}
  if config.label_fraction >= 1 and config.labels_per_class == 0:
    record.update(num_labeled_examples=train_size, label_subset_hash="all")
    return None, record
  subset = np.asarray(input_pipeline.label_subset(
      config.dataset, data_dir=train.data_dir(config), split=config.train_split,
      fraction=config.label_fraction if config.label_fraction < 1 else None,
      per_class=config.labels_per_class or None, seed=config.seed))
  record.update(num_labeled_examples=int(len(subset)),
                label_subset_hash=hashlib.sha256(np.sort(subset).astype(np.int64).tobytes()
                                                 ).hexdigest()[:16])
  return subset, record


def make_finetune_step(classifier: features.Classifier, optimizer: optax.GradientTransformation,
                       augment_view, *, fine_tune_after_block: int,
                       learning_rate_fn: optax.Schedule, mesh: jax.sharding.Mesh):
  """jit(shard_map(step)): (state, global batch) -> (state, metrics); the state is donated.

  As in pretraining, the augmentation runs in its own shard_map without varying-axis checks
  (jax 0.10.2 mis-types vmap(lax.cond) under them), the learning step with them, so that the
  replicated parameters' gradient comes out summed over devices: no further pmean.
  """
  def augment_shard(images, indices, base_key, step):
    return common.augment_images(augment_view, images, indices, base_key, step)

  def learn_on_shard(state: train.TrainState, images, labels):
    def loss_fn(params):
      (logits, _), updated = classifier.apply(
          {"params": params, "batch_stats": state.batch_stats}, images, train=True,
          stop_gradient_after_block=fine_tune_after_block, mutable=["batch_stats"])
      metrics = losses.classification_metrics(logits, labels, axis_name=DATA_AXIS)
      return metrics["loss"], (metrics, updated["batch_stats"])

    grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1,
                              params=optax.apply_updates(state.params, updates),
                              batch_stats=batch_stats, opt_state=opt_state)
    return new_state, {"loss": metrics["loss"], "train_top1": metrics["top1"],
                       "learning_rate": jnp.asarray(learning_rate_fn(state.step), jnp.float32)}

  batch_spec, replicated_spec = jax.P(DATA_AXIS), jax.P()
  augment_step = jax.shard_map(
      augment_shard, mesh=mesh, in_specs=(batch_spec, batch_spec, replicated_spec, replicated_spec),
      out_specs=batch_spec, check_vma=False)
  learn_step = jax.shard_map(learn_on_shard, mesh=mesh,
                             in_specs=(replicated_spec, batch_spec, batch_spec),
                             out_specs=(replicated_spec, replicated_spec))

  def step(state: train.TrainState, batch):
    images = augment_step(common.training_images(batch), batch["index"], state.rng, state.step)
    return learn_step(state, images, batch["label"])

  return jax.jit(step, donate_argnums=0)


def initial_variables(config: ml_collections.ConfigDict, classifier: features.Classifier
                      ) -> tuple[dict, dict, dict]:
  """(params, batch_stats, model config to export) on the host, before any training.

  From an export, only the linear head is initialised here (initialising a whole ResNet compiles
  its random initialisers, which takes seconds on a CPU); from scratch, everything.
  """
  key = jax.random.PRNGKey(config.seed)
  images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  if config.from_scratch:
    variables = sharding.to_host(jax.jit(
        lambda key: classifier.init(key, images, train=False))(key))
    params, batch_stats = dict(variables["params"]), dict(variables["batch_stats"])
    model_config = config.model.to_dict()
  else:
    encoder_export, pretrained = features.load_encoder_variables(
        config.init_from, config.model, projection_layer=config.projection_layer,
        image_size=config.image_size)
    shapes = jax.eval_shape(lambda: classifier.init(key, images, train=False))
    feature_dim = shapes["params"][features.SUPERVISED_HEAD]["dense"]["kernel"].shape[0]
    head = models.LinearHead(classifier.num_classes)
    params = dict(pretrained["params"], **{features.SUPERVISED_HEAD: sharding.to_host(
        head.init(key, jnp.zeros((1, feature_dim), jnp.float32))["params"])})
    batch_stats = dict(pretrained["batch_stats"])
    # The export's architecture (checked equal to config.model) with this run's BN momentum.
    model_config = dict(encoder_export.model_config.to_dict(),
                        bn_momentum=config.model.bn_momentum)
  if config.zero_init_head:
    params[features.SUPERVISED_HEAD] = jax.tree.map(np.zeros_like,
                                                    params[features.SUPERVISED_HEAD])
  return params, batch_stats, model_config


def _run_record(config: ml_collections.ConfigDict, step: int, subset_record: Mapping) -> dict:
  return {"step": step, "mode": "finetune", "seed": config.seed, "dataset": config.dataset,
          "init_from": config.init_from, "global_batch_size": config.global_batch_size,
          "label_subset_hash": subset_record["label_subset_hash"]}


def finetune(config: ml_collections.ConfigDict, workdir: str, *,
             mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
  """Fine-tunes on `config.dataset` (or a label subset of it); returns the results dict.

  `mesh` defaults to every device of every process along 'data'. Rerunning the same command on
  the workdir resumes from its newest checkpoint, or returns the results of a finished run.
  """
  workdir = os.path.abspath(workdir)
  mesh = mesh if mesh is not None else sharding.create_mesh()
  validate_finetune_config(config, num_devices=mesh.devices.size)
  info, split_sizes = common.dataset_info(config, mesh)
  classifier = features.create_classifier(
      config.model, num_classes=info.num_classes, projection_layer=config.projection_layer,
      axis_name=DATA_AXIS, dtype=common.dtype(config))
  params, batch_stats, model_config = initial_variables(config, classifier)

  subset, subset_record = choose_label_subset(config, split_sizes[config.train_split])
  num_examples = subset_record["num_labeled_examples"]
  total_steps = common.total_steps(config, num_examples)
  warmup_steps = min(optim.steps_from_epochs(config.optimizer.warmup_epochs, num_examples,
                                             config.global_batch_size), total_steps - 1)
  schedule = optim.learning_rate_schedule(
      config.optimizer.base_learning_rate, lr_scaling=config.optimizer.lr_scaling,
      global_batch_size=config.global_batch_size, total_steps=total_steps,
      warmup_steps=warmup_steps)
  optimizer = optim.create_optimizer(
      config.optimizer.name, schedule, weight_decay=config.optimizer.weight_decay,
      momentum=config.optimizer.momentum, nesterov=config.optimizer.nesterov,
      trainable_mask=trainable_mask(params, fine_tune_after_block=config.fine_tune_after_block,
                                    projection_layer=config.projection_layer))
  initial_frozen = {
      "params": frozen_encoder_part(params, config.fine_tune_after_block),
      "batch_stats": frozen_encoder_part(batch_stats, config.fine_tune_after_block)}
  state = train.TrainState(step=np.zeros((), np.int32), params=params, batch_stats=batch_stats,
                           opt_state=optimizer.init(params),
                           rng=jax.random.split(jax.random.PRNGKey(config.seed))[1])
  state = jax.device_put(state, sharding.replicated(mesh))

  os.makedirs(workdir, exist_ok=True)
  checkpointer = checkpointing.TrainCheckpointer(os.path.join(workdir, train.CHECKPOINT_DIR),
                                                 keep=config.keep_checkpoints)
  restored = checkpointer.restore_latest(state)
  if restored is not None:
    state, record = restored
    expected = _run_record(config, 0, subset_record)
    for key in ("mode", "seed", "dataset", "init_from", "global_batch_size", "label_subset_hash"):
      if record.get(key) != expected[key]:
        checkpointer.close()
        raise ValueError(f"{workdir} holds a run with {key}={record.get(key)!r}, the config says "
                         f"{expected[key]!r}: use a new --workdir")
  start_step = int(sharding.to_host(state.step))
  finished = common.finished_results(workdir, config) if start_step >= total_steps else None
  if finished is not None:
    checkpointer.close()
    return finished
  common.write_config(workdir, config)
  if jax.process_index() == 0:
    if subset is not None:
      with open(os.path.join(workdir, LABEL_SUBSET_FILE), "w") as f:
        json.dump({"split": config.train_split, "indices": sorted(int(i) for i in subset),
                   **subset_record}, f)
  logging.info("fine-tuning on %s (%d labelled examples): %d steps of %d images on %d device(s), "
               "starting at step %d", config.dataset, num_examples, total_steps,
               config.global_batch_size, mesh.devices.size, start_step)

  augment_view = augment.build_augmentation(config.augment, config.image_size,
                                            crop_on_device=config.host_crop_views == 0)
  finetune_step = make_finetune_step(
      classifier, optimizer, augment_view, fine_tune_after_block=config.fine_tune_after_block,
      learning_rate_fn=schedule, mesh=mesh)
  logits_fn = features.make_logits_fn(classifier.clone(axis_name=None), mesh)
  batches = input_pipeline.create_train_iterator(
      config.dataset, data_dir=train.data_dir(config), split=config.train_split,
      global_batch_size=config.global_batch_size, image_size=config.image_size,
      host_crop_views=config.host_crop_views, seed=config.seed, start_step=start_step, mesh=mesh,
      subset=subset)

  def evaluate(keep_images: int = 0) -> dict[str, np.ndarray]:
    eval_batches = input_pipeline.create_eval_iterator(
        config.dataset, data_dir=train.data_dir(config), split=config.eval_split,
        global_batch_size=config.global_batch_size, image_size=config.image_size, mesh=mesh)
    return features.run_over_dataset(
        logits_fn, {"params": state.params, "batch_stats": state.batch_stats}, eval_batches,
        keep_images=keep_images)

  writer = train.create_metric_writer(workdir)
  pending, last_metrics = [], {}
  try:
    for step in range(start_step + 1, total_steps + 1):
      state, metrics = finetune_step(state, next(batches))
      pending.append(metrics)
      saving = step % config.checkpoint_every_steps == 0 or step == total_steps
      if saving or step % config.log_every_steps == 0:  # never save an unchecked state
        fetched = sharding.to_host(pending)
        pending.clear()
        last_metrics = {name: float(np.mean([m[name] for m in fetched])) for name in fetched[0]}
        if not np.isfinite(last_metrics["loss"]):
          raise FloatingPointError(
              f"fine-tuning loss is {last_metrics['loss']} at step {step}; the last good "
              f"checkpoint is kept. Lower optimizer.base_learning_rate")
        writer.write_scalars(step, last_metrics)
      if config.eval_every_steps and step % config.eval_every_steps == 0 and step < total_steps:
        evaluated = evaluate()
        writer.write_scalars(step, {"test_top1": float(np.mean(
            evaluated["outputs"].argmax(axis=1) == evaluated["labels"]))})
      if saving:
        checkpointer.save(step, state, _run_record(config, step, subset_record))
    checkpointer.wait_until_finished()

    params, batch_stats = sharding.to_host((state.params, state.batch_stats))
    if config.fine_tune_after_block >= 0:
      common.assert_unchanged(initial_frozen, {
          "params": frozen_encoder_part(params, config.fine_tune_after_block),
          "batch_stats": frozen_encoder_part(batch_stats, config.fine_tune_after_block)},
          f"the frozen encoder stages 0..{config.fine_tune_after_block}")
    evaluated = evaluate(keep_images=common.GRID_IMAGES)
    results = {"mode": "finetune", "dataset": config.dataset,
               "representation": features.representation_name(config.projection_layer),
               "fine_tune_after_block": int(config.fine_tune_after_block),
               "from_scratch": int(bool(config.from_scratch)),
               "num_train_steps": total_steps, "num_devices": int(mesh.devices.size)}
    results.update(common.classification_results(evaluated["outputs"], evaluated["labels"],
                                                 info.num_classes))
    results.update(subset_record)
    if last_metrics:
      results.update(train_loss=last_metrics["loss"], train_top1=last_metrics["train_top1"])
    writer.write_scalars(total_steps, {"test_top1": results["top1"], "test_top5": results["top5"]})
  finally:
    batches.close()  # stop the prefetch thread before the interpreter exits
    checkpointer.wait_until_finished()
    checkpointer.close()
    writer.close()

  origin = "random init" if config.from_scratch else "pretrained"
  common.write_pictures(workdir, images=evaluated["images"], labels=evaluated["labels"],
                        logits=evaluated["outputs"], class_names=info.class_names,
                        title=f"fine-tuned ({origin}) on {config.dataset}")
  common.save_classifier_export(
      workdir, model_config=model_config, params=params, batch_stats=batch_stats,
      metadata=common.classifier_metadata(config, info, config.projection_layer,
                                          "simclr_jax.evaluate.finetune"))
  train.write_results(workdir, results)
  logging.info("fine-tuning results: %s", results)
  return results
