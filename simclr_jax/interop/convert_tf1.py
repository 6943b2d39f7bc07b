"""Imports the official SimCLR v1/v2 TF1 checkpoints (google-research/simclr) as encoder exports.

The official graph is built with `tf.layers`, which names layers by creation order, not by role:
`base_model/conv2d{,_1,...}/kernel` and `base_model/batch_normalization{,_1,...}/{gamma, beta,
moving_mean, moving_variance}`. In each block the projection shortcut (conv + BN) is created first,
then the main path; selective-kernel (SK) blocks replace the 3x3 conv by conv(2f) -> BN ->
conv(mid) -> BN -> conv(2f, no BN); SK models also use the ResNet-D stem (three 3x3 convs). Heads
are `head_contrastive/nl_{i}/{dense, batch_normalization}` (the last BN has no beta) and
`head_supervised/linear_layer/dense/{kernel, bias}`. SimCLRv2 files also hold `ema_model/` copies
and optimizer slots, which are skipped.

The architecture is read off the tensor shapes, the official creation order is rebuilt from it and
paired with our module names, and every tensor is checked against the shape our Flax model
expects: a checkpoint loads completely or fails with a list of what did not match.
"""
import dataclasses
import glob
import os
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf

from simclr_jax import export
from simclr_jax import models
from simclr_jax.models import resnet

# The official SimCLRv2 value of --sk_ratio; with the mixing bottleneck's floor of 32 channels,
# ResNet-50/101/152 1x SK checkpoints cannot tell it apart from smaller ratios.
OFFICIAL_SK_RATIO = 0.0625
# Variables of the training run, not of the model.
SKIPPED_SCOPES = ("ema_model",)
SKIPPED_VARIABLES = ("global_step", "beta1_power", "beta2_power")
SKIPPED_SLOTS = ("Momentum", "LARSOptimizer", "Adam", "Adam_1")
SUPERVISED_HEAD_INPUTS = ("h", "hidden1")
_BN_TO_FLAX = {"gamma": ("params", "scale"), "beta": ("params", "bias"),
               "moving_mean": ("batch_stats", "mean"), "moving_variance": ("batch_stats", "var")}
_BACKBONE_LAYER = re.compile(r"^base_model/(conv2d|batch_normalization)(?:_(\d+))?/(\w+)$")
_HEAD_LAYER = re.compile(r"^head_contrastive/nl_(\d+)/")
_SUPERVISED_KERNEL = "head_supervised/linear_layer/dense/kernel"
_SUPERVISED_BIAS = "head_supervised/linear_layer/dense/bias"
_MAX_LISTED = 20


@dataclasses.dataclass(frozen=True)
class Assignment:
  """One checkpoint tensor and where it goes: (collection, top-level module, *module path, leaf)."""
  tf_name: str
  target: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Conversion:
  """What a checkpoint holds, in our terms: model config, tensor placement, what was skipped."""
  checkpoint_prefix: str
  model_config: ml_collections.ConfigDict
  assignments: tuple[Assignment, ...]
  has_projection_head: bool
  num_classes: int  # classes of the supervised head; 0 when the checkpoint has none
  skipped: tuple[str, ...]


def resolve_checkpoint_prefix(checkpoint: str) -> str:
  """The TF checkpoint prefix of a prefix, one of its files, or a directory holding one checkpoint
  (or several and a `checkpoint` state file naming one that exists)."""
  checkpoint = re.sub(r"\.(index|meta|data-\d+-of-\d+)$", "", checkpoint)
  if os.path.isfile(checkpoint + ".index"):
    return checkpoint
  if not os.path.isdir(checkpoint):
    raise FileNotFoundError(
        f"no TF checkpoint at {checkpoint!r}: expected a directory or a prefix such as "
        "DIR/model.ckpt-250228 (with DIR/model.ckpt-250228.index next to it)")
  prefixes = sorted(path[:-len(".index")]
                    for path in glob.glob(os.path.join(checkpoint, "*.index")))
  if len(prefixes) == 1:
    return prefixes[0]
  latest = tf.train.latest_checkpoint(checkpoint)
  if latest and os.path.isfile(latest + ".index"):
    return latest
  if not prefixes:
    raise FileNotFoundError(f"{checkpoint} holds no TF checkpoint (no *.index file)")
  names = [os.path.basename(prefix) for prefix in prefixes]
  raise ValueError(f"{checkpoint} holds several checkpoints {names}; pass the prefix of the one "
                   "to convert")


def _is_skipped(name: str) -> bool:
  parts = name.split("/")
  return (parts[0] in SKIPPED_SCOPES or name in SKIPPED_VARIABLES or parts[-1] in SKIPPED_SLOTS)


def _head_layer_count(shapes: Mapping[str, Sequence[int]]) -> int:
  indices = sorted({int(m.group(1)) for name in shapes if (m := _HEAD_LAYER.match(name))})
  if indices != list(range(len(indices))):
    raise ValueError(f"projection head layers are not numbered 0..n-1: found nl_{indices}")
  return len(indices)


def _backbone_kernel_shapes(shapes: Mapping[str, Sequence[int]]) -> list[tuple[int, ...]]:
  """base_model conv kernel shapes in creation order; a gap in the numbering is an error."""
  by_index = {}
  for name, shape in shapes.items():
    match = _BACKBONE_LAYER.match(name)
    if match and match.group(1) == "conv2d" and match.group(3) == "kernel":
      by_index[int(match.group(2) or 0)] = tuple(shape)
  gaps = [i for i in range(max(by_index, default=-1) + 1) if i not in by_index]
  if not by_index or gaps:
    absent = [_tf_layer_name("conv2d", i) + "/kernel" for i in gaps] or ["base_model/conv2d/kernel"]
    raise ValueError(f"not an official SimCLR checkpoint: missing {_listed(absent)}")
  return [by_index[i] for i in range(len(by_index))]


def infer_model_config(shapes: Mapping[str, Sequence[int]], *, depth: int | None = None,
                       width_multiplier: float | None = None,
                       sk_ratio: float | None = None) -> ml_collections.ConfigDict:
  """`config.model` of the network a checkpoint holds, read off its shapes and layer counts.

  Values given explicitly replace the inferred ones (the conversion then reports every tensor that
  does not fit them).
  """
  resnet.validate_resnet_args(50 if depth is None else depth,
                              1.0 if width_multiplier is None else width_multiplier,
                              0.0 if sk_ratio is None else sk_ratio)
  kernels = _backbone_kernel_shapes(shapes)
  first = kernels[0]
  resnet_d_stem = first[:3] == (3, 3, 3) and len(kernels) > 1 and kernels[1][:2] == (3, 3)
  if first[:3] == (7, 7, 3) or (first[:3] == (3, 3, 3) and not resnet_d_stem):
    cifar_stem, stem_convs, stem_width = first[0] == 3, 1, first[3]
  elif resnet_d_stem and len(kernels) > 2:
    cifar_stem, stem_convs, stem_width = False, 3, kernels[2][3]
  else:
    raise ValueError(f"base_model/conv2d/kernel has shape {first}; an official stem starts with a "
                     "7x7x3 conv (ImageNet), a 3x3x3 conv (CIFAR) or three 3x3 convs (ResNet-D, "
                     "SK)")
  shortcut = kernels[stem_convs] if len(kernels) > stem_convs else None
  if shortcut is None or shortcut[:3] != (1, 1, stem_width):
    raise ValueError(f"{_tf_layer_name('conv2d', stem_convs)}/kernel has shape {shortcut}; the "
                     f"official layout has the 1x1 projection shortcut of block group 1 there")
  if shortcut[3] == stem_width:
    raise ValueError(
        "this is an official ResNet-18/34 (basic-block) checkpoint: the official code gives block "
        f"group 1 a projection shortcut ({_tf_layer_name('conv2d', stem_convs)}), which "
        "simclr_jax's ResNet-18/34 do not have (a standard ResNet shortcut is the identity there); "
        "only bottleneck ResNets (50/101/152/200) can be imported")
  if shortcut[3] != 4 * stem_width:
    raise ValueError(f"block group 1 shortcut has {shortcut[3]} output channels; expected 4x the "
                     f"stem's {stem_width} (bottleneck ResNet)")
  inferred_width = stem_width / 64
  convs_per_block = 5 if resnet_d_stem else 3
  conv_counts = {d: stem_convs + 4 + convs_per_block * sum(groups)
                 for d, (kind, groups) in resnet.BLOCK_GROUPS.items() if kind == "bottleneck"}
  inferred_depth = next((d for d, n in conv_counts.items() if n == len(kernels)), None)
  if depth is None and inferred_depth is None:
    raise ValueError(f"the checkpoint has {len(kernels)} base_model convs; official bottleneck "
                     f"ResNets{' with selective kernels' if resnet_d_stem else ''} have "
                     f"{conv_counts} (depth: count)")
  depth = inferred_depth if depth is None else depth
  width_multiplier = inferred_width if width_multiplier is None else width_multiplier
  if sk_ratio is None:
    sk_ratio = _infer_sk_ratio(kernels, depth, width_multiplier) if resnet_d_stem else 0.0

  head_layers = _head_layer_count(shapes)
  h_dim = resnet.resnet_output_dim(depth, width_multiplier)
  head_hidden_dim, projection_dim = 0, 128
  if head_layers:
    hidden = shapes.get("head_contrastive/nl_0/dense/kernel")
    last = shapes.get(f"head_contrastive/nl_{head_layers - 1}/dense/kernel")
    if hidden is None or last is None:
      raise ValueError("the projection head lacks head_contrastive/nl_*/dense/kernel")
    projection_dim = int(last[1])
    if head_layers > 1 and int(hidden[1]) != h_dim:
      head_hidden_dim = int(hidden[1])
  return ml_collections.ConfigDict(dict(
      depth=depth, width_multiplier=width_multiplier, cifar_stem=cifar_stem, sk_ratio=sk_ratio,
      tf_same_padding=True, head_layers=head_layers or 2, head_hidden_dim=head_hidden_dim,
      projection_dim=projection_dim, bn_momentum=0.9, bn_epsilon=1e-5))


def _infer_sk_ratio(kernels, depth, width_multiplier) -> float:
  """The SK ratio from the mixing bottlenecks: max(int(filters * ratio), 32) channels each."""
  mixing = [(filters, kernels[index][3]) for index, filters in
            _sk_reduce_conv_positions(depth, width_multiplier) if index < len(kernels)]
  fits = lambda ratio: all(max(int(f * ratio), resnet.SK_MIN_DIM) == mid for f, mid in mixing)
  if fits(OFFICIAL_SK_RATIO):
    return OFFICIAL_SK_RATIO
  filters, mid = max(mixing)
  if mid > resnet.SK_MIN_DIM and fits(mid / filters):
    return mid / filters
  raise ValueError(f"the selective-kernel layers' widths {sorted(set(mixing))} (filters, mixing "
                   "channels) fit no sk_ratio; pass --sk_ratio")


def _sk_reduce_conv_positions(depth, width_multiplier):
  """(creation index, block filters) of every SK mixing-bottleneck conv."""
  convs, _ = _backbone_layer_order(depth, sk_ratio=1.0, cifar_stem=False)
  group_of = lambda block: int(re.match(r"block(\d+)_", block).group(1))
  return [(index, resnet.scaled_channels(64 * 2 ** (group_of(path[0]) - 1), width_multiplier))
          for index, path in enumerate(convs) if path[-1] == "sk_reduce_conv"]


def _backbone_layer_order(depth: int, *, sk_ratio: float, cifar_stem: bool):
  """Our module paths of the official convs and BNs, each list in TF creation order."""
  convs, norms = [], []
  if cifar_stem:
    stem = [("stem_conv", "stem_bn")]
  elif sk_ratio > 0:
    stem = [("stem_conv1", "stem_bn1"), ("stem_conv2", "stem_bn2"), ("stem_conv", "stem_bn")]
  else:
    stem = [("stem_conv", "stem_bn")]
  for conv, norm in stem:
    convs.append((conv,))
    norms.append((norm,))
  kind, groups = resnet.BLOCK_GROUPS[depth]
  for group, num_blocks in enumerate(groups, start=1):
    for index in range(num_blocks):
      block = f"block{group}_{index}"
      layers = [("shortcut_conv", "shortcut_bn")] if index == 0 else []
      if kind == "basic":
        layers += [("conv1", "bn1"), ("conv2", "bn2")]
      elif sk_ratio > 0:
        layers += [("conv1", "bn1"), ("conv2", "bn2"), ("sk_reduce_conv", "sk_reduce_bn"),
                   ("sk_mix_conv", None), ("conv3", "bn3")]
      else:
        layers += [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
      for conv, norm in layers:
        convs.append((block, conv))
        if norm:
          norms.append((block, norm))
  return convs, norms


def _tf_layer_name(kind: str, index: int) -> str:
  return f"base_model/{kind}" + (f"_{index}" if index else "")


def official_assignments(model_config: Mapping[str, Any], *, has_projection_head: bool,
                         has_supervised_head: bool) -> list[Assignment]:
  """Every tensor the official code creates for this architecture and where it goes in ours."""
  convs, norms = _backbone_layer_order(model_config["depth"], sk_ratio=model_config["sk_ratio"],
                                       cifar_stem=model_config["cifar_stem"])
  assignments = [Assignment(f"{_tf_layer_name('conv2d', i)}/kernel",
                            ("params", "encoder", *path, "kernel"))
                 for i, path in enumerate(convs)]
  for i, path in enumerate(norms):
    for tf_leaf, (collection, leaf) in _BN_TO_FLAX.items():
      assignments.append(Assignment(f"{_tf_layer_name('batch_normalization', i)}/{tf_leaf}",
                                    (collection, "encoder", *path, leaf)))
  if has_projection_head:
    num_layers = model_config["head_layers"]
    for i in range(num_layers):
      scope = f"head_contrastive/nl_{i}"
      assignments.append(Assignment(f"{scope}/dense/kernel",
                                    ("params", "projection_head", f"dense_{i}", "kernel")))
      for tf_leaf, (collection, leaf) in _BN_TO_FLAX.items():
        if tf_leaf == "beta" and i == num_layers - 1:
          continue  # the official last layer's BN has center=False
        assignments.append(Assignment(f"{scope}/batch_normalization/{tf_leaf}",
                                      (collection, "projection_head", f"bn_{i}", leaf)))
  if has_supervised_head:
    assignments += [
        Assignment(_SUPERVISED_KERNEL, ("params", "supervised_head", "dense", "kernel")),
        Assignment(_SUPERVISED_BIAS, ("params", "supervised_head", "dense", "bias"))]
  return assignments


def _flax_shapes(model_config, num_classes: int) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Shapes of every variable of our model, keyed like Assignment.target."""
  model = models.create_model(model_config, num_classes=max(num_classes, 1))
  images = jnp.zeros((1, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    key = tuple(str(entry.key) for entry in path)
    if key[1] == "linear_head":
      key = (key[0], "supervised_head", *key[2:])
    flat[key] = tuple(leaf.shape)
  return flat


def _listed(items: Sequence[str]) -> str:
  shown = ", ".join(items[:_MAX_LISTED])
  more = len(items) - _MAX_LISTED
  return shown + (f" ... and {more} more" if more > 0 else "")


def plan_conversion(checkpoint: str, *, depth: int | None = None,
                    width_multiplier: float | None = None, sk_ratio: float | None = None
                    ) -> Conversion:
  """Reads the checkpoint's names and shapes, infers the model and pairs every tensor with its
  place; raises ValueError listing the missing, unexpected and wrongly shaped tensors."""
  prefix = resolve_checkpoint_prefix(checkpoint)
  all_shapes = tf.train.load_checkpoint(prefix).get_variable_to_shape_map()
  skipped = tuple(sorted(name for name in all_shapes if _is_skipped(name)))
  shapes = {name: tuple(shape) for name, shape in all_shapes.items() if not _is_skipped(name)}
  model_config = infer_model_config(shapes, depth=depth, width_multiplier=width_multiplier,
                                    sk_ratio=sk_ratio)
  models.ModelConfig.from_mapping(model_config)  # a clear error for values it cannot take
  has_projection_head = any(name.startswith("head_contrastive/") for name in shapes)
  has_supervised_head = any(name.startswith("head_supervised/") for name in shapes)
  num_classes = int(shapes[_SUPERVISED_KERNEL][1]) if _SUPERVISED_KERNEL in shapes else 0
  assignments = official_assignments(model_config, has_projection_head=has_projection_head,
                                     has_supervised_head=has_supervised_head)
  targets = _flax_shapes(model_config, num_classes)
  expected_modules = {"encoder"} | ({"projection_head"} if has_projection_head else set()) | (
      {"supervised_head"} if has_supervised_head else set())

  planned = {a.tf_name: a for a in assignments}
  missing = [f"{a.tf_name} (-> {'/'.join(a.target)})" for a in assignments
             if a.tf_name not in shapes]
  unexpected = [f"{name} {list(shape)}" for name, shape in sorted(shapes.items())
                if name not in planned]
  wrong_shape = [f"{a.tf_name} {list(shapes[a.tf_name])} -> {'/'.join(a.target)} "
                 f"{list(targets.get(a.target, ()))}"
                 for a in assignments if a.tf_name in shapes and a.target in targets
                 and shapes[a.tf_name] != targets[a.target]]
  no_place = ["/".join(a.target) for a in assignments if a.target not in targets]
  covered = {a.target for a in assignments}
  unfilled = ["/".join(key) for key in targets
              if key[1] in expected_modules and key not in covered]
  problems = [(missing, "missing from the checkpoint"),
              (unexpected, "in the checkpoint but not in the official layout of this model"),
              (wrong_shape, "wrong shape (checkpoint -> our model)"),
              (no_place, "no such variable in simclr_jax's model"),
              (unfilled, "simclr_jax model variables no checkpoint tensor fills")]
  if any(items for items, _ in problems):
    report = "\n".join(f"  {len(items)} {what}: {_listed(items)}" for items, what in problems
                       if items)
    raise ValueError(f"{prefix} does not match an official SimCLR model with config "
                     f"{dict(model_config)}:\n{report}")
  return Conversion(checkpoint_prefix=prefix, model_config=model_config,
                    assignments=tuple(assignments), has_projection_head=has_projection_head,
                    num_classes=num_classes, skipped=skipped)


def load_variables(conversion: Conversion) -> tuple[dict, dict]:
  """(params, batch_stats) trees keyed 'encoder', 'projection_head', 'supervised_head'."""
  reader = tf.train.load_checkpoint(conversion.checkpoint_prefix)
  trees = {"params": {}, "batch_stats": {}}
  for assignment in conversion.assignments:
    collection, *path, leaf = assignment.target
    node = trees[collection]
    for key in path:
      node = node.setdefault(key, {})
    node[leaf] = np.asarray(reader.get_tensor(assignment.tf_name), dtype=np.float32)
  return trees["params"], trees["batch_stats"]


def convert_checkpoint(checkpoint: str, out_dir: str, *, depth: int | None = None,
                       width_multiplier: float | None = None, sk_ratio: float | None = None,
                       supervised_head_input: str = "h") -> Conversion:
  """Converts an official TF1 checkpoint into an encoder export at `out_dir`.

  `supervised_head_input` records what the checkpoint's supervised head reads: 'h' for the
  pretrained (linear-eval head), SimCLRv1 and supervised checkpoints, 'hidden1' (projection-head
  layer 1, the official `--ft_proj_selector=1`) for SimCLRv2 fine-tuned and distilled ones.
  """
  if supervised_head_input not in SUPERVISED_HEAD_INPUTS:
    raise ValueError(f"supervised_head_input must be one of {SUPERVISED_HEAD_INPUTS}, got "
                     f"{supervised_head_input!r}")
  if os.path.exists(os.path.join(out_dir, export.VARIABLES_DIR)):  # before reading gigabytes
    raise FileExistsError(f"{out_dir} already holds an export; choose a new directory")
  conversion = plan_conversion(checkpoint, depth=depth, width_multiplier=width_multiplier,
                               sk_ratio=sk_ratio)
  if supervised_head_input == "hidden1" and not conversion.has_projection_head:
    raise ValueError("supervised_head_input='hidden1' needs a projection head, and "
                     f"{conversion.checkpoint_prefix} has none")
  params, batch_stats = load_variables(conversion)
  metadata = {
      "source": "google-research/simclr TF1 checkpoint",
      "checkpoint": conversion.checkpoint_prefix,
      "converted_tensors": len(conversion.assignments),
      "skipped_tensors": len(conversion.skipped),
      "has_projection_head": conversion.has_projection_head,
      "num_classes": conversion.num_classes,
      "supervised_head_input": supervised_head_input if conversion.num_classes else "",
      "preprocessing": "RGB in [0, 1], no mean/std; eval: centre crop 87.5% + bicubic to 224",
  }
  export.save_encoder(out_dir, model_config=conversion.model_config.to_dict(), params=params,
                      batch_stats=batch_stats, metadata=metadata)
  return conversion
