"""Linear evaluation of a frozen encoder export, by either of the two protocols of the paper.

- `probe_protocol='sgd'` (the paper's ImageNet/CIFAR linear evaluation): a linear head trained with
  SGD + Nesterov momentum, LR 0.1 * B / 256 with cosine decay, on crop + flip views made on the
  fly. The encoder runs inside the jitted step in inference mode (running BN statistics; its
  variables are applied with `mutable=False`, so a BN layer in training mode would fail rather
  than update) under `stop_gradient`, and only the head's parameters are differentiated.
- `probe_protocol='lbfgs'` (the paper's transfer-learning linear evaluation): features of the eval
  crop are extracted once, standardised, and an L2-regularised multinomial logistic regression is
  fit with L-BFGS, its strength chosen on a held-out part of train, then refit on all of train.

Both finish by checking that every encoder parameter and BN statistic is bit-for-bit what the
export holds, report top-1/top-5/mean per-class accuracy on the eval split and the weighted k-NN
top-1 of the same features, draw predictions.png and confusion_matrix.png, and export the encoder
with its linear head (the standardisation folded in) to workdir/export.
"""
import os
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
from simclr_jax.evaluators import logistic_regression

PROBE_PROTOCOLS = ("sgd", "lbfgs")


def validate_probe_config(config: ml_collections.ConfigDict, *, num_devices: int) -> None:
  common.validate_common(config, mode="linear_probe", num_devices=num_devices)
  common.require(config.knn_k >= 0, f"knn_k={config.knn_k} must be >= 0 (0 = no k-NN)")
  common.require(config.knn_temperature > 0,
                 f"knn_temperature={config.knn_temperature} must be > 0")
  common.require(config.probe_protocol in PROBE_PROTOCOLS,
                 f"probe_protocol={config.probe_protocol!r}; allowed: {', '.join(PROBE_PROTOCOLS)}"
                 " ('sgd': the paper's augmented SGD probe, 'lbfgs': the transfer protocol)")
  common.require(bool(config.init_from),
                 "init_from is empty: a linear probe needs an encoder export (a pretraining "
                 "workdir's export/ directory)")
  if config.probe_protocol == "sgd":
    augment.validate(config.augment)
    common.require(config.optimizer.name in optim.OPTIMIZERS,
                   f"optimizer.name={config.optimizer.name!r}; allowed: "
                   f"{', '.join(optim.OPTIMIZERS)}")
  else:
    lbfgs = config.lbfgs
    common.require(0 < lbfgs.validation_fraction < 1,
                   f"lbfgs.validation_fraction={lbfgs.validation_fraction} must be in (0, 1)")
    common.require(0 < lbfgs.l2_min <= lbfgs.l2_max and lbfgs.l2_num >= 1,
                   f"lbfgs L2 grid l2_min={lbfgs.l2_min}, l2_max={lbfgs.l2_max}, "
                   f"l2_num={lbfgs.l2_num} must satisfy 0 < l2_min <= l2_max, l2_num >= 1")
    common.require(lbfgs.max_iterations >= 1,
                   f"lbfgs.max_iterations={lbfgs.max_iterations} must be >= 1")


def make_probe_step(classifier: features.Classifier, head: models.LinearHead,
                    optimizer: optax.GradientTransformation, augment_view,
                    learning_rate_fn: optax.Schedule, mesh: jax.sharding.Mesh):
  """jit: (state, frozen encoder variables, batch) -> (state, metrics); only the head learns.

  A plain jit over batch-sharded inputs: the frozen encoder has no cross-example computation
  (inference-mode BN), so no collective is needed and the result does not depend on the mesh.
  """
  def step(state: train.TrainState, frozen: Mapping[str, Any], batch):
    images = common.augment_images(augment_view, common.training_images(batch),
                                   batch["index"], state.rng, state.step)
    representation = jax.lax.stop_gradient(
        classifier.apply(frozen, images, train=False, method=features.Classifier.represent))

    def loss_fn(head_params):
      logits = head.apply({"params": head_params}, representation)
      metrics = losses.classification_metrics(logits, batch["label"])
      return metrics["loss"], metrics

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    metrics = dict(loss=metrics["loss"], train_top1=metrics["top1"],
                   learning_rate=learning_rate_fn(state.step))
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state), metrics

  replicated = sharding.replicated(mesh)
  return jax.jit(step, donate_argnums=0, out_shardings=(replicated, replicated))


def _run_record(config: ml_collections.ConfigDict, step: int) -> dict:
  return {"step": step, "mode": "linear_probe", "seed": config.seed, "dataset": config.dataset,
          "init_from": config.init_from, "global_batch_size": config.global_batch_size}


def train_sgd_probe(config: ml_collections.ConfigDict, workdir: str,
                    classifier: features.Classifier, frozen: Mapping[str, Any], *,
                    info: input_pipeline.DatasetInfo, num_examples: int, feature_dim: int,
                    test: Mapping[str, Any], mesh: jax.sharding.Mesh, writer
                    ) -> tuple[dict, dict]:
  """The paper's probe; returns (head params {'dense': ...} on host, results to report)."""
  total_steps = common.total_steps(config, num_examples)
  warmup_steps = min(optim.steps_from_epochs(config.optimizer.warmup_epochs, num_examples,
                                             config.global_batch_size), total_steps - 1)
  schedule = optim.learning_rate_schedule(
      config.optimizer.base_learning_rate, lr_scaling=config.optimizer.lr_scaling,
      global_batch_size=config.global_batch_size, total_steps=total_steps,
      warmup_steps=warmup_steps)
  optimizer = optim.create_optimizer(
      config.optimizer.name, schedule, weight_decay=config.optimizer.weight_decay,
      momentum=config.optimizer.momentum, nesterov=config.optimizer.nesterov)
  head = models.LinearHead(info.num_classes)

  def init(seed_key):
    init_key, augment_key = jax.random.split(seed_key)
    params = head.init(init_key, jnp.zeros((1, feature_dim), jnp.float32))["params"]
    if config.zero_init_head:
      params = jax.tree.map(jnp.zeros_like, params)
    return train.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                            opt_state=optimizer.init(params), rng=augment_key)

  state = jax.jit(init, out_shardings=sharding.replicated(mesh))(jax.random.PRNGKey(config.seed))
  checkpointer = checkpointing.TrainCheckpointer(os.path.join(workdir, train.CHECKPOINT_DIR),
                                                 keep=config.keep_checkpoints)
  restored = checkpointer.restore_latest(state)
  if restored is not None:
    state, record = restored
    for key in ("mode", "seed", "dataset", "init_from", "global_batch_size"):
      if record.get(key) != _run_record(config, 0)[key]:
        checkpointer.close()
        raise ValueError(f"{workdir} holds a run with {key}={record.get(key)!r}, the config says "
                         f"{_run_record(config, 0)[key]!r}: use a new --workdir")
  start_step = int(sharding.to_host(state.step))
  logging.info("linear probe (sgd): %d steps of %d images, starting at step %d", total_steps,
               config.global_batch_size, start_step)

  augment_view = augment.build_augmentation(config.augment, config.image_size,
                                            crop_on_device=config.host_crop_views == 0)
  probe_step = make_probe_step(classifier, head, optimizer, augment_view, schedule, mesh)
  batches = input_pipeline.create_train_iterator(
      config.dataset, data_dir=train.data_dir(config), split=config.train_split,
      global_batch_size=config.global_batch_size, image_size=config.image_size,
      host_crop_views=config.host_crop_views, seed=config.seed, start_step=start_step, mesh=mesh)

  def test_top1(head_params) -> float:
    dense = sharding.to_host(head_params)["dense"]
    logits = test["outputs"] @ dense["kernel"] + dense["bias"]
    return float(np.mean(logits.argmax(axis=1) == test["labels"]))

  pending, last_metrics = [], {}
  try:
    for step in range(start_step + 1, total_steps + 1):
      state, metrics = probe_step(state, frozen, next(batches))
      pending.append(metrics)
      saving = step % config.checkpoint_every_steps == 0 or step == total_steps
      if saving or step % config.log_every_steps == 0:  # never save an unchecked state
        fetched = sharding.to_host(pending)
        pending.clear()
        last_metrics = {name: float(np.mean([m[name] for m in fetched])) for name in fetched[0]}
        if not np.isfinite(last_metrics["loss"]):
          raise FloatingPointError(f"probe loss is {last_metrics['loss']} at step {step}; lower "
                                   "optimizer.base_learning_rate")
        writer.write_scalars(step, last_metrics)
      if config.eval_every_steps and step % config.eval_every_steps == 0:
        writer.write_scalars(step, {"test_top1": test_top1(state.params)})
      if saving:
        checkpointer.save(step, state, _run_record(config, step))
  finally:
    batches.close()  # stop the prefetch thread before the interpreter exits
    checkpointer.wait_until_finished()
    checkpointer.close()
  report = {"num_train_steps": total_steps, "num_train_examples": num_examples}
  if last_metrics:
    report.update(train_loss=last_metrics["loss"], train_top1=last_metrics["train_top1"])
  return sharding.to_host(state.params), report


def fit_lbfgs_probe(config: ml_collections.ConfigDict, train_set: Mapping[str, np.ndarray],
                    num_classes: int) -> tuple[dict, dict]:
  """The transfer protocol; returns (head params {'dense': ...}, results to report)."""
  lbfgs = config.lbfgs
  probe = logistic_regression.fit_transfer_probe(
      train_set["outputs"], train_set["labels"], num_classes=num_classes,
      l2_grid=np.geomspace(lbfgs.l2_min, lbfgs.l2_max, lbfgs.l2_num),
      validation_fraction=lbfgs.validation_fraction, seed=config.seed,
      max_iterations=lbfgs.max_iterations, tolerance=lbfgs.tolerance)
  logging.info("L-BFGS probe: l2=%g chosen (held-out top-1 %.4f), refit in %d iterations",
               probe.l2, probe.validation_accuracy, probe.iterations)
  head_params = {"dense": {"kernel": probe.kernel, "bias": probe.bias}}
  return head_params, {"l2_regularization": probe.l2,
                       "validation_top1": probe.validation_accuracy,
                       "lbfgs_iterations": probe.iterations,
                       "num_train_examples": int(len(train_set["labels"]))}


def linear_probe(config: ml_collections.ConfigDict, workdir: str, *,
                 mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
  """Probes the export `config.init_from` on `config.dataset`; returns the results dict.

  `mesh` defaults to every device of every process along 'data'; the accuracy does not depend
  on it. Rerunning a finished workdir returns its results; an interrupted SGD probe resumes.
  """
  workdir = os.path.abspath(workdir)
  mesh = mesh if mesh is not None else sharding.create_mesh()
  validate_probe_config(config, num_devices=mesh.devices.size)
  info, split_sizes = common.dataset_info(config, mesh)
  encoder_export, frozen_host = features.load_encoder_variables(
      config.init_from, config.model, projection_layer=config.projection_layer,
      image_size=config.image_size)
  finished = common.finished_results(workdir, config)
  if finished is not None:
    return finished
  common.write_config(workdir, config)

  classifier = features.create_classifier(
      config.model, num_classes=info.num_classes, projection_layer=config.projection_layer,
      dtype=common.dtype(config))
  frozen = jax.device_put(frozen_host, sharding.replicated(mesh))
  feature_fn = features.make_feature_fn(classifier, mesh)

  def extract(split: str, keep_images: int = 0) -> dict[str, np.ndarray]:
    batches = input_pipeline.create_eval_iterator(
        config.dataset, data_dir=train.data_dir(config), split=split,
        global_batch_size=config.global_batch_size, image_size=config.image_size, mesh=mesh)
    return features.run_over_dataset(feature_fn, frozen, batches, keep_images=keep_images)

  test = extract(config.eval_split, keep_images=common.GRID_IMAGES)
  needs_train_features = config.probe_protocol == "lbfgs" or config.knn_k > 0
  train_set = extract(config.train_split) if needs_train_features else None
  writer = train.create_metric_writer(workdir)
  try:
    if config.probe_protocol == "sgd":
      head_params, report = train_sgd_probe(
          config, workdir, classifier, frozen, info=info,
          num_examples=split_sizes[config.train_split], feature_dim=test["outputs"].shape[1],
          test=test, mesh=mesh, writer=writer)
    else:
      head_params, report = fit_lbfgs_probe(config, train_set, info.num_classes)
    common.assert_unchanged(frozen_host, frozen, "encoder variables")

    dense = head_params["dense"]
    logits = test["outputs"] @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"])
    results = {"mode": "linear_probe", "dataset": config.dataset,
               "probe_protocol": config.probe_protocol,
               "representation": features.representation_name(config.projection_layer),
               "num_devices": int(mesh.devices.size)}
    results.update(common.classification_results(logits, test["labels"], info.num_classes))
    if train_set is not None:
      results.update(common.knn_top1(config, train_set["outputs"], train_set["labels"],
                                     test["outputs"], test["labels"], info.num_classes))
    results.update(report)
    writer.write_scalars(report.get("num_train_steps", 0), {
        f"final_{name}": value for name, value in results.items()
        if isinstance(value, float)})
  finally:
    writer.close()

  common.write_pictures(workdir, images=test["images"], labels=test["labels"], logits=logits,
                        class_names=info.class_names,
                        title=f"linear probe ({config.probe_protocol}) on {config.dataset}")
  common.save_classifier_export(
      workdir, model_config=encoder_export.model_config,
      params=dict(encoder_export.params, supervised_head=head_params),
      batch_stats={name: value for name, value in encoder_export.batch_stats.items()
                   if name != features.SUPERVISED_HEAD},
      metadata=common.classifier_metadata(config, info, config.projection_layer,
                                          f"simclr_jax.evaluate.linear_probe:"
                                          f"{config.probe_protocol}"))
  train.write_results(workdir, results)
  logging.info("linear probe results: %s", results)
  return results
