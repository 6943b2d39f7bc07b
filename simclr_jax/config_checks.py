"""Config validation, one function per concern, composed by each job before anything compiles.

Every failure is a `ConfigError` naming the field, its value and what is allowed; what the
modules that read a value (models, augmentations, backends, the input pipeline) raise about it
while it is checked here becomes a user error too (`simclr_jax.errors`).
"""
import contextlib
from typing import Any, Iterator, Mapping

from absl import logging
import jax
import ml_collections

from simclr_jax import augment
from simclr_jax import errors
from simclr_jax import features
from simclr_jax import input_pipeline
from simclr_jax import models
from simclr_jax import native
from simclr_jax import optim

BACKEND_FIELDS = ("conv_backend", "norm_backend", "augment_backend")


class ConfigError(errors.InvalidInput):
  """A config value that cannot run; the message says which and what is allowed."""


@contextlib.contextmanager
def user_input() -> Iterator[None]:
  """Re-raises the ValueError / FileNotFoundError of checking or opening the user's input as a
  user error with the same message (the modules that raise them are shared with library use)."""
  try:
    yield
  except errors.UserError:
    raise
  except FileNotFoundError as e:
    raise errors.MissingInput(str(e)) from e
  except ValueError as e:
    raise errors.InvalidInput(str(e)) from e


def dataset_info(config: ml_collections.ConfigDict) -> input_pipeline.DatasetInfo:
  """`config.dataset` in `config.data_dir` (prepared on first use if generated), or a user error
  naming what is missing."""
  with user_input():
    return input_pipeline.get_dataset_info(config.dataset, data_dir=config.data_dir or None)


def require(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(f"invalid config: {message}")


def check_mode(config: ml_collections.ConfigDict, mode: str) -> None:
  require(config.mode == mode, f"mode={config.mode!r}, but this runs {mode!r}")


def check_splits(config: ml_collections.ConfigDict, info: input_pipeline.DatasetInfo) -> None:
  """The train and eval splits exist (a TFDS split spec like 'train[:80%]' is checked by the
  input pipeline when it opens the split)."""
  for split in (config.train_split, config.eval_split):
    base = split.split("[", 1)[0]
    require(base in info.split_sizes,
            f"split {split!r} is not in {config.dataset} (splits: "
            f"{', '.join(sorted(info.split_sizes))})")


def check_model_and_compute(config: ml_collections.ConfigDict) -> None:
  """config.model, dtype, image size and the three backends (resolved here, so a native backend
  that cannot run fails now)."""
  with user_input():
    models.ModelConfig.from_mapping(config.model)
    for field in BACKEND_FIELDS:
      native.resolve_backend(field, config[field])
  require(config.dtype in models.COMPUTE_DTYPES,
          f"dtype={config.dtype!r}; allowed: {', '.join(models.COMPUTE_DTYPES)}")
  require(config.image_size > 0, f"image_size={config.image_size} must be positive")
  if config.image_size <= 32 and not config.model.cifar_stem:
    logging.warning("image_size=%d without model.cifar_stem: the ImageNet stem downsamples a "
                    "32 px image 4x before the first block (SimCLR uses the CIFAR stem here)",
                    config.image_size)


def check_augmentations(config: ml_collections.ConfigDict, *, host_crop_views: tuple[int, ...]
                        ) -> None:
  with user_input():
    augment.validate(config.augment)
  require(config.host_crop_views in host_crop_views,
          f"host_crop_views={config.host_crop_views}; allowed: {host_crop_views} (0: the device "
          "crops, for fixed-size images; otherwise the host crops, needed when sizes vary)")
  if config.image_size <= 32 and "blur" in augment.resolve_config(config.augment)["ops"]:
    logging.warning("Gaussian blur at image_size=%d: SimCLR drops blur for CIFAR-sized images, "
                    "where it erases most of the content", config.image_size)


def check_batch(config: ml_collections.ConfigDict, num_devices: int) -> None:
  require(config.global_batch_size > 0 and config.global_batch_size % num_devices == 0,
          f"global_batch_size={config.global_batch_size} must be a positive multiple of the "
          f"number of devices ({num_devices} = {jax.process_count()} process(es) x "
          f"{jax.local_device_count()} local device(s))")
  require(config.data_shards == 0 or (config.data_shards > 0 and
                                      config.data_shards % jax.process_count() == 0 and
                                      config.global_batch_size % config.data_shards == 0),
          f"data_shards={config.data_shards} must be 0 (one per process) or a multiple of the "
          f"process count ({jax.process_count()}) that divides global_batch_size")


def check_training(config: ml_collections.ConfigDict) -> None:
  """Schedule, optimizer and the loop's own fields."""
  require(config.num_train_steps > 0 or config.num_epochs > 0,
          f"num_epochs={config.num_epochs} or num_train_steps={config.num_train_steps} must be "
          "positive")
  optimizer = config.optimizer
  require(optimizer.name in optim.OPTIMIZERS,
          f"optimizer.name={optimizer.name!r}; allowed: {', '.join(optim.OPTIMIZERS)}")
  require(optimizer.lr_scaling in optim.LR_SCALINGS,
          f"optimizer.lr_scaling={optimizer.lr_scaling!r}; allowed: {', '.join(optim.LR_SCALINGS)}")
  require(optimizer.base_learning_rate > 0,
          f"optimizer.base_learning_rate={optimizer.base_learning_rate} must be positive")
  require(optimizer.warmup_epochs >= 0,
          f"optimizer.warmup_epochs={optimizer.warmup_epochs} must be >= 0")
  require(config.max_train_minutes >= 0,
          f"max_train_minutes={config.max_train_minutes} must be >= 0 (0 = no budget)")
  require(not config.schedule_fits_budget or config.max_train_minutes > 0,
          "schedule_fits_budget=True needs a time budget: set max_train_minutes > 0")
  for name in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    require(config[name] >= 1, f"{name}={config[name]} must be >= 1")


def _check_examples(prefix: str, block: Mapping[str, Any]) -> None:
  require(block["every_steps"] >= 0,
          f"{prefix}.every_steps={block['every_steps']} must be >= 0 (0 = only at the end)")
  for name in ("train_examples", "eval_examples"):
    require(block[name] >= 0, f"{prefix}.{name}={block[name]} must be >= 0 (0 = all)")


def check_knn(prefix: str, block: Mapping[str, Any]) -> None:
  _check_examples(prefix, block)
  require(block["k"] >= 1, f"{prefix}.k={block['k']} must be >= 1")
  require(block["temperature"] > 0, f"{prefix}.temperature={block['temperature']} must be > 0")


def check_lbfgs(prefix: str, block: Mapping[str, Any]) -> None:
  _check_examples(prefix, block)
  require(0 < block["validation_fraction"] < 1,
          f"{prefix}.validation_fraction={block['validation_fraction']} must be in (0, 1)")
  require(0 < block["l2_min"] <= block["l2_max"] and block["l2_num"] >= 1,
          f"{prefix} L2 grid l2_min={block['l2_min']}, l2_max={block['l2_max']}, "
          f"l2_num={block['l2_num']} must satisfy 0 < l2_min <= l2_max, l2_num >= 1")
  require(block["max_iterations"] >= 1,
          f"{prefix}.max_iterations={block['max_iterations']} must be >= 1")


def check_mlp_probe(prefix: str, block: Mapping[str, Any]) -> None:
  _check_examples(prefix, block)
  require(block["batch_norm"] in features.BATCH_NORM_MODES,
          f"{prefix}.batch_norm={block['batch_norm']!r}; allowed: "
          f"{', '.join(features.BATCH_NORM_MODES)}")
  hidden_sizes = block["hidden_sizes"]
  positive_integers = isinstance(hidden_sizes, (tuple, list)) and all(
      isinstance(size, int) and not isinstance(size, bool) and size >= 1 for size in hidden_sizes)
  require(positive_integers, f"{prefix}.hidden_sizes={hidden_sizes!r} must be a tuple of positive "
          "integers (the hidden layers' widths; () = a linear probe)")
  require(0 <= block["dropout_rate"] < 1,
          f"{prefix}.dropout_rate={block['dropout_rate']} must be in [0, 1)")
  require(block["learning_rate"] > 0,
          f"{prefix}.learning_rate={block['learning_rate']} must be > 0")
  for name in ("epochs", "batch_size"):
    require(block[name] >= 1, f"{prefix}.{name}={block[name]} must be >= 1")
  if block["batch_norm"] == "batch_statistics":
    logging.warning("%s.batch_norm='batch_statistics': features with batch norm in training mode "
                    "(each extraction batch's own statistics), as the CIFAR-100 report did; the "
                    "paper's protocol is 'running_average'", prefix)


EVALUATOR_CHECKS = {"knn": check_knn, "linear": check_lbfgs, "mlp": check_mlp_probe}


def check_evals(config: ml_collections.ConfigDict) -> None:
  """Every block of `config.evals` that is enabled."""
  for name, block in config.evals.items():
    require(name in EVALUATOR_CHECKS,
            f"evals.{name}: unknown evaluator; allowed: {', '.join(EVALUATOR_CHECKS)}")
    if block["enabled"]:
      EVALUATOR_CHECKS[name](f"evals.{name}", block)
