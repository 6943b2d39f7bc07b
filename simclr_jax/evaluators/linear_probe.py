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
import functools
import os
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from simclr_jax import augment
from simclr_jax import features
from simclr_jax import input_pipeline
from simclr_jax import losses
from simclr_jax import models
from simclr_jax import sharding
from simclr_jax import train
from simclr_jax.evaluators import common
from simclr_jax.evaluators import logistic_regression
from simclr_jax.evaluators import training

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
    common.validate_training(config)
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
  The views are made per shard (each device augments its own images: the native kernels are
  custom calls that XLA cannot partition).
  """
  batch_spec, replicated_spec = jax.P(sharding.DATA_AXIS), jax.P()
  augment_shard = jax.shard_map(
      functools.partial(common.augment_images, augment_view), mesh=mesh,
      in_specs=(batch_spec, batch_spec, replicated_spec, replicated_spec), out_specs=batch_spec)

  def step(state: train.TrainState, frozen: Mapping[str, Any], batch):
    images = augment_shard(batch["image"], batch["index"], state.rng, state.step)
    representation = jax.lax.stop_gradient(
        classifier.apply(frozen, images, train=False, method=features.Classifier.represent))

    def loss_fn(head_params):
      logits = head.apply({"params": head_params}, representation)
      metrics = losses.classification_metrics(logits, batch["label"])
      return metrics["loss"], metrics

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
    metrics = dict(loss=metrics["loss"], train_top1=metrics["top1"],
                   learning_rate=learning_rate_fn(state.step))
    return state.apply_gradients(optimizer, grads), metrics

  replicated = sharding.replicated(mesh)
  return jax.jit(step, donate_argnums=0, out_shardings=(replicated, replicated))


def train_sgd_probe(config: ml_collections.ConfigDict, workdir: str,
                    classifier: features.Classifier, frozen: Mapping[str, Any], *,
                    info: input_pipeline.DatasetInfo, num_examples: int, feature_dim: int,
                    test: Mapping[str, Any], mesh: jax.sharding.Mesh, writer
                    ) -> tuple[dict, dict]:
  """The paper's probe; returns (head params {'dense': ...} on host, results to report)."""
  optimizer, schedule, total_steps = training.create_optimizer(config, num_examples)
  head = models.LinearHead(info.num_classes)

  def init(seed_key):
    init_key, augment_key = jax.random.split(seed_key)
    params = head.init(init_key, jnp.zeros((1, feature_dim), jnp.float32))["params"]
    if config.zero_init_head:
      params = jax.tree.map(jnp.zeros_like, params)
    return train.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                            opt_state=optimizer.init(params), rng=augment_key)

  state = jax.jit(init, out_shardings=sharding.replicated(mesh))(jax.random.PRNGKey(config.seed))
  augment_view = augment.build_augmentation(config.augment, config.image_size,
                                            crop_on_device=config.host_crop_views == 0,
                                            backend=config.augment_backend)
  probe_step = make_probe_step(classifier, head, optimizer, augment_view, schedule, mesh)

  def test_top1(state: train.TrainState) -> float:
    dense = sharding.to_host(state.params)["dense"]
    logits = test["outputs"] @ dense["kernel"] + dense["bias"]
    return float(np.mean(logits.argmax(axis=1) == test["labels"]))

  state, report = training.train_loop(
      config, workdir, state=state, step_fn=lambda state, batch: probe_step(state, frozen, batch),
      total_steps=total_steps, num_examples=num_examples, mesh=mesh, writer=writer,
      evaluate=test_top1)
  return sharding.to_host(state.params), dict(report, num_train_examples=num_examples)


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
  finished = common.finished_results(workdir, config)
  if finished is not None:
    return finished
  encoder_export, frozen_host = features.load_encoder_variables(
      config.init_from, config.model, projection_layer=config.projection_layer,
      image_size=config.image_size)
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
    results = common.evaluation_results(config, logits=logits, labels=test["labels"],
                                        num_classes=info.num_classes,
                                        num_devices=mesh.devices.size)
    results["probe_protocol"] = config.probe_protocol
    if train_set is not None:
      results.update(common.knn_top1(config, train_set["outputs"], train_set["labels"],
                                     test["outputs"], test["labels"], info.num_classes))
    results.update(report)
    common.write_final_scalars(writer, report.get("step", 0), results)
  finally:
    writer.close()

  common.write_outputs(
      workdir, config, results=results, info=info, test=test, logits=logits,
      title=f"linear probe ({config.probe_protocol}) on {config.dataset}",
      model_config=encoder_export.model_config,
      params=dict(encoder_export.params, supervised_head=head_params),
      batch_stats={name: value for name, value in encoder_export.batch_stats.items()
                   if name != features.SUPERVISED_HEAD},
      source=f"simclr_jax.evaluate.linear_probe:{config.probe_protocol}")
  return results
