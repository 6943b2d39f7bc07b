"""SimCLR pretraining: two views per image, NT-Xent over every device's embeddings, LARS.

The update step is `jax.jit(jax.shard_map(...))` over the mesh axis 'data'. Each device augments
its own shard (two views per image, keys from the step and the image's global index, so views do
not depend on the device count), runs ONE forward pass over both views (global batch norm through
`axis_name`), scores NT-Xent against every device's embeddings, and takes a LARS step. The
gradient of the replicated parameters comes out of shard_map's autodiff already summed over
devices and equal to the one-device gradient, so it is not reduced again. An online linear probe
learns on stop_gradient(h) beside it. At the end the encoder is exported for probing.
"""
import functools
import json
import os
from typing import Any, Callable, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from simclr_jax import augment
from simclr_jax import checkpointing
from simclr_jax import config_checks
from simclr_jax import export
from simclr_jax import features
from simclr_jax import input_pipeline
from simclr_jax import loop
from simclr_jax import losses
from simclr_jax import models
from simclr_jax import native
from simclr_jax import optim
from simclr_jax import sharding
from simclr_jax import workdir_files
from simclr_jax.evaluators import from_config
from simclr_jax.visualize import augmentations
from simclr_jax.visualize import curves

DATA_AXIS = sharding.DATA_AXIS
# What an encoder export keeps of the model: the probe's head is specific to the pretraining data.
EXPORTED_PARTS = ("encoder", "projection_head")
# The augmentation preview: rows of images, views per image.
PREVIEW_IMAGES, PREVIEW_VIEWS = 8, 6


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int,
                    info: input_pipeline.DatasetInfo) -> None:
  """Fails before anything compiles, naming the field, its value and what is allowed."""
  config_checks.check_mode(config, "pretrain")
  config_checks.check_splits(config, info)
  config_checks.check_model_and_compute(config)
  config_checks.check_augmentations(config, host_crop_views=(0, 2))
  config_checks.check_batch(config, num_devices)
  config_checks.check_training(config)
  config_checks.require(config.temperature > 0,
                        f"temperature={config.temperature} must be positive")
  config_checks.require(config.optimizer.probe_learning_rate >= 0,
                        f"optimizer.probe_learning_rate={config.optimizer.probe_learning_rate} "
                        "must be >= 0")
  config_checks.check_evals(config)


def create_model(config: ml_collections.ConfigDict, num_classes: int, *,
                 axis_name: str | None = DATA_AXIS, platform: str | None = None
                 ) -> models.SimCLRModel:
  """The model of `config` with its compute dtype and its backends resolved for `platform`
  (default: this run's)."""
  return models.create_model(
      config.model, num_classes=num_classes, axis_name=axis_name,
      dtype=models.COMPUTE_DTYPES[config.dtype],
      conv_backend=native.resolve_backend("conv_backend", config.conv_backend, platform),
      norm_backend=native.resolve_backend("norm_backend", config.norm_backend, platform))


def create_optimizer(config: ml_collections.ConfigDict, num_examples: int, *,
                     total_steps: int | None = None
                     ) -> tuple[optax.GradientTransformation, optax.Schedule, int]:
  """(optimizer, its schedule, total steps): `config.optimizer` for the model, momentum SGD at
  `probe_learning_rate` (same warmup and cosine) for the online probe; `total_steps` replaces
  the config's length (a schedule fitted to the time budget)."""
  model_optimizer, schedule, total_steps = optim.optimizer_from_config(
      config, num_examples, total_steps=total_steps)
  _, warmup_steps = optim.training_steps(config, num_examples, total_steps=total_steps)
  probe_schedule = optim.learning_rate_schedule(
      config.optimizer.probe_learning_rate, lr_scaling="none",
      global_batch_size=config.global_batch_size, total_steps=total_steps,
      warmup_steps=warmup_steps)
  probe_optimizer = optim.create_optimizer("sgd", probe_schedule, weight_decay=0.0,
                                           momentum=config.optimizer.momentum)
  return optim.with_probe_optimizer(model_optimizer, probe_optimizer), schedule, total_steps


def create_train_state(model: models.SimCLRModel, optimizer: optax.GradientTransformation, *,
                       seed: int, image_size: int, mesh: jax.sharding.Mesh) -> loop.TrainState:
  """Initial state, replicated on `mesh`; the same on any device count for the same seed.

  Parameters are drawn with the 'rbg' PRNG (XLA's RngBitGenerator): a ResNet's ~60 threefry
  initializers take ~20 s of CPU compile time, rbg a third of that. The augmentation base key
  stays threefry, whose per-image streams are the same under any vmap or device split.
  """
  def init(seed):
    variables = model.init(jax.random.key(seed, impl="rbg"),
                           jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)
    return loop.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                           batch_stats=variables["batch_stats"],
                           opt_state=optimizer.init(variables["params"]),
                           rng=jax.random.PRNGKey(seed))
  return jax.jit(init, out_shardings=sharding.replicated(mesh))(np.uint32(seed))


def make_loss_fn(model: models.SimCLRModel, *, temperature: float, axis_name: str | None
                 ) -> Callable:
  """(params, batch_stats, views [2n,...], labels [n]) -> (total loss, (metrics, batch_stats)).

  `views` holds the first views of the n images, then their second views. The total is NT-Xent
  at the official scale (`losses.nt_xent`'s `loss`, logged as `loss`; the paper's per-anchor mean
  is logged as `contrastive_loss_per_anchor`) plus the online probe's cross-entropy; the probe
  sees stop_gradient(h) (inside the model), so its loss trains only the linear head.
  """
  def loss_fn(params, batch_stats, views, labels):
    outputs, updated = model.apply({"params": params, "batch_stats": batch_stats}, views,
                                   train=True, mutable=["batch_stats"])
    z1, z2 = jnp.split(outputs["z"], 2)
    contrastive_loss, contrastive = losses.nt_xent(z1, z2, temperature=temperature,
                                                   axis_name=axis_name)
    probe = losses.classification_metrics(outputs["probe_logits"],
                                          jnp.concatenate([labels, labels]), axis_name=axis_name)
    metrics = dict(contrastive, loss=contrastive_loss, probe_loss=probe["loss"],
                   probe_top1=probe["top1"])
    return contrastive_loss + probe["loss"], (metrics, updated["batch_stats"])
  return loss_fn


def make_train_step(model: models.SimCLRModel, optimizer: optax.GradientTransformation,
                    augment_view: Callable, *, temperature: float,
                    learning_rate_fn: optax.Schedule, mesh: jax.sharding.Mesh
                    ) -> Callable[[loop.TrainState, Mapping[str, jax.Array]], tuple]:
  """jit(shard_map(step)): (state, global batch) -> (state, metrics); the state is donated.

  `model` must have `axis_name=DATA_AXIS`. Metrics are replicated float32 scalars.
  """
  loss_fn = make_loss_fn(model, temperature=temperature, axis_name=DATA_AXIS)
  loss_of_replicated = lambda params, *args: loss_fn(sharding.vary_over_data(params), *args)

  def step_on_shard(state: loop.TrainState, images, indices, labels):
    views = augment.augment_batch(augment_view, images, indices, state.rng, state.step,
                                  num_views=2)
    grads, (metrics, batch_stats) = jax.grad(loss_of_replicated, has_aux=True)(
        state.params, state.batch_stats, views, labels)
    new_state = state.apply_gradients(optimizer, grads, batch_stats)
    metrics.update(learning_rate=learning_rate_fn(state.step), grad_norm=optax.global_norm(grads),
                   param_norm=optax.global_norm(new_state.params))
    return new_state, {name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()}

  return sharding.shard_step(step_on_shard, mesh)


def make_evaluators(config: ml_collections.ConfigDict, model: models.SimCLRModel, *,
                    num_classes: int, mesh: jax.sharding.Mesh) -> list:
  """The enabled `config.evals` blocks (k-NN, L-BFGS, MLP), sharing one extraction of h per state
  and batch-norm mode."""
  eval_model = model.clone(axis_name=None)  # under jit the batch is one global array
  apply_h = functools.partial(eval_model.apply,
                              method=lambda module, images, **kwargs: module(images, **kwargs)["h"])

  def representations(batch_norm: str) -> features.SplitFeatures:
    return features.SplitFeatures(
        features.representation_function(apply_h, batch_norm, mesh),
        variables_of=lambda state: {"params": state.params, "batch_stats": state.batch_stats},
        make_batches=lambda split: input_pipeline.create_eval_iterator(
            config.dataset, data_dir=config.data_dir or None, split=split,
            global_batch_size=config.global_batch_size, image_size=config.image_size, mesh=mesh),
        description=f"h ({batch_norm.replace('_', ' ')})")
  return from_config.create_representation_evaluators(
      config.evals, representations, train_split=config.train_split,
      eval_split=config.eval_split, num_classes=num_classes, seed=config.seed)


def save_export(directory: str, config: Mapping[str, Any], params: Mapping[str, Any],
                batch_stats: Mapping[str, Any], step: int) -> str:
  """Encoder + projection head (params and BN statistics) of a pretraining run, for probing."""
  return export.save_encoder(
      directory, model_config=dict(config["model"]),
      params={part: params[part] for part in EXPORTED_PARTS},
      batch_stats={part: batch_stats[part] for part in EXPORTED_PARTS},
      metadata={"dataset": config["dataset"], "image_size": config["image_size"], "step": step,
                "source": "simclr_jax.jobs.pretrain"})


def export_state(workdir: str, config: ml_collections.ConfigDict, state: loop.TrainState) -> str:
  """The state's encoder into workdir/export (kept if this run already wrote it)."""
  directory = os.path.join(workdir, workdir_files.EXPORT_DIR)
  if os.path.isdir(os.path.join(directory, export.VARIABLES_DIR)):
    return directory
  params, batch_stats, step = sharding.to_host((state.params, state.batch_stats, state.step))
  return save_export(directory, config.to_dict(), params, batch_stats, int(step))


def write_augmentation_preview(workdir: str, config: ml_collections.ConfigDict,
                               class_names) -> str:
  """The first training images beside views of `config.augment` (the ones training draws, made
  by the JAX ops) as workdir/augmentations.png."""
  batch = next(iter(input_pipeline.create_eval_iterator(
      config.dataset, data_dir=config.data_dir or None, split=config.train_split,
      global_batch_size=PREVIEW_IMAGES, image_size=config.image_size,
      mesh=sharding.create_mesh(jax.local_devices()[:1]))))
  images, labels = sharding.to_host((batch["image"], batch["label"]))
  views = augmentations.augmented_views(images, config.augment, image_size=config.image_size,
                                        num_views=PREVIEW_VIEWS, seed=config.seed)
  return augmentations.plot_augmentation_grid(
      images, views, os.path.join(workdir, workdir_files.AUGMENTATIONS_FILE),
      row_labels=[class_names[label] for label in labels],
      title=f"{config.dataset}: training views ({config.image_size} px)")


def export_initialization(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The encoder `config`'s pretraining starts from (its seed's random init) into workdir/export:
  the random-init baseline of linear probes (BN statistics at their initial 0 / 1)."""
  workdir = os.path.abspath(workdir)
  info = config_checks.dataset_info(config)
  state = create_train_state(create_model(config, info.num_classes), optax.identity(),
                             seed=config.seed, image_size=config.image_size,
                             mesh=sharding.create_mesh(jax.local_devices()[:1]))
  return export_state(workdir, config, state)


def export_checkpoint(workdir: str, *, step: int | None = None,
                      directory: str | None = None) -> str:
  """Exports a checkpoint of a pretraining run (default: its newest), e.g. to probe mid-run.

  Reads the run's config.json; writes `directory` (default workdir/export-<step>). Works on any
  machine: the checkpoint is read as host arrays, whatever devices wrote it.
  """
  workdir = os.path.abspath(workdir)
  config_path = os.path.join(workdir, workdir_files.CONFIG_FILE)
  checkpoints = os.path.join(workdir, workdir_files.CHECKPOINT_DIR)
  if not os.path.isfile(config_path) or not os.path.isdir(checkpoints):
    raise FileNotFoundError(f"{workdir} is not a pretraining workdir: expected "
                            f"{workdir_files.CONFIG_FILE} and {workdir_files.CHECKPOINT_DIR}/")
  steps = sorted(int(name) for name in os.listdir(checkpoints) if name.isdigit())
  if step is None and not steps:
    raise FileNotFoundError(f"{checkpoints} holds no checkpoint yet")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise FileNotFoundError(f"{checkpoints} has no checkpoint at step {step}; it has {steps}")
  with open(config_path) as f:
    config = json.load(f)
  state = checkpointing.read_state_as_numpy(checkpoints, step)
  return save_export(directory or os.path.join(workdir, f"{workdir_files.EXPORT_DIR}-{step}"),
                     config, state["params"], state["batch_stats"], step)


def run(config: ml_collections.ConfigDict, workdir: str, *,
        mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
  """Runs (or resumes) SimCLR pretraining in `workdir`; returns the results dict.

  `mesh` defaults to every device of every process along 'data'.
  """
  workdir = os.path.abspath(workdir)
  mesh = mesh if mesh is not None else sharding.create_mesh()
  info = config_checks.dataset_info(config)
  validate_config(config, num_devices=mesh.devices.size, info=info)
  finished = workdir_files.finished_results(workdir, config, continuable=True)
  if finished is not None:
    return finished
  num_examples = info.split_sizes[config.train_split]
  model = create_model(config, info.num_classes)
  optimizer, _, total_steps = create_optimizer(config, num_examples)
  augment_view = augment.build_augmentation(config.augment, config.image_size,
                                            crop_on_device=config.host_crop_views == 0,
                                            backend=config.augment_backend)

  def train_step_for(total_steps: int) -> loop.StepFn:
    """The step of a schedule `total_steps` long (the optimizer state has the same structure)."""
    optimizer, schedule, _ = create_optimizer(config, num_examples, total_steps=total_steps)
    return make_train_step(model, optimizer, augment_view, temperature=config.temperature,
                           learning_rate_fn=schedule, mesh=mesh)

  logging.info("pretraining ResNet-%d (width %g) on %s with %d device(s) in %d process(es): %s "
               "convolutions, %s batch norm", config.model.depth, config.model.width_multiplier,
               config.dataset, mesh.devices.size, jax.process_count(), model.conv_backend,
               model.norm_backend)
  def finish(state: loop.TrainState, summary: dict[str, Any]) -> dict[str, Any]:
    export_state(workdir, config, state)
    if jax.process_index() == 0:
      curves.plot_training_curves(os.path.join(workdir, workdir_files.METRICS_FILE),
                                  os.path.join(workdir, workdir_files.LOSS_CURVE_FILE),
                                  title=f"SimCLR {config.dataset}")
      write_augmentation_preview(workdir, config, info.class_names)
    return {"mode": "pretrain", "dataset": config.dataset, **summary,
            "pairs_per_sec": summary["examples_per_sec"],
            "global_batch_size": config.global_batch_size,
            "num_devices": int(mesh.devices.size), "num_processes": jax.process_count(),
            "conv_backend": model.conv_backend, "norm_backend": model.norm_backend}

  return loop.run(
      config, workdir, total_steps=total_steps, num_examples=num_examples, finish=finish,
      initialize=lambda: create_train_state(model, optimizer, seed=config.seed,
                                            image_size=config.image_size, mesh=mesh),
      train_step_for=train_step_for,
      make_batches=lambda start_step: input_pipeline.train_iterator_from_config(
          config, mesh=mesh, start_step=start_step),
      evaluators=make_evaluators(config, model, num_classes=info.num_classes, mesh=mesh))
