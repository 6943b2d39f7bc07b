"""SimCLR pretraining: the sharded update step, the online probe, and the loop around them.

The update step is `jax.jit(jax.shard_map(...))` over the mesh axis 'data'. Each device augments
its own shard (two views per image, keys from the step and the image's global index, so views do
not depend on the device count), runs ONE forward pass over both views (global batch norm through
`axis_name`), scores NT-Xent against every device's embeddings, and takes a LARS step. The
gradient of the replicated parameters comes out of shard_map's autodiff already summed over
devices and equal to the one-device gradient, so it is not reduced again.

The loop restores the newest checkpoint, trains, logs, monitors with k-NN, checkpoints, stops
cleanly on SIGTERM or a non-finite value, and at the end exports the encoder.
"""
import json
import os
import signal
import time
from typing import Any, Callable, Iterable, Mapping

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from simclr_jax import augment
from simclr_jax import checkpointing
from simclr_jax import export
from simclr_jax import input_pipeline
from simclr_jax import knn
from simclr_jax import losses
from simclr_jax import models
from simclr_jax import optim
from simclr_jax import sharding
from simclr_jax.visualize import curves

DATA_AXIS = sharding.DATA_AXIS
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Host crops come as exactly two views per image ([B, 2, S, S, 3]).
HOST_CROP_VIEW_CHOICES = (0, 2)
# Values checked for NaN/Inf before they are logged and before every checkpoint.
GUARDED_METRICS = ("loss", "probe_loss", "grad_norm", "param_norm")
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"
LOSS_CURVE_FILE = "loss_curve.png"
CHECKPOINT_DIR = "checkpoints"
EXPORT_DIR = "export"
# Exit status of a run stopped by SIGTERM (128 + SIGTERM), so schedulers see it did not finish.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the config: the input position is `step`."""
  step: jax.Array           # int32 updates done so far
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array            # uint32[2] base key of the augmentations

  def apply_gradients(self, optimizer: optax.GradientTransformation, grads: Any,
                      batch_stats: Any = None) -> "TrainState":
    """One optimizer update; `batch_stats` replaces the BN statistics when given."""
    updates, opt_state = optimizer.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state,
                        batch_stats=self.batch_stats if batch_stats is None else batch_stats)


class Preempted(Exception):
  """SIGTERM arrived; the state was checkpointed at `step` and the same command resumes it."""

  def __init__(self, step: int, workdir: str):
    super().__init__(f"stopped by SIGTERM after step {step}; checkpoint saved in "
                     f"{os.path.join(workdir, CHECKPOINT_DIR)}, rerun the same command to resume")
    self.step = step


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def data_dir(config: ml_collections.ConfigDict) -> str | None:
  return config.data_dir or None


def data_shards(config: ml_collections.ConfigDict) -> int:
  """Input streams of the global batch: `config.data_shards`, or one per process when 0."""
  return config.data_shards or jax.process_count()


def validate_pretrain_config(config: ml_collections.ConfigDict, *, num_devices: int,
                             dataset_info: input_pipeline.DatasetInfo) -> None:
  """Fails before anything compiles, naming the field, its value and what is allowed."""
  def require(condition: bool, message: str):
    if not condition:
      raise ValueError(f"invalid config: {message}")

  require(config.mode == "pretrain", f"mode={config.mode!r}; train.pretrain runs 'pretrain'")
  for split in (config.train_split, config.eval_split):
    require(split in dataset_info.split_sizes,
            f"split {split!r} is not in {config.dataset} (splits: "
            f"{', '.join(sorted(dataset_info.split_sizes))})")
  models.model_kwargs(config.model)
  augment.validate(config.augment)
  require(config.dtype in COMPUTE_DTYPES,
          f"dtype={config.dtype!r}; allowed: {', '.join(COMPUTE_DTYPES)}")
  models.resolve_conv_backend(config.conv_backend)
  models.resolve_norm_backend(config.norm_backend)
  augment.resolve_backend(config.augment_backend)
  require(config.image_size > 0, f"image_size={config.image_size} must be positive")
  require(config.host_crop_views in HOST_CROP_VIEW_CHOICES,
          f"host_crop_views={config.host_crop_views}; allowed: {HOST_CROP_VIEW_CHOICES}")
  require(config.data_shards == 0 or (config.data_shards > 0 and
                                      config.data_shards % jax.process_count() == 0 and
                                      config.global_batch_size % config.data_shards == 0),
          f"data_shards={config.data_shards} must be 0 (one per process) or a multiple of the "
          f"process count ({jax.process_count()}) that divides global_batch_size")
  require(config.temperature > 0, f"temperature={config.temperature} must be positive")
  require(config.num_train_steps > 0 or config.num_epochs > 0,
          f"num_epochs={config.num_epochs} or num_train_steps={config.num_train_steps} must be "
          "positive")
  require(config.global_batch_size > 0 and config.global_batch_size % num_devices == 0,
          f"global_batch_size={config.global_batch_size} must be a positive multiple of the "
          f"number of devices ({num_devices} = {jax.process_count()} process(es) x "
          f"{jax.local_device_count()} local device(s))")
  require(config.optimizer.name in optim.OPTIMIZERS,
          f"optimizer.name={config.optimizer.name!r}; allowed: {', '.join(optim.OPTIMIZERS)}")
  require(config.optimizer.lr_scaling in optim.LR_SCALINGS,
          f"optimizer.lr_scaling={config.optimizer.lr_scaling!r}; allowed: "
          f"{', '.join(optim.LR_SCALINGS)}")
  require(config.optimizer.base_learning_rate > 0,
          f"optimizer.base_learning_rate={config.optimizer.base_learning_rate} must be positive")
  require(config.optimizer.probe_learning_rate >= 0,
          f"optimizer.probe_learning_rate={config.optimizer.probe_learning_rate} must be >= 0")
  require(config.max_train_minutes >= 0,
          f"max_train_minutes={config.max_train_minutes} must be >= 0 (0 = no budget)")
  require(config.optimizer.warmup_epochs >= 0,
          f"optimizer.warmup_epochs={config.optimizer.warmup_epochs} must be >= 0")
  for name in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "knn_k"):
    require(config[name] >= 1, f"{name}={config[name]} must be >= 1")
  for name in ("knn_every_steps", "knn_train_examples", "knn_eval_examples"):
    require(config[name] >= 0, f"{name}={config[name]} must be >= 0 (0 = "
            f"{'never' if name == 'knn_every_steps' else 'all'})")
  require(config.knn_temperature > 0, f"knn_temperature={config.knn_temperature} must be > 0")
  if config.image_size <= 32 and not config.model.cifar_stem:
    logging.warning("image_size=%d without model.cifar_stem: the ImageNet stem downsamples a "
                    "32 px image 4x before the first block (SimCLR uses the CIFAR stem here)",
                    config.image_size)
  if config.image_size <= 32 and "blur" in config.augment.ops:
    logging.warning("Gaussian blur at image_size=%d: SimCLR drops blur for CIFAR-sized images, "
                    "where it erases most of the content", config.image_size)


def training_steps(config: ml_collections.ConfigDict, num_examples: int) -> tuple[int, int]:
  """(total_steps, warmup_steps); warmup is shortened to 10% when it would not fit."""
  batch = config.global_batch_size
  total = (config.num_train_steps if config.num_train_steps > 0 else
           optim.steps_from_epochs(config.num_epochs, num_examples, batch))
  warmup = optim.steps_from_epochs(config.optimizer.warmup_epochs, num_examples, batch)
  if warmup >= total:
    logging.warning("warmup of %d steps does not fit in %d training steps; warming up for %d",
                    warmup, total, total // 10)
    warmup = total // 10
  return total, warmup


# ---------------------------------------------------------------------------------------------
# State and update step
# ---------------------------------------------------------------------------------------------


def create_train_state(model: models.SimCLRModel, optimizer: optax.GradientTransformation, *,
                       seed: int, image_size: int, mesh: jax.sharding.Mesh) -> TrainState:
  """Initial state, replicated on `mesh`; the same on any device count for the same seed.

  Parameters are drawn with the 'rbg' PRNG (XLA's RngBitGenerator): a ResNet's ~60 threefry
  initializers take ~20 s of CPU compile time, rbg a third of that. The augmentation base key
  stays threefry, whose per-image streams are the same under any vmap or device split.
  """
  def init(seed):
    variables = model.init(jax.random.key(seed, impl="rbg"),
                           jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      batch_stats=variables["batch_stats"],
                      opt_state=optimizer.init(variables["params"]),
                      rng=jax.random.PRNGKey(seed))
  return jax.jit(init, out_shardings=sharding.replicated(mesh))(np.uint32(seed))


def make_loss_fn(model: models.SimCLRModel, *, temperature: float, axis_name: str | None
                 ) -> Callable:
  """(params, batch_stats, views [2n,...], labels [n]) -> (total loss, (metrics, batch_stats)).

  `views` holds the first views of the n images, then their second views. The total is NT-Xent
  plus the online probe's cross-entropy; the probe sees stop_gradient(h) (inside the model), so
  its loss trains only the linear head.
  """
  def loss_fn(params, batch_stats, views, labels):
    outputs, updated = model.apply({"params": params, "batch_stats": batch_stats}, views,
                                   train=True, mutable=["batch_stats"])
    z1, z2 = jnp.split(outputs["z"].astype(jnp.float32), 2)
    contrastive_loss, contrastive = losses.nt_xent(z1, z2, temperature=temperature,
                                                   axis_name=axis_name)
    probe = losses.classification_metrics(outputs["probe_logits"],
                                          jnp.concatenate([labels, labels]), axis_name=axis_name)
    metrics = dict(contrastive, loss=contrastive_loss, probe_loss=probe["loss"],
                   probe_top1=probe["top1"])
    return contrastive_loss + probe["loss"], (metrics, updated["batch_stats"])
  return loss_fn


def image_keys(base_key: jax.Array, step: jax.Array, indices: jax.Array) -> jax.Array:
  """fold_in(fold_in(base_key, step), global index) per image: a view depends on the image and
  the step, not on which device or process holds it."""
  step_key = jax.random.fold_in(base_key, step)
  return jax.vmap(lambda index: jax.random.fold_in(step_key, index))(indices)


def augment_views(augment_view: Callable, images: jax.Array, indices: jax.Array,
                  base_key: jax.Array, step: jax.Array) -> jax.Array:
  """[2n, S, S, 3] float views of n uint8 images: all first views, then all second views.

  Each image's key (`image_keys`) is split into one key per view. `augment_view(key, image,
  view=v)` is `augment.build_augmentation`'s function (`view` picks per-view probabilities).
  `images` is [n, H, W, 3] (the device crops) or [n, 2, S, S, 3] (host crops, one per view).
  """
  view_keys = jax.vmap(jax.random.split)(image_keys(base_key, step, indices))
  images = images.astype(jnp.float32) / 255.0
  first, second = (images[:, 0], images[:, 1]) if images.ndim == 5 else (images, images)
  return jnp.concatenate([
      jax.vmap(lambda key, image: augment_view(key, image, view=0))(view_keys[:, 0], first),
      jax.vmap(lambda key, image: augment_view(key, image, view=1))(view_keys[:, 1], second),
  ], axis=0)


def make_sharded_step(step_on_shard: Callable, mesh: jax.sharding.Mesh
                      ) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple]:
  """jit(shard_map(step_on_shard)): (state, global batch) -> (state, metrics); state donated.

  `step_on_shard(state, images, indices, labels)` sees one device's share of the batch and the
  replicated state, and returns the new state and replicated metrics. Its collectives use
  DATA_AXIS. No pmean of gradients is needed: for replicated parameters, shard_map's autodiff
  already sums their gradient over devices.
  """
  batch_spec, replicated_spec = jax.P(DATA_AXIS), jax.P()
  sharded = jax.shard_map(step_on_shard, mesh=mesh,
                          in_specs=(replicated_spec, batch_spec, batch_spec, batch_spec),
                          out_specs=(replicated_spec, replicated_spec))

  def step(state: TrainState, batch: Mapping[str, jax.Array]):
    return sharded(state, batch["image"], batch["index"], batch["label"])

  return jax.jit(step, donate_argnums=0)


def make_train_step(model: models.SimCLRModel, optimizer: optax.GradientTransformation,
                    augment_view: Callable, *, temperature: float,
                    learning_rate_fn: optax.Schedule, mesh: jax.sharding.Mesh
                    ) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple]:
  """The pretraining step (`make_sharded_step`): each device augments its shard, then learns.

  `model` must have `axis_name=DATA_AXIS`. Metrics are float32 scalars.
  """
  loss_fn = make_loss_fn(model, temperature=temperature, axis_name=DATA_AXIS)

  def step_on_shard(state: TrainState, images, indices, labels):
    views = augment_views(augment_view, images, indices, state.rng, state.step)
    grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, views, labels)
    new_state = state.apply_gradients(optimizer, grads, batch_stats)
    metrics.update(learning_rate=learning_rate_fn(state.step), grad_norm=optax.global_norm(grads),
                   param_norm=optax.global_norm(new_state.params))
    return new_state, {name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()}

  return make_sharded_step(step_on_shard, mesh)


# ---------------------------------------------------------------------------------------------
# k-NN monitor
# ---------------------------------------------------------------------------------------------


def make_feature_fn(model: models.SimCLRModel) -> Callable:
  """jit: (params, batch_stats, images) -> h, in inference mode (running BN statistics)."""
  @jax.jit
  def features(params, batch_stats, images):
    if images.dtype == jnp.uint8:
      images = images.astype(jnp.float32) / 255.0
    return model.apply({"params": params, "batch_stats": batch_stats}, images, train=False)["h"]
  return features


def collect_features(feature_fn: Callable, state: TrainState, batches: Iterable[Mapping],
                     limit: int) -> tuple[np.ndarray, np.ndarray]:
  """(h, labels) of the first `limit` examples (0 = all) of an eval pass, on every process."""
  features, labels, count = [], [], 0
  iterator = iter(batches)
  try:
    for batch in iterator:
      h = feature_fn(state.params, state.batch_stats, batch["image"])
      h, label, mask = sharding.to_host((h, batch["label"], batch["mask"]))
      features.append(h[mask])
      labels.append(label[mask])
      count += int(mask.sum())
      if limit and count >= limit:
        break
  finally:
    iterator.close()  # stops its prefetch thread when the pass ends early
  features, labels = np.concatenate(features), np.concatenate(labels)
  return (features[:limit], labels[:limit]) if limit else (features, labels)


def knn_monitor(config: ml_collections.ConfigDict, feature_fn: Callable, state: TrainState, *,
                num_classes: int, mesh: jax.sharding.Mesh) -> float:
  """Weighted k-NN top-1 (cosine, k, T) of h: train-split memory bank, held-out queries."""
  def features(split, limit):
    batches = input_pipeline.create_eval_iterator(
        config.dataset, data_dir=data_dir(config), split=split,
        global_batch_size=config.global_batch_size, image_size=config.image_size, mesh=mesh)
    return collect_features(feature_fn, state, batches, limit)

  train_features, train_labels = features(config.train_split, config.knn_train_examples)
  test_features, test_labels = features(config.eval_split, config.knn_eval_examples)
  return knn.knn_accuracy(train_features, train_labels, test_features, test_labels,
                          num_classes=num_classes, k=config.knn_k,
                          temperature=config.knn_temperature)


# ---------------------------------------------------------------------------------------------
# Metrics, stopping and the loop
# ---------------------------------------------------------------------------------------------


class JsonLinesWriter(metric_writers.MetricWriter):
  """Appends one JSON object per write_scalars call: {"step": s, "name": value, ...}.

  Only scalars have a JSON form here; images, histograms and the like go to TensorBoard, so
  this writer skips them.
  """

  def __init__(self, path: str):
    self._file = open(path, "a")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    record = {"step": int(step)}
    record.update({name: float(value) for name, value in scalars.items()})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()  # a line per log interval: cheap, and readable while the run goes on

  def write_summaries(self, step, values, metadata=None):
    self.write_scalars(step, {name: value for name, value in values.items()
                              if np.ndim(value) == 0})

  def write_images(self, step, images):
    del step, images

  def write_videos(self, step, videos):
    del step, videos

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate

  def write_texts(self, step, texts):
    del step, texts

  def write_histograms(self, step, arrays, num_buckets=None):
    del step, arrays, num_buckets

  def write_hparams(self, hparams):
    del hparams

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def create_metric_writer(workdir: str) -> metric_writers.MetricWriter:
  """Console + TensorBoard + workdir/metrics.jsonl on process 0; nothing on the others."""
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  return metric_writers.AsyncMultiWriter([
      metric_writers.LoggingWriter(), metric_writers.SummaryWriter(workdir),
      JsonLinesWriter(os.path.join(workdir, METRICS_FILE))])


class StopRequest:
  """Whether SIGTERM (preemption) asked the run to stop; all processes agree on the step.

  One process: a SIGTERM handler sets a flag. Several: JAX's preemption service (started by
  `jax.distributed.initialize`) catches SIGTERM and picks a step every process reaches.
  """

  def __init__(self):
    self._requested = False
    self._previous_handler = None

  def __enter__(self):
    if jax.process_count() == 1:
      try:
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
      except ValueError:  # Not the main thread: leave signals to whoever owns them.
        logging.warning("not in the main thread: SIGTERM will not checkpoint before exiting")
    return self

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: checkpointing after the current step, then stopping")
    self._requested = True

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested

  def __exit__(self, *exc_info):
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)


def progress_reporter(total_steps: int, writer: metric_writers.MetricWriter,
                      every_steps: int) -> Callable[[int], Any]:
  """step -> None, logging steps/s and the ETA every `every_steps` (process 0 only, like every
  other log)."""
  if jax.process_index() != 0:
    return lambda step: None
  return periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                         every_steps=every_steps)


class TimeBudget:
  """Wall-clock budget of one training invocation, counted from its creation (0 = none).

  Several processes must stop at the same step: there, process 0's clock decides, read at the
  log steps only (one small broadcast per log interval).
  """

  def __init__(self, minutes: float, *, check_every_steps: int):
    self._seconds = 60.0 * minutes
    self._check_every_steps = check_every_steps
    self._start = time.monotonic()

  def spent(self, step: int) -> bool:
    if self._seconds <= 0:
      return False
    if jax.process_count() == 1:
      return time.monotonic() - self._start >= self._seconds
    if step % self._check_every_steps:
      return False
    spent = np.bool_(time.monotonic() - self._start >= self._seconds)
    return bool(multihost_utils.broadcast_one_to_all(spent))


def check_finite(step_metrics: list[tuple[int, Mapping[str, float]]],
                 last_saved_step: int | None) -> None:
  """Raises FloatingPointError naming the first step and metric that is NaN or Inf."""
  for step, metrics in step_metrics:
    for name in GUARDED_METRICS:
      if not np.isfinite(metrics[name]):
        kept = (f"the last good checkpoint (step {last_saved_step}) is kept"
                if last_saved_step is not None else "no checkpoint was written")
        raise FloatingPointError(
            f"{name} is {metrics[name]} at step {step}; stopping without saving this state "
            f"({kept}). Lower optimizer.base_learning_rate, check the data, or try dtype=float32")


def write_results(workdir: str, results: Mapping[str, Any]) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, RESULTS_FILE), "w") as f:
      json.dump(dict(results), f, indent=2, sort_keys=True)


# What an encoder export keeps of the model: the probe's head is specific to the pretraining data.
EXPORTED_PARTS = ("encoder", "projection_head")


def _save_export(directory: str, config: Mapping[str, Any], params: Mapping[str, Any],
                 batch_stats: Mapping[str, Any], step: int) -> str:
  return export.save_encoder(
      directory, model_config=dict(config["model"]),
      params={part: params[part] for part in EXPORTED_PARTS},
      batch_stats={part: batch_stats[part] for part in EXPORTED_PARTS},
      metadata={"dataset": config["dataset"], "image_size": config["image_size"], "step": step,
                "source": "simclr_jax.train.pretrain"})


def export_encoder(workdir: str, config: ml_collections.ConfigDict, state: TrainState) -> str:
  """Encoder + projection head (params and BN statistics) into workdir/export, for probing."""
  directory = os.path.join(workdir, EXPORT_DIR)
  if os.path.isdir(os.path.join(directory, export.VARIABLES_DIR)):
    logging.info("%s already holds this run's export", directory)
    return directory
  params, batch_stats, step = sharding.to_host((state.params, state.batch_stats, state.step))
  return _save_export(directory, config.to_dict(), params, batch_stats, int(step))


def export_initialization(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The encoder `config`'s pretraining starts from (its seed's random init) into workdir/export.

  The random-init baseline of linear probes: the very network a run with this config and seed
  would train, before its first step (BN statistics at their initial 0 / 1).
  """
  workdir = os.path.abspath(workdir)
  info = input_pipeline.get_dataset_info(config.dataset, data_dir=data_dir(config))
  model = models.create_model(config.model, num_classes=info.num_classes)
  state = create_train_state(model, optax.identity(), seed=config.seed,
                             image_size=config.image_size,
                             mesh=sharding.create_mesh(jax.local_devices()[:1]))
  return export_encoder(workdir, config, state)


def export_checkpoint(workdir: str, *, step: int | None = None,
                      directory: str | None = None) -> str:
  """Exports a checkpoint of a pretraining run (default: its newest), e.g. to probe mid-run.

  Reads the run's config.json; writes `directory` (default workdir/export-<step>). Works on any
  machine: the checkpoint is read as host arrays, whatever devices wrote it.
  """
  workdir = os.path.abspath(workdir)
  config_path = os.path.join(workdir, CONFIG_FILE)
  checkpoints = os.path.join(workdir, CHECKPOINT_DIR)
  if not os.path.isfile(config_path) or not os.path.isdir(checkpoints):
    raise FileNotFoundError(f"{workdir} is not a pretraining workdir: expected {CONFIG_FILE} and "
                            f"{CHECKPOINT_DIR}/")
  steps = sorted(int(name) for name in os.listdir(checkpoints) if name.isdigit())
  if step is None and not steps:
    raise FileNotFoundError(f"{checkpoints} holds no checkpoint yet")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise FileNotFoundError(f"{checkpoints} has no checkpoint at step {step}; it has {steps}")
  with open(config_path) as f:
    config = json.load(f)
  state = checkpointing.read_state_as_numpy(checkpoints, step)
  return _save_export(directory or os.path.join(workdir, f"{EXPORT_DIR}-{step}"), config,
                      state["params"], state["batch_stats"], step)


def _run_record(config: ml_collections.ConfigDict, step: int, total_steps: int) -> dict:
  """What a checkpoint must agree with for an exact resume (the input order depends on it)."""
  return {"step": step, "total_steps": total_steps, "seed": config.seed,
          "dataset": config.dataset, "train_split": config.train_split,
          "global_batch_size": config.global_batch_size, "image_size": config.image_size,
          "data_shards": data_shards(config)}


def _check_resumable(record: Mapping[str, Any], config: ml_collections.ConfigDict,
                     total_steps: int, workdir: str) -> None:
  expected = _run_record(config, record["step"], total_steps)
  for key in ("seed", "dataset", "train_split", "global_batch_size", "image_size"):
    if record.get(key) != expected[key]:
      raise ValueError(
          f"{workdir} holds a run with {key}={record.get(key)!r} but the config says "
          f"{key}={expected[key]!r}; resuming would not continue the same run. Use a new "
          "--workdir or the original config")
  if record.get("data_shards") != expected["data_shards"]:
    logging.warning("the checkpoint was written with data_shards=%s, this run uses %d: training "
                    "continues, but on a different (equally valid) order of batches than an "
                    "uninterrupted run; fix config.data_shards to keep it",
                    record.get("data_shards"), expected["data_shards"])
  if record.get("total_steps") != total_steps:
    logging.warning("the checkpoint was written by a run of %s steps; continuing to %d steps "
                    "(the learning-rate schedule changes)", record.get("total_steps"), total_steps)


class TrainLog:
  """Per-step metrics between log points: fetched in one go, checked, averaged and written.

  Fetching only at log points keeps the host from waiting on every step. Throughput is timed
  from the end of the first (compiling) step, without the time spent in monitors.
  """

  def __init__(self, writer: metric_writers.MetricWriter, global_batch_size: int):
    self._writer = writer
    self._batch_size = global_batch_size
    self._pending: list[tuple[int, Any]] = []
    self._clock_start = self._interval_start = None
    self._first_step = self._interval_step = None
    self._excluded_seconds = 0.0
    self.summary: dict[str, float] = {}

  def add(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
    self._pending.append((step, metrics))
    if self._clock_start is None:
      jax.block_until_ready(metrics)
      self._clock_start = self._interval_start = time.monotonic()
      self._first_step = self._interval_step = step

  def flush(self, step: int, last_saved_step: int | None) -> None:
    """Raises FloatingPointError on NaN/Inf; otherwise writes the interval's means at `step`."""
    fetched = [(s, sharding.to_host(m)) for s, m in self._pending]
    self._pending.clear()
    check_finite(fetched, last_saved_step)
    self.summary = {name: float(np.mean([metrics[name] for _, metrics in fetched]))
                    for name in fetched[0][1]}
    now = time.monotonic()
    if step > self._interval_step:
      self.summary["examples_per_sec"] = ((step - self._interval_step) * self._batch_size /
                                          (now - self._interval_start))
    self._interval_start, self._interval_step = now, step
    self._writer.write_scalars(step, self.summary)

  def write_monitor(self, step: int, name: str, value: float, seconds: float) -> None:
    """A monitor's value; its `seconds` do not count as training time."""
    self.summary[name] = value
    self._writer.write_scalars(step, {name: value})
    self._excluded_seconds += seconds
    self._interval_start += seconds

  def throughput(self, last_step: int) -> tuple[float, float]:
    """(training seconds, examples/s) from the end of the first step to `last_step`."""
    if self._clock_start is None:
      return 0.0, 0.0
    seconds = time.monotonic() - self._clock_start - self._excluded_seconds
    steps = last_step - self._first_step
    return seconds, (steps * self._batch_size / seconds if steps and seconds > 0 else 0.0)


def _restore_or_initialize(checkpointer: checkpointing.TrainCheckpointer, record: dict | None,
                           initialize: Callable[[], TrainState], config: ml_collections.ConfigDict,
                           total_steps: int, workdir: str) -> TrainState:
  """The newest good checkpoint (whose `record` was checked already), or a fresh state."""
  state = initialize()
  restored = checkpointer.restore_latest(state)
  if restored is None:
    return state
  state, restored_record = restored
  if restored_record != record:  # fell back to an older checkpoint
    _check_resumable(restored_record, config, total_steps, workdir)
  return state


def pretrain(config: ml_collections.ConfigDict, workdir: str, *,
             mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
  """Runs (or resumes) SimCLR pretraining in `workdir`; returns the final metrics.

  `mesh` defaults to every device of every process along 'data'.
  """
  workdir = os.path.abspath(workdir)
  mesh = mesh if mesh is not None else sharding.create_mesh()
  info = input_pipeline.get_dataset_info(config.dataset, data_dir=data_dir(config))
  validate_pretrain_config(config, num_devices=mesh.devices.size, dataset_info=info)
  total_steps, warmup_steps = training_steps(config, info.split_sizes[config.train_split])
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))

  model = models.create_model(config.model, num_classes=info.num_classes, axis_name=DATA_AXIS,
                              dtype=COMPUTE_DTYPES[config.dtype],
                              conv_backend=models.resolve_conv_backend(config.conv_backend),
                              norm_backend=models.resolve_norm_backend(config.norm_backend))
  schedule = optim.learning_rate_schedule(
      config.optimizer.base_learning_rate, lr_scaling=config.optimizer.lr_scaling,
      global_batch_size=config.global_batch_size, total_steps=total_steps,
      warmup_steps=warmup_steps)
  probe_schedule = optim.learning_rate_schedule(
      config.optimizer.probe_learning_rate, lr_scaling="none",
      global_batch_size=config.global_batch_size,
      total_steps=total_steps, warmup_steps=warmup_steps)
  optimizer = optim.with_probe_optimizer(
      optim.create_optimizer(
          config.optimizer.name, schedule, weight_decay=config.optimizer.weight_decay,
          momentum=config.optimizer.momentum,
          trust_coefficient=config.optimizer.trust_coefficient),
      optim.create_optimizer("sgd", probe_schedule, weight_decay=0.0,
                             momentum=config.optimizer.momentum))
  augment_view = augment.build_augmentation(config.augment, config.image_size,
                                            crop_on_device=config.host_crop_views == 0,
                                            backend=config.augment_backend)
  checkpointer = checkpointing.TrainCheckpointer(os.path.join(workdir, CHECKPOINT_DIR),
                                                 keep=config.keep_checkpoints)
  try:
    record = checkpointer.latest_record()
    if record is not None:  # refuse another run's workdir before anything compiles
      _check_resumable(record, config, total_steps, workdir)
      results_path = os.path.join(workdir, RESULTS_FILE)
      if record["step"] >= total_steps and os.path.exists(results_path):
        logging.info("%s already finished %d steps; returning its results", workdir,
                     record["step"])
        with open(results_path) as f:
          return json.load(f)
    state = _restore_or_initialize(
        checkpointer, record, lambda: create_train_state(
            model, optimizer, seed=config.seed, image_size=config.image_size, mesh=mesh),
        config, total_steps, workdir)
    start_step = int(sharding.to_host(state.step))
    logging.info("pretraining %s on %s: %d steps (%d warmup) of %d images on %d device(s) in "
                 "%d process(es), %s convolutions, %s batch norm, starting at step %d",
                 config.model.to_dict(),
                 config.dataset, total_steps, warmup_steps, config.global_batch_size,
                 mesh.devices.size, jax.process_count(), model.conv_backend, model.norm_backend,
                 start_step)
    train_step = make_train_step(model, optimizer, augment_view, temperature=config.temperature,
                                 learning_rate_fn=schedule, mesh=mesh)
    state, summary = _train_loop(config, workdir, mesh, state, train_step, checkpointer,
                                 make_feature_fn(model), info.num_classes, total_steps,
                                 info.split_sizes[config.train_split])
  finally:
    checkpointer.wait_until_finished()
    checkpointer.close()

  results = {"mode": "pretrain", "dataset": config.dataset, **summary,
             "start_step": start_step, "global_batch_size": config.global_batch_size,
             "num_devices": int(mesh.devices.size), "num_processes": jax.process_count()}
  export_encoder(workdir, config, state)
  if jax.process_index() == 0:
    curves.plot_training_curves(os.path.join(workdir, METRICS_FILE),
                                os.path.join(workdir, LOSS_CURVE_FILE),
                                title=f"SimCLR {config.dataset}")
  write_results(workdir, results)
  return results


def _train_loop(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh,
                state: TrainState, train_step: Callable, checkpointer:
                checkpointing.TrainCheckpointer, feature_fn: Callable, num_classes: int,
                total_steps: int, num_train_examples: int
                ) -> tuple[TrainState, dict[str, float]]:
  """Steps from state.step to total_steps (or the time budget) with logging, k-NN, checkpoints
  and stop requests."""
  start_step = int(sharding.to_host(state.step))
  batches = input_pipeline.create_train_iterator(
      config.dataset, data_dir=data_dir(config), split=config.train_split,
      global_batch_size=config.global_batch_size, image_size=config.image_size,
      host_crop_views=config.host_crop_views, seed=config.seed, start_step=start_step, mesh=mesh,
      data_shards=data_shards(config),
      host_crop=input_pipeline.HostCrop.from_augment_config(config.augment))
  writer = create_metric_writer(workdir)
  report_progress = progress_reporter(total_steps, writer, config.log_every_steps)
  log = TrainLog(writer, config.global_batch_size)
  last_saved = checkpointer.latest_step()
  budget = TimeBudget(config.max_train_minutes, check_every_steps=config.log_every_steps)
  step = start_step
  try:
    with StopRequest() as stop_request:
      for step in range(start_step + 1, total_steps + 1):
        state, metrics = train_step(state, next(batches))
        log.add(step, metrics)
        report_progress(step)
        stopping = stop_request.should_stop(step)
        last = step == total_steps or budget.spent(step)
        saving = stopping or last or step % config.checkpoint_every_steps == 0
        knn_due = config.knn_every_steps > 0 and (last or step % config.knn_every_steps == 0)
        if saving or knn_due or step % config.log_every_steps == 0:
          log.flush(step, last_saved)  # before saving: a NaN state is never checkpointed
        if knn_due:
          monitor_start = time.monotonic()
          knn_top1 = knn_monitor(config, feature_fn, state, num_classes=num_classes, mesh=mesh)
          log.write_monitor(step, "knn_top1", knn_top1, time.monotonic() - monitor_start)
        if saving:
          checkpointer.save(step, state, _run_record(config, step, total_steps))
          last_saved = step
        if stopping:
          checkpointer.wait_until_finished()
          raise Preempted(step, workdir)
        if last:
          break
  finally:
    batches.close()
    writer.close()
  if step < total_steps:
    logging.warning("the %.1f-minute budget ended training at step %d of %d",
                    config.max_train_minutes, step, total_steps)
  train_seconds, examples_per_sec = log.throughput(step)
  summary = {name: value for name, value in log.summary.items() if name != "examples_per_sec"}
  summary.update(step=step, train_seconds=train_seconds, examples_per_sec=examples_per_sec,
                 pairs_per_sec=examples_per_sec, stopped_early_by_time_budget=step < total_steps,
                 epochs=step * config.global_batch_size / num_train_examples)
  return state, summary
