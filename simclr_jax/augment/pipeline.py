"""A pipeline is a config: `ops`, an ordered tuple of op names, plus one block of parameters per
op (defaults in `OP_DEFAULTS`). Recipes name a preset and override what they change
(`resolve_config`); `get_preset` gives the official recipes, `make_config` a free list,
`validate` rejects bad configs before training, `build_augmentation` turns a config into the
`(key, image) -> image` function the train step vmaps, and `augment_batch` makes a batch's views
with one key per image and view.
"""
import functools
from typing import Any, Callable, Mapping, Sequence

import dm_pix as pix
import jax
import jax.numpy as jnp
import ml_collections

from simclr_jax import native
from simclr_jax.augment.color import (BRIGHTNESS_IMPLS, MAX_JITTER_STRENGTH,
                                      brightness_gain_and_shift, color_jitter,
                                      sample_color_jitter, to_grayscale)
from simclr_jax.augment.filters import (gaussian_blur, gaussian_noise, random_cutout,
                                        sample_blur, sobel)
from simclr_jax.augment.geometry import (center_crop_box, crop_and_resize, resize, rotate90,
                                         sample_crop_box)

# Every op and its default parameters. `p` is the probability of applying the op: one number for
# all views, or one number per view (e.g. SimCLRv2/BYOL-style blur `p=(1.0, 0.1)`), picked by the
# `view` argument of the function `build_augmentation` returns.
OP_DEFAULTS = {
    # Official SimCLR set.
    "random_resized_crop": dict(p=1.0, area_min=0.08, area_max=1.0, aspect_ratio_min=3 / 4,
                                aspect_ratio_max=4 / 3, max_attempts=100, min_object_covered=0.1),
    "flip": dict(p=0.5),
    "color_jitter": dict(p=0.8, strength=1.0, brightness_impl="simclrv2", random_order=True),
    "grayscale": dict(p=0.2),
    "blur": dict(p=0.5, kernel_fraction=0.1, sigma_min=0.1, sigma_max=2.0),
    # From BYOL (which uses p=(0.0, 0.2) per view); not in the official SimCLR code.
    "solarize": dict(p=0.2, threshold=0.5),
    # Extras tried by the CIFAR-100 reproduction.
    "center_crop": dict(p=1.0, proportion=0.875),
    "rotate90": dict(p=0.5),
    "cutout": dict(p=0.5, size=0.5),
    "gaussian_noise": dict(p=0.5, std=0.05),
    "sobel": dict(p=0.5),
}

PRESETS = {
    "simclr_imagenet": (("random_resized_crop", {}), ("flip", {}),
                        ("color_jitter", {"strength": 1.0}), ("grayscale", {}), ("blur", {})),
    "simclr_cifar": (("random_resized_crop", {}), ("flip", {}),
                     ("color_jitter", {"strength": 0.5}), ("grayscale", {})),
    "crop_flip": (("random_resized_crop", {}), ("flip", {})),
    "none": (),
}

Augmentation = Callable[..., jax.Array]


def make_config(ops: Sequence[str], **params: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A pipeline config from an ordered list of op names; `params[name]` overrides defaults.

  Example: `make_config(('random_resized_crop', 'rotate90', 'cutout'), cutout={'size': 0.25})`.
  """
  unknown = sorted(set(ops) - set(OP_DEFAULTS))
  if unknown:
    raise ValueError(f"unknown augmentation ops {unknown}; known: {sorted(OP_DEFAULTS)}")
  extra = sorted(set(params) - set(ops))
  if extra:
    raise ValueError(f"parameters given for {extra}, which are not in ops {tuple(ops)}")
  config = ml_collections.ConfigDict({"ops": tuple(ops)})
  for name in ops:
    config[name] = ml_collections.ConfigDict({**OP_DEFAULTS[name], **params.get(name, {})})
  validate(config)
  return config


def resolve_config(aug_config) -> dict:
  """`config.augment` as the whole pipeline: {'ops': (...), op: {all its parameters}, ...}.

  A recipe names a preset and overrides only what it changes: {'preset': 'simclr_cifar',
  'ops': () (the preset's) or a tuple replacing them, 'random_resized_crop': {'area_min': 0.2}};
  parameters come from the block, then the preset, then OP_DEFAULTS. A config without 'preset'
  is taken as complete (the form `get_preset` and `make_config` return).
  """
  config = _as_dict(aug_config)
  if "preset" not in config:
    return config
  preset = config["preset"]
  if preset not in PRESETS:
    raise ValueError(f"unknown augmentation preset {preset!r}; known: {sorted(PRESETS)}")
  preset_params = dict(PRESETS[preset])
  ops = tuple(config.get("ops") or preset_params)
  overrides = {op: block for op, block in config.items() if op not in ("preset", "ops")}
  unknown = sorted(set(overrides) - set(OP_DEFAULTS))
  if unknown:
    raise ValueError(f"unknown augmentation config keys {unknown}; expected 'preset', 'ops' and "
                     f"op names from {sorted(OP_DEFAULTS)}")
  resolved = {"ops": ops}
  for op in [*ops, *overrides]:
    if op in OP_DEFAULTS:  # `validate` names unknown ops
      resolved[op] = {**OP_DEFAULTS[op], **preset_params.get(op, {}),
                      **dict(overrides.get(op, {}))}
  return resolved


def get_preset(name: str) -> ml_collections.ConfigDict:
  """'simclr_imagenet' (s=1, blur), 'simclr_cifar' (s=0.5, no blur), 'crop_flip', 'none'."""
  if name not in PRESETS:
    raise ValueError(f"unknown augmentation preset {name!r}; known: {sorted(PRESETS)}")
  return make_config([op for op, _ in PRESETS[name]],
                     **{op: overrides for op, overrides in PRESETS[name]})


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_probability(op: str, p) -> None:
  values = list(p) if isinstance(p, (tuple, list)) else [p]
  if not values or not all(_is_number(v) and 0.0 <= v <= 1.0 for v in values):
    raise ValueError(f"{op}.p={p!r}: a probability must be a number in [0, 1] or a non-empty "
                     "sequence of them (one per view)")


def _check_range(op: str, name: str, value, low: float, high: float, *,
                 low_open: bool = False) -> None:
  low_ok = _is_number(value) and (value > low if low_open else value >= low)
  if not (low_ok and value <= high):
    interval = f"{'(' if low_open else '['}{low}, {high}]"
    raise ValueError(f"{op}.{name}={value!r} must be a number in {interval}")


def _validate_op(op: str, params: Mapping[str, Any]) -> None:
  unknown = sorted(set(params) - set(OP_DEFAULTS[op]))
  if unknown:
    raise ValueError(f"unknown parameters {unknown} for augmentation op {op!r}; "
                     f"known: {sorted(OP_DEFAULTS[op])}")
  params = {**OP_DEFAULTS[op], **params}
  _check_probability(op, params["p"])
  if op == "random_resized_crop":
    _check_range(op, "area_min", params["area_min"], 0.0, 1.0, low_open=True)
    _check_range(op, "area_max", params["area_max"], params["area_min"], 1.0)
    _check_range(op, "aspect_ratio_min", params["aspect_ratio_min"], 0.0, float("inf"),
                 low_open=True)
    _check_range(op, "aspect_ratio_max", params["aspect_ratio_max"], params["aspect_ratio_min"],
                 float("inf"))
    _check_range(op, "min_object_covered", params["min_object_covered"], 0.0, 1.0)
    if not (isinstance(params["max_attempts"], int) and params["max_attempts"] >= 1):
      raise ValueError(f"{op}.max_attempts={params['max_attempts']!r} must be an integer >= 1")
  elif op == "color_jitter":
    _check_range(op, "strength", params["strength"], 0.0, MAX_JITTER_STRENGTH, low_open=True)
    if params["brightness_impl"] not in BRIGHTNESS_IMPLS:
      raise ValueError(f"{op}.brightness_impl={params['brightness_impl']!r}; allowed: "
                       f"{BRIGHTNESS_IMPLS} (multiplicative v2 / additive v1)")
    if not isinstance(params["random_order"], bool):
      raise ValueError(f"{op}.random_order={params['random_order']!r} must be True or False")
  elif op == "blur":
    _check_range(op, "kernel_fraction", params["kernel_fraction"], 0.0, 1.0, low_open=True)
    _check_range(op, "sigma_min", params["sigma_min"], 0.0, float("inf"), low_open=True)
    _check_range(op, "sigma_max", params["sigma_max"], params["sigma_min"], float("inf"))
  elif op == "solarize":
    _check_range(op, "threshold", params["threshold"], 0.0, 1.0)
  elif op == "center_crop":
    _check_range(op, "proportion", params["proportion"], 0.0, 1.0, low_open=True)
  elif op == "cutout":
    _check_range(op, "size", params["size"], 0.0, 1.0, low_open=True)
  elif op == "gaussian_noise":
    _check_range(op, "std", params["std"], 0.0, float("inf"))


def _as_dict(config) -> dict:
  return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)


def validate(aug_config) -> None:
  """Raises ValueError naming the bad op or value: unknown ops or parameters, bad numbers.

  Parameters of ops that are not in `ops` are checked too but do not switch the op on, so a sweep
  can toggle an op through `ops` alone.
  """
  config = resolve_config(aug_config)
  if "ops" not in config:
    raise ValueError(f"augmentation config needs 'ops' (an ordered tuple of op names); got keys "
                     f"{sorted(config)}")
  ops = config["ops"]
  if isinstance(ops, str) or not all(isinstance(op, str) for op in ops):
    raise ValueError(f"ops={ops!r} must be a tuple of op names from {sorted(OP_DEFAULTS)}")
  unknown = sorted(set(ops) - set(OP_DEFAULTS))
  if unknown:
    raise ValueError(f"unknown augmentation ops {unknown}; known: {sorted(OP_DEFAULTS)}")
  repeated = sorted({op for op in ops if list(ops).count(op) > 1})
  if repeated:
    raise ValueError(f"ops {repeated} appear more than once in {tuple(ops)}")
  unknown_keys = sorted(set(config) - set(OP_DEFAULTS) - {"ops"})
  if unknown_keys:
    raise ValueError(f"unknown augmentation config keys {unknown_keys}; expected 'ops' and op "
                     f"names from {sorted(OP_DEFAULTS)}")
  for op in OP_DEFAULTS:
    if op in config:
      if not isinstance(config[op], Mapping):
        raise ValueError(f"augmentation config {op!r} must hold the op's parameters, got "
                         f"{config[op]!r}")
      _validate_op(op, config[op])


# ---------------------------------------------------------------------------------------------
# The pipeline.

def _crop_box_function(op: str, params: Mapping[str, Any]):
  """`fn(key, height, width) -> box` for a crop op with its parameters bound."""
  if op == "random_resized_crop":
    return lambda key, height, width: sample_crop_box(
        key, height, width, area_range=(params["area_min"], params["area_max"]),
        aspect_ratio_range=(params["aspect_ratio_min"], params["aspect_ratio_max"]),
        max_attempts=params["max_attempts"], min_object_covered=params["min_object_covered"])
  return lambda key, height, width: center_crop_box(height, width, params["proportion"])


def _arguments(params: Mapping[str, Any]) -> dict[str, Any]:
  """An op's parameters as keyword arguments of its function: all but the probability."""
  return {name: value for name, value in params.items() if name != "p"}


def _image_function(op: str, params: Mapping[str, Any]):
  """`fn(key, image) -> image` for a non-crop op with its parameters bound."""
  if op == "flip":
    return lambda key, image: pix.flip_left_right(image)
  if op == "rotate90":
    return rotate90
  if op == "color_jitter":
    return lambda key, image: color_jitter(key, image, **_arguments(params))
  if op == "grayscale":
    return lambda key, image: to_grayscale(image)
  if op == "blur":
    return lambda key, image: gaussian_blur(key, image, **_arguments(params))
  if op == "solarize":
    return lambda key, image: pix.solarize(image, params["threshold"])
  if op == "cutout":
    return lambda key, image: random_cutout(key, image, size=params["size"])
  if op == "gaussian_noise":
    return lambda key, image: gaussian_noise(key, image, std=params["std"])
  if op == "sobel":
    return lambda key, image: sobel(image)
  raise ValueError(f"unknown augmentation op {op!r}; known: {sorted(OP_DEFAULTS)}")


CROP_OPS = ("random_resized_crop", "center_crop")


def _native_numbers_function(op: str, params: Mapping[str, Any]):
  """`fn(key, apply, height) -> numbers` for a non-crop op of `native.AUGMENT_STEPS`: its step's
  numbers in the native kernel (see `Step` in native/augment_kernels.cc), drawn from `key` as the
  op's JAX function draws them. `apply` is the op's coin, `height` the image's."""
  if op in ("flip", "grayscale"):
    return lambda key, apply, height: (apply,)
  if op == "color_jitter":
    def jitter_numbers(key, apply, height):
      order, factors = sample_color_jitter(key, **_arguments(params))
      return (apply, order, *brightness_gain_and_shift(factors["brightness"],
                                                        params["brightness_impl"]),
              factors["contrast"], factors["saturation"], factors["hue"])
    return jitter_numbers
  if op == "blur":
    def blur_numbers(key, apply, height):
      sigma, kernel_size = sample_blur(key, height, **_arguments(params))
      return (apply, sigma, kernel_size // 2)
    return blur_numbers
  raise ValueError(f"augmentation op {op!r} has no native kernel; those with one: "
                   f"{sorted(native.AUGMENT_STEPS)}")


def build_augmentation(aug_config, image_size: int, *, crop_on_device: bool = True,
                       backend: str = "auto") -> Augmentation:
  """The pipeline as `augment(key, image, view=0) -> [image_size, image_size, 3]` float32.

  `image` is [H, W, 3], float in [0, 1] or uint8. A crop op crops and resizes to image_size (when
  the coin says no, it resizes the whole image); a pipeline without crop ops resizes first if the
  size differs. `crop_on_device=False` drops 'random_resized_crop' because the host pipeline
  already cropped. `view` (a Python int) picks the probability of ops whose `p` is per view.
  `backend` is `config.augment_backend` ('auto', 'jax' or 'native', see
  `native.resolve_backend`): 'native' runs each run of consecutive ops of `native.AUGMENT_STEPS`
  as one C++ kernel call, with the same random numbers and results.
  """
  validate(aug_config)
  if not (isinstance(image_size, int) and image_size >= 1):
    raise ValueError(f"image_size={image_size!r} must be a positive integer")
  native_ops = (native.AUGMENT_STEPS if native.resolve_backend("augment_backend", backend)
                == "native" else {})
  config = resolve_config(aug_config)
  ops = [op for op in config["ops"] if crop_on_device or op != "random_resized_crop"]
  params = {op: {**OP_DEFAULTS[op], **config.get(op, {})} for op in ops}
  functions = [_crop_box_function(op, params[op]) if op in CROP_OPS
               else _native_numbers_function(op, params[op]) if op in native_ops
               else _image_function(op, params[op]) for op in ops]
  resize_first = not any(op in CROP_OPS for op in ops)

  def probability(op: str, view: int) -> float:
    p = params[op]["p"]
    if not isinstance(p, (tuple, list)):
      return float(p)
    if not 0 <= view < len(p):
      raise ValueError(f"view={view} but {op}.p={tuple(p)} has probabilities for {len(p)} views")
    return float(p[view])

  def augment(key: jax.Array, image: jax.Array, view: int = 0) -> jax.Array:
    if image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"augment expects one RGB image [H, W, 3], got shape {image.shape}")
    if image.dtype == jnp.uint8:
      image = image.astype(jnp.float32) / 255.0
    image = image.astype(jnp.float32)
    if resize_first:
      image = jnp.clip(resize(image, image_size), 0.0, 1.0)
    if not ops:
      return jnp.clip(image, 0.0, 1.0)
    coins_key, ops_key = jax.random.split(key)
    coins = jax.random.uniform(coins_key, (len(ops),))
    op_keys = jax.random.split(ops_key, len(ops))
    height, width = image.shape[:2]
    native_steps = []  # (op, numbers) of the native ops not run yet
    for op, function, coin, k_op in zip(ops, functions, coins, op_keys):
      p = probability(op, view)
      apply = coin < p
      if op in CROP_OPS:
        box = jnp.where(apply, function(k_op, height, width),
                        jnp.array([0, 0, height, width], jnp.int32))
        height = width = image_size
      if op in native_ops:
        if op in CROP_OPS or p > 0.0:
          numbers = (box,) if op in CROP_OPS else function(k_op, apply, height)
          native_steps.append((op, numbers))
        continue
      image = native.run_augment_steps(image, native_steps, image_size)
      native_steps = []
      if op in CROP_OPS:
        image = jnp.clip(crop_and_resize(image, box, image_size), 0.0, 1.0)  # bicubic overshoot
      elif p >= 1.0:
        image = function(k_op, image)
      elif p > 0.0:  # a select: under vmap a cond would run both branches anyway
        image = jnp.where(apply, function(k_op, image), image)
    if native_steps:  # the kernel clips its views
      return native.run_augment_steps(image, native_steps, image_size)
    return jnp.clip(image, 0.0, 1.0)

  return augment


# ---------------------------------------------------------------------------------------------
# Batches.

def image_keys(base_key: jax.Array, step: jax.Array, indices: jax.Array) -> jax.Array:
  """fold_in(fold_in(base_key, step), global index) per image: a view depends on the image and
  the step, not on which device or process holds it."""
  step_key = jax.random.fold_in(base_key, step)
  return jax.vmap(lambda index: jax.random.fold_in(step_key, index))(indices)


def augment_batch(augment_view: Augmentation, images: jax.Array, indices: jax.Array,
                  base_key: jax.Array, step: jax.Array, *, num_views: int) -> jax.Array:
  """[num_views * n, S, S, 3] float views of n uint8 images: all first views, then all second.

  `augment_view` is `build_augmentation`'s function; `images` is [n, H, W, 3] (cropped on the
  device) or [n, num_views, S, S, 3] (cropped on the host, one crop per view). One view uses the
  image's key (`image_keys`); two views split it, one key per view.
  """
  if num_views not in (1, 2):
    raise ValueError(f"num_views={num_views!r}; allowed: 1 (probes, fine-tuning) or 2 (SimCLR)")
  keys = image_keys(base_key, step, indices)
  view_keys = keys[:, None] if num_views == 1 else jax.vmap(jax.random.split)(keys)
  images = (images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8
            else images.astype(jnp.float32))
  return jnp.concatenate([
      jax.vmap(functools.partial(augment_view, view=view))(
          view_keys[:, view], images[:, view] if images.ndim == 5 else images)
      for view in range(num_views)], axis=0)
