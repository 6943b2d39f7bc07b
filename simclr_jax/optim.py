"""Optimizers and learning-rate schedules: LARS for pretraining, SGD and AdamW for probes/fine-tune.

All of them come from optax; this module adds SimCLR's choices: which parameters get weight decay
and the LARS trust ratio, learning rates scaled with the global batch, linear warmup then cosine
decay to 0, and freezing parameters (zero updates, no optimizer state).
"""
import functools
import math
from typing import Any, Callable

from absl import logging
import jax
import optax

OPTIMIZERS = ("lars", "sgd", "adamw")
LR_SCALINGS = ("linear", "sqrt", "none")
# Parameter names that never get weight decay or the trust ratio: BN scale/bias and all biases.
UNDECAYED_PARAM_NAMES = frozenset({"scale", "bias"})
# The online/offline linear probe: a classifier on frozen features, not part of the encoder.
LINEAR_HEAD = "linear_head"


def _key_name(key: Any) -> Any:
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return getattr(key, attribute)
  return key


def decay_mask(params: Any) -> Any:
  """True where weight decay and the LARS trust ratio apply: the conv/dense kernels.

  False for batch-norm scale/bias, every bias and everything under 'linear_head', as the official
  code's `exclude_from_weight_decay=['batch_normalization', 'bias', 'head_supervised']`: a leaf is
  excluded by its name ('scale', 'bias') or its path, so new modules follow the rule unchanged.
  """
  def is_decayed(path, _):
    names = [_key_name(key) for key in path]
    return names[-1] not in UNDECAYED_PARAM_NAMES and LINEAR_HEAD not in names

  return jax.tree_util.tree_map_with_path(is_decayed, params)


def scale_learning_rate(base_learning_rate: float, lr_scaling: str,
                        global_batch_size: int) -> float:
  """The paper's rules: 'linear' base * B / 256 (0.3 for LARS) or 'sqrt' base * sqrt(B) (0.075).

  'none' keeps the base rate whatever the batch.
  """
  if base_learning_rate < 0:
    raise ValueError(f"base_learning_rate must be >= 0, got {base_learning_rate}")
  if global_batch_size <= 0:
    raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
  if lr_scaling == "linear":
    return base_learning_rate * global_batch_size / 256
  if lr_scaling == "sqrt":
    return base_learning_rate * math.sqrt(global_batch_size)
  if lr_scaling == "none":
    return base_learning_rate
  raise ValueError(f"unknown lr_scaling {lr_scaling!r}; allowed: {', '.join(LR_SCALINGS)}")


def learning_rate_schedule(base_learning_rate: float, *, lr_scaling: str, global_batch_size: int,
                           total_steps: int, warmup_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to the scaled rate over `warmup_steps`, then cosine decay to 0.

  Step 0 (the first update) has rate 0 and step `total_steps` reaches 0 again, as the official
  code. The cosine phase needs at least one step, so `warmup_steps` must be < `total_steps`: a
  trainer whose step count is overridden below its warmup should shorten the warmup.
  """
  peak = scale_learning_rate(base_learning_rate, lr_scaling, global_batch_size)
  if total_steps <= 0:
    raise ValueError(f"total_steps must be positive, got {total_steps}")
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(
        f"warmup_steps must be in [0, total_steps={total_steps}), got {warmup_steps}")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup_steps, decay_steps=total_steps,
      end_value=0.0)


def steps_from_epochs(epochs: float, num_examples: int, global_batch_size: int) -> int:
  """Steps that cover `epochs` passes (fractions allowed) over `num_examples`, rounded up."""
  if epochs < 0:
    raise ValueError(f"epochs must be >= 0, got {epochs}")
  if num_examples <= 0 or global_batch_size <= 0:
    raise ValueError("num_examples and global_batch_size must be positive, got "
                     f"{num_examples} and {global_batch_size}")
  return math.ceil(epochs * num_examples / global_batch_size)


def create_optimizer(name: str, learning_rate: float | optax.Schedule, *, weight_decay: float,
                     momentum: float = 0.9, trust_coefficient: float = 0.001,
                     nesterov: bool = False,
                     trainable_mask: Any | Callable[[Any], Any] | None = None
                     ) -> optax.GradientTransformation:
  """One of 'lars' (pretraining), 'sgd' or 'adamw' (probes, fine-tuning), with SimCLR's masks.

  'lars': `optax.lars` with `decay_mask` as both the weight-decay and trust-ratio mask: weight
  decay is added to the gradient before the trust ratio `trust_coefficient * |w| / |g|` (1 where a
  norm is 0 or the parameter is excluded), then v = momentum * v + lr * trust * g, w -= v.
  'sgd': the same added (L2) weight decay on `decay_mask`, then SGD with optional (Nesterov)
  momentum. 'adamw': decoupled weight decay on `decay_mask`, with b1 = `momentum`.

  `trainable_mask` (a bool tree like the params, or a function of params returning one): leaves
  False get zero updates and no optimizer state, e.g. a frozen encoder under a linear probe.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")
  if not callable(learning_rate) and learning_rate < 0:
    raise ValueError(f"learning_rate must be >= 0, got {learning_rate}")
  if weight_decay < 0:
    raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
  if not 0 <= momentum < 1:
    raise ValueError(f"momentum must be in [0, 1), got {momentum}")
  if trust_coefficient <= 0:
    raise ValueError(f"trust_coefficient must be positive, got {trust_coefficient}")

  if name == "lars":
    optimizer = optax.lars(
        learning_rate, weight_decay=weight_decay, weight_decay_mask=decay_mask,
        trust_coefficient=trust_coefficient, trust_ratio_mask=decay_mask, momentum=momentum,
        nesterov=nesterov)
  elif name == "sgd":
    optimizer = optax.chain(
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
        optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov))
  else:
    optimizer = optax.adamw(learning_rate, b1=momentum, weight_decay=weight_decay,
                            mask=decay_mask, nesterov=nesterov)

  if trainable_mask is None:
    return optimizer

  def labels(params):
    mask = trainable_mask(params) if callable(trainable_mask) else trainable_mask
    return jax.tree.map(lambda trainable: "trainable" if trainable else "frozen", mask)

  return optax.multi_transform({"trainable": optimizer, "frozen": optax.set_to_zero()}, labels)


def with_probe_optimizer(optimizer: optax.GradientTransformation,
                         probe_optimizer: optax.GradientTransformation
                         ) -> optax.GradientTransformation:
  """`probe_optimizer` for everything under 'linear_head', `optimizer` for the rest.

  The official code trains the online probe with the pretraining LARS rate (2.0 at B=512) on
  unnormalised features, where its loss diverges; a rate of its own keeps the probe readable.
  """
  def labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "probe" if LINEAR_HEAD in [_key_name(key) for key in path] else "model",
        params)

  return optax.multi_transform({"model": optimizer, "probe": probe_optimizer}, labels)


def training_steps(config: Any, num_examples: int, *, total_steps: int | None = None
                   ) -> tuple[int, int]:
  """(total_steps, warmup_steps) of a job's config: `total_steps` when given (a schedule fitted
  to a time budget), else `num_train_steps`, else `num_epochs` over `num_examples`;
  `optimizer.warmup_epochs`, shortened to a tenth of training (with a warning) when it would not
  leave a step of cosine decay."""
  batch = config.global_batch_size
  total = total_steps or (config.num_train_steps if config.num_train_steps > 0 else
                          steps_from_epochs(config.num_epochs, num_examples, batch))
  warmup = steps_from_epochs(config.optimizer.warmup_epochs, num_examples, batch)
  if warmup >= total:
    _warn_warmup_shortened(warmup, total)
    warmup = total // 10
  return total, warmup


@functools.lru_cache(maxsize=None)
def _warn_warmup_shortened(warmup: int, total: int) -> None:
  """Once per process and schedule: a job builds its optimizer more than once."""
  logging.warning("warmup of %d steps does not fit in %d training steps; warming up for %d",
                  warmup, total, total // 10)


def optimizer_from_config(config: Any, num_examples: int, *, trainable_mask: Any = None,
                          total_steps: int | None = None
                          ) -> tuple[optax.GradientTransformation, optax.Schedule, int]:
  """(optimizer, its learning-rate schedule, total steps) of a job's `config.optimizer`;
  `total_steps` replaces the config's length (see `training_steps`)."""
  total_steps, warmup_steps = training_steps(config, num_examples, total_steps=total_steps)
  optimizer_config = config.optimizer
  schedule = learning_rate_schedule(
      optimizer_config.base_learning_rate, lr_scaling=optimizer_config.lr_scaling,
      global_batch_size=config.global_batch_size, total_steps=total_steps,
      warmup_steps=warmup_steps)
  optimizer = create_optimizer(
      optimizer_config.name, schedule, weight_decay=optimizer_config.weight_decay,
      momentum=optimizer_config.momentum, nesterov=optimizer_config.get("nesterov", False),
      trust_coefficient=optimizer_config.get("trust_coefficient", 0.001),
      trainable_mask=trainable_mask)
  return optimizer, schedule, total_steps
