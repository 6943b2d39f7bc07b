"""Linear evaluation of a frozen encoder export, by either of the two protocols of the paper.

- `probe_protocol='sgd'` (the paper's ImageNet/CIFAR linear evaluation): a linear head trained with
  SGD + Nesterov momentum, LR 0.1 * B / 256 with cosine decay, on crop + flip views made on the
  fly, through the training loop (checkpoints, SIGTERM, budget). The encoder runs inside the
  jitted step in inference mode (running BN statistics; its variables are applied with
  `mutable=False`, so a BN layer in training mode would fail rather than update) under
  `stop_gradient`, and only the head's parameters are differentiated.
- `probe_protocol='lbfgs'` (the paper's transfer-learning linear evaluation): the L-BFGS evaluator
  (`evaluators.linear`) on the features of the eval crop.

Both finish by checking that every encoder parameter and BN statistic is bit-for-bit what the
export holds, report top-1/top-5/mean per-class accuracy on the eval split and the enabled
`config.evals` (k-NN, L-BFGS, MLP; on the same features unless a block's `batch_norm` asks for
batch statistics), draw predictions.png and confusion_matrix.png, and export the encoder with its
linear head to workdir/export.
"""
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from simclr_jax import augment
from simclr_jax import config_checks
from simclr_jax import export
from simclr_jax import input_pipeline
from simclr_jax import loop
from simclr_jax import losses
from simclr_jax import models
from simclr_jax import optim
from simclr_jax import sharding
from simclr_jax import workdir_files
from simclr_jax.evaluators import classification
from simclr_jax.evaluators import from_config
from simclr_jax.evaluators import linear
from simclr_jax.jobs import supervised

PROBE_PROTOCOLS = ("sgd", "lbfgs")


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int) -> None:
  supervised.validate_config(config, mode="linear_probe", num_devices=num_devices)
  config_checks.require(config.probe_protocol in PROBE_PROTOCOLS,
                        f"probe_protocol={config.probe_protocol!r}; allowed: "
                        f"{', '.join(PROBE_PROTOCOLS)} ('sgd': the paper's augmented SGD probe, "
                        "'lbfgs': the transfer protocol)")
  config_checks.require(bool(config.init_from),
                        "init_from is empty: a linear probe needs an encoder export (a "
                        "pretraining workdir's export/ directory)")
  if config.probe_protocol == "sgd":
    config_checks.check_augmentations(config, host_crop_views=(0, 1))
    config_checks.check_training(config)
  else:
    config_checks.check_lbfgs("lbfgs", config.lbfgs)


def make_probe_step(classifier: models.Classifier, optimizer: optax.GradientTransformation,
                    augment_view, learning_rate_fn: optax.Schedule, mesh: jax.sharding.Mesh):
  """jit: (state, frozen encoder variables, batch) -> (state, metrics); only the head learns.

  A plain jit over batch-sharded inputs: the frozen encoder has no cross-example computation
  (inference-mode BN), so no collective is needed and the result does not depend on the mesh.
  The views are made per shard (each device augments its own images: the native kernels are
  custom calls that XLA cannot partition).
  """
  batch_spec, replicated_spec = jax.P(sharding.DATA_AXIS), jax.P()
  augment_shard = jax.shard_map(
      functools.partial(augment.augment_batch, augment_view, num_views=1), mesh=mesh,
      in_specs=(batch_spec, batch_spec, replicated_spec, replicated_spec), out_specs=batch_spec)
  head = models.LinearHead(classifier.num_classes)

  def step(state: loop.TrainState, frozen: Mapping[str, Any], batch):
    images = augment_shard(batch["image"], batch["index"], state.rng, state.step)
    representation = jax.lax.stop_gradient(
        classifier.apply(frozen, images, train=False, method=models.Classifier.represent))

    def loss_fn(head_params):
      logits = head.apply({"params": head_params}, representation)
      metrics = losses.classification_metrics(logits, batch["label"])
      return metrics["loss"], metrics

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(optimizer, grads)
    metrics = dict(loss=metrics["loss"], train_top1=metrics["top1"],
                   learning_rate=learning_rate_fn(state.step), grad_norm=optax.global_norm(grads),
                   param_norm=optax.global_norm(new_state.params))
    return new_state, {name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()}

  replicated = sharding.replicated(mesh)
  return jax.jit(step, donate_argnums=0, out_shardings=(replicated, replicated))


def _head_logits(head_params: Mapping[str, Any], test: Mapping[str, np.ndarray]) -> dict:
  dense = sharding.to_host(head_params)["dense"]
  return dict(test, outputs=test["outputs"] @ np.asarray(dense["kernel"]) + np.asarray(
      dense["bias"]))


def run(config: ml_collections.ConfigDict, workdir: str, *,
        mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
  """Probes the export `config.init_from` on `config.dataset`; returns the results dict.

  `mesh` defaults to every device of every process along 'data'; the accuracy does not depend
  on it. Rerunning a finished workdir returns its results; an interrupted SGD probe resumes.
  """
  begin = supervised.start(config, workdir, mesh, validate=validate_config)
  if begin.finished is not None:
    return begin.finished
  workdir, mesh, info, sizes = begin.workdir, begin.mesh, begin.info, begin.split_sizes
  encoder_export, frozen_host = export.load_encoder_variables(
      config.init_from, config.model, projection_layer=config.projection_layer,
      image_size=config.image_size)
  classifier = supervised.create_classifier(config, info.num_classes, axis_name=None)
  frozen = jax.device_put(frozen_host, sharding.replicated(mesh))
  representations = supervised.representations(classifier, frozen, config, mesh)
  test = representations(None, config.eval_split, keep_images=classification.GRID_IMAGES)
  splits = dict(train_split=config.train_split, eval_split=config.eval_split,
                num_classes=info.num_classes)
  # Blocks on running averages share the probe's own features.
  evaluators = from_config.create_representation_evaluators(
      config.evals, lambda batch_norm: (
          representations if batch_norm == "running_average" else
          supervised.representations(classifier, frozen, config, mesh, batch_norm)),
      seed=config.seed, **splits)

  def finish(head_params: Mapping[str, Any], report: Mapping[str, Any]) -> dict[str, Any]:
    supervised.assert_unchanged(frozen_host, frozen, "encoder variables")
    return supervised.finish(
        workdir, config, info=info, test=_head_logits(head_params, test),
        title=f"linear probe ({config.probe_protocol}) on {config.dataset}",
        model_config=encoder_export.model_config,
        params=dict(encoder_export.params, **{models.SUPERVISED_HEAD: head_params}),
        batch_stats={name: value for name, value in encoder_export.batch_stats.items()
                     if name != models.SUPERVISED_HEAD},
        source=f"simclr_jax.jobs.linear_probe:{config.probe_protocol}",
        num_devices=mesh.devices.size,
        report=dict(report, probe_protocol=config.probe_protocol))

  if config.probe_protocol == "lbfgs":
    workdir_files.write_config(workdir, config)
    probe = linear.LinearEvaluator(config.lbfgs, representations, seed=config.seed, **splits)
    report = dict(probe.run(None))
    for evaluator in evaluators:
      report.update(evaluator.run(None))
    report.update(num_train_examples=sizes[config.train_split],
                  lbfgs_iterations=probe.last_probe.iterations)
    results = finish({"dense": {"kernel": probe.last_probe.kernel,
                                "bias": probe.last_probe.bias}}, report)
    writer = workdir_files.create_metric_writer(workdir)
    workdir_files.write_final_scalars(writer, 0, results)
    writer.close()
    workdir_files.write_results(workdir, results)
    return results

  num_examples = sizes[config.train_split]
  optimizer, _, total_steps = optim.optimizer_from_config(config, num_examples)
  feature_dim = test["outputs"].shape[1]

  def initialize() -> loop.TrainState:
    def init(seed_key):
      init_key, augment_key = jax.random.split(seed_key)
      params = models.LinearHead(info.num_classes).init(
          init_key, jnp.zeros((1, feature_dim), jnp.float32))["params"]
      if config.zero_init_head:
        params = jax.tree.map(jnp.zeros_like, params)
      return loop.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                             opt_state=optimizer.init(params), rng=augment_key)
    return jax.jit(init, out_shardings=sharding.replicated(mesh))(
        jax.random.PRNGKey(config.seed))

  augment_view = augment.build_augmentation(config.augment, config.image_size,
                                            crop_on_device=config.host_crop_views == 0,
                                            backend=config.augment_backend)

  def train_step_for(total_steps: int) -> loop.StepFn:
    optimizer, schedule, _ = optim.optimizer_from_config(config, num_examples,
                                                         total_steps=total_steps)
    probe_step = make_probe_step(classifier, optimizer, augment_view, schedule, mesh)
    return lambda state, batch: probe_step(state, frozen, batch)

  test_accuracy = classification.ClassificationEvaluator(
      lambda state: _head_logits(state.params, test), every_steps=config.eval_every_steps,
      num_classes=info.num_classes)
  return loop.run(
      config, workdir, initialize=initialize,
      train_step_for=train_step_for,
      make_batches=lambda start_step: input_pipeline.train_iterator_from_config(
          config, mesh=mesh, start_step=start_step),
      total_steps=total_steps, num_examples=num_examples,
      finish=lambda state, summary: finish(sharding.to_host(state.params),
                                           dict(summary, num_train_examples=num_examples)),
      evaluators=[test_accuracy, *evaluators], identity={"init_from": config.init_from})
