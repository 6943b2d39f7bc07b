"""Host input pipeline: TFDS or an image folder -> tf.data on every process -> global jax.Arrays.

Design, and why:
- Records are read undecoded (image bytes + label + the example's index in the requested split)
  straight from the prepared files, so reading never downloads, label-only passes are fast and
  skipping records on resume costs no decoding.
- The global batch is made of `data_shards` equal parts (one per process by default). Shard `s`
  owns a contiguous block of the split (or of the `subset`) and runs its own endless stream:
  epoch `e` is its examples shuffled with a seed derived from (seed, shard, e), then the epochs are
  concatenated and batched. Step `k` is therefore at stream position `k * shard_batch`. Shards up
  to SHUFFLE_BUFFER_SIZE examples are cached and shuffled by tf.data (a resume replays at most one
  cached epoch); larger ones follow windowed_shuffle's order, computed in NumPy, so a resume reads
  one window of records whatever its position.
- A file that cannot be decoded stops the iterator with a ValueError naming it (found after the
  error by decoding the failing batch's examples one by one: nothing is checked up front).
- Random host crops use stateless ops seeded by (seed, epoch, example index, view): the pixels of a
  batch do not depend on tf.data parallelism, on the mesh or on where the run was resumed.
- Each process builds the rows of the global batch that its devices hold and hands them to
  `jax.make_array_from_process_local_data`; a background thread keeps two device batches ready.
"""
import math
import re
from typing import Any, Callable, Iterable, Iterator

from absl import logging
import jax
import numpy as np
import tensorflow as tf

from simclr_jax.data import device_prefetch
from simclr_jax.data import host_crops
from simclr_jax.data import sources
from simclr_jax.data import windowed_shuffle

FOLDER_PREFIX = sources.FOLDER_PREFIX
SYNTHETIC_DATASET = sources.SYNTHETIC_DATASET
DatasetInfo = sources.DatasetInfo
HostCrop = host_crops.HostCrop
SHUFFLE_BUFFER_SIZE = 50_000  # shards up to this are cached and perfectly shuffled by tf.data
PREFETCH_BATCHES = 2
NO_CENTRE_CROP_MAX_SIZE = 32  # official: no eval crop for image sizes <= 32
# Seed purposes, so shuffle seeds and crop seeds never coincide.
_SHUFFLE_PURPOSE = 0
_CROP_PURPOSE = 1



def _derived_seed(seed: int, epoch: tf.Tensor, purpose: int, value: tf.Tensor) -> tf.Tensor:
  """A stateless [2] seed from (seed, epoch, purpose, value)."""
  key = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
  key = tf.random.experimental.stateless_fold_in(key, purpose)
  return tf.random.experimental.stateless_fold_in(key, value)


# ----------------------------------------------------------------------------------------------
# Checks and sharding.


def _check_int(name: str, value: Any, minimum: int = 1) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _batch_sharding(mesh: jax.sharding.Mesh, global_batch_size: int) -> tuple[
    jax.NamedSharding, int, int]:
  """Sharding over 'data' and the rows [start, stop) of the global batch this process feeds."""
  _check_int("global_batch_size", global_batch_size)
  if "data" not in mesh.axis_names:
    raise ValueError(f"the mesh needs a 'data' axis to shard the batch; its axes are "
                     f"{mesh.axis_names}")
  data_devices = mesh.shape["data"]
  if global_batch_size % data_devices or global_batch_size % jax.process_count():
    raise ValueError(
        f"global_batch_size={global_batch_size} does not divide over the mesh: {data_devices} "
        f"devices on its 'data' axis across {jax.process_count()} process(es). Use a multiple "
        f"of {math.lcm(data_devices, jax.process_count())}")
  sharding = jax.NamedSharding(mesh, jax.P("data"))
  row_ranges = sorted({(index[0].start or 0, global_batch_size if index[0].stop is None
                        else index[0].stop)
                       for index in sharding.addressable_devices_indices_map(
                           (global_batch_size,)).values()})
  if not row_ranges:
    raise ValueError("none of this process's devices are in the mesh")
  for (_, stop), (start, _) in zip(row_ranges, row_ranges[1:]):
    if stop != start:
      raise ValueError("this process's devices hold non-adjacent rows of the batch; build the "
                       "mesh with jax.make_mesh so each process's devices are contiguous")
  return sharding, row_ranges[0][0], row_ranges[-1][1]


def _check_subset(subset: Any, num_examples: int, split: str) -> np.ndarray:
  indices = np.asarray(subset)
  if indices.ndim != 1 or not indices.size or not np.issubdtype(indices.dtype, np.integer):
    raise ValueError(f"subset must be a non-empty 1-D array of example indices, got shape "
                     f"{indices.shape} dtype {indices.dtype}")
  indices = np.sort(indices)
  if indices[0] < 0 or indices[-1] >= num_examples:
    raise ValueError(f"subset indices must lie in [0, {num_examples}) for split {split!r}; "
                     f"got [{indices[0]}, {indices[-1]}]")
  if np.any(indices[1:] == indices[:-1]):
    raise ValueError("subset holds repeated example indices")
  return indices


def _naming_undecodable(batches: Iterator[dict[str, np.ndarray]],
                        undecoded_batch: Callable[[int], Iterable[dict[str, np.ndarray]]],
                        decode, source) -> Iterator[dict[str, np.ndarray]]:
  """`batches`; a decode error becomes a ValueError naming the example (file) that caused it.

  tf.data's error names no element, and checking every file when a folder is opened would cost
  one open per image (1.28M on ImageNet) per run: instead, after an error, the failing batch's
  undecoded examples (`undecoded_batch(batch number)`) are decoded one by one.
  """
  number = 0
  try:
    for batch in batches:
      yield batch
      number += 1
  except tf.errors.InvalidArgumentError as error:
    for example in undecoded_batch(number):
      try:
        decode({key: tf.constant(value) for key, value in example.items()})
      except tf.errors.InvalidArgumentError as example_error:
        reason = re.sub(r"\{\{.*?\}\}|\[Op:.*", "", example_error.message).strip(" .")
        raise ValueError(
            f"Cannot decode {source.describe(example)}: {reason}. Images must be "
            f"{host_crops.ALLOWED_IMAGES}; re-encode or remove it") from error
    raise


def _tf_options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  return options


# ----------------------------------------------------------------------------------------------
# Public API.


def get_dataset_info(name: str, data_dir: str | None = None) -> DatasetInfo:
  """Classes, split sizes and image shape; prepares synthetic_shapes on first use."""
  return sources.open_source(name, data_dir).info


def create_train_iterator(dataset: str, *, data_dir: str | None, split: str,
                          global_batch_size: int, image_size: int, host_crop_views: int,
                          seed: int, start_step: int = 0, mesh: jax.sharding.Mesh,
                          subset: np.ndarray | None = None,
                          data_shards: int | None = None,
                          host_crop: HostCrop | None = None) -> Iterator[dict[str, jax.Array]]:
  """Endless global batches {'image', 'label', 'index'}, deterministic given (seed, start_step).

  `image` is uint8 [B, H, W, 3] with host_crop_views == 0 (fixed-size datasets at their own size
  H x W: the device crops from the full image and resizes to image_size, as the official code
  does) or [B, V, image_size, image_size, 3] with V = host_crop_views random resized crops per
  image, sampled as `host_crop` says (HostCrop.from_augment_config(config.augment): the
  augmentation's random_resized_crop; required with host crops, unused without). `index` is the
  example's index in `split`.
  `data_shards` (default: the process count) fixes how the global batch is split into independent
  streams; runs with the same value give the same global batches on any number of processes that
  divides it.
  """
  source = sources.open_source(dataset, data_dir)
  info = source.info
  _check_int("image_size", image_size)
  _check_int("host_crop_views", host_crop_views, minimum=0)
  _check_int("start_step", start_step, minimum=0)
  if host_crop_views and not isinstance(host_crop, HostCrop):
    raise ValueError(
        f"host_crop_views={host_crop_views} crops on the host as the augmentation's "
        f"random_resized_crop says, but host_crop={host_crop!r}: pass "
        "host_crop=HostCrop.from_augment_config(config.augment), whose ops need "
        "'random_resized_crop' (or set host_crop_views=0 to crop on the device)")
  if host_crop_views == 0 and info.image_shape is None:
    raise ValueError(
        f"{dataset!r} has images of different sizes, so they cannot be batched for on-device "
        "crops: set host_crop_views >= 1 to crop them on the host")
  pieces, num_examples = sources.resolve_split(source, split)
  sharding, row_start, row_stop = _batch_sharding(mesh, global_batch_size)
  data_shards = jax.process_count() if data_shards is None else data_shards
  _check_int("data_shards", data_shards)
  shard_batch = global_batch_size // data_shards
  if global_batch_size % data_shards or row_start % shard_batch or row_stop % shard_batch:
    raise ValueError(
        f"data_shards={data_shards} must divide global_batch_size={global_batch_size} and be a "
        f"multiple of the process count ({jax.process_count()})")
  members = (np.arange(num_examples) if subset is None
             else _check_subset(subset, num_examples, split))
  if members.size < data_shards:
    raise ValueError(f"{members.size} examples cannot feed {data_shards} data shards")
  _warn_if_upsampling(info, image_size)

  def decode(example):
    image_bytes = source.image_bytes(example["image"])
    if host_crop_views:
      seeds = [tf.random.experimental.stateless_fold_in(
          _derived_seed(seed, example["epoch"], _CROP_PURPOSE, example["index"]), view)
               for view in range(host_crop_views)]
      image = host_crops.random_resized_crops(image_bytes, seeds, image_size, host_crop)
      image = tf.ensure_shape(image, [host_crop_views, image_size, image_size, 3])
    else:  # full resolution: the device crops from it and resizes to image_size
      image = tf.ensure_shape(host_crops.decode_rgb(image_bytes), info.image_shape[:2] + (3,))
    return {"image": image, "label": tf.cast(example["label"], tf.int32),
            "index": tf.cast(example["index"], tf.int32)}

  shards = range(row_start // shard_batch, row_stop // shard_batch)

  def shard_stream(shard, start_position, decode):
    shard_members = members[shard * members.size // data_shards:
                            (shard + 1) * members.size // data_shards]
    return _shard_stream(source, pieces, shard_members, seed=seed, shard=shard,
                         start_position=start_position, batch_size=shard_batch, decode=decode)

  def undecoded_batch(number):
    for shard in shards:
      yield from shard_stream(shard, (start_step + number) * shard_batch, lambda example: example
                              ).take(1).unbatch().as_numpy_iterator()

  streams = [shard_stream(shard, start_step * shard_batch, decode) for shard in shards]
  batches = streams[0] if len(streams) == 1 else tf.data.Dataset.zip(tuple(streams)).map(
      lambda *parts: {key: tf.concat([part[key] for part in parts], 0) for key in parts[0]})
  batches = batches.prefetch(tf.data.AUTOTUNE).with_options(_tf_options())
  return device_prefetch.Prefetcher(
      _naming_undecodable(batches.as_numpy_iterator(), undecoded_batch, decode, source),
      device_prefetch.to_global(sharding, global_batch_size), prefetch_batches=PREFETCH_BATCHES)


def _shard_stream(source, pieces, members: np.ndarray, *, seed: int, shard: int,
                  start_position: int, batch_size: int, decode) -> tf.data.Dataset:
  """One shard's batches from stream position `start_position` on (epochs back to back).

  Up to SHUFFLE_BUFFER_SIZE members: tf.data's perfect shuffle of the cached undecoded records;
  a resume replays at most one epoch from the cache. Above it (nothing can be cached): the
  position-indexed order of windowed_shuffle, so a resume reads one window of
  SHUFFLE_BUFFER_SIZE // 2 records (two windows in memory: one buffer's worth), not an epoch.
  """
  if members.size > SHUFFLE_BUFFER_SIZE:
    window_size = SHUFFLE_BUFFER_SIZE // 2
    block_size = (1 if source.random_access
                  else max(1, window_size // windowed_shuffle.BLOCKS_PER_WINDOW))
    stream = windowed_shuffle.stream(
        source.range_reader(pieces), members, window_size=window_size, block_size=block_size,
        seed=seed, shard=shard, start_position=start_position)
  else:
    stream = _cached_shuffle_stream(source, pieces, members, seed=seed, shard=shard,
                                    start_position=start_position)
  stream = stream.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return stream.batch(batch_size, drop_remainder=True)


def _cached_shuffle_stream(source, pieces, members: np.ndarray, *, seed: int, shard: int,
                           start_position: int) -> tf.data.Dataset:
  start, stop = int(members[0]), int(members[-1]) + 1
  examples = sources.read_positions(source, pieces, start, stop)
  if members.size < stop - start:
    keep = np.zeros(stop - start, bool)
    keep[members - start] = True
    keep = tf.constant(keep)
    examples = examples.filter(lambda example: tf.gather(keep, example["index"] - start))
  examples = examples.cache()  # undecoded; read the files once, not every epoch

  def epoch(number):
    shuffle_seed = tf.random.stateless_uniform(
        [], seed=_derived_seed(seed, number, _SHUFFLE_PURPOSE, shard), minval=None,
        maxval=None, dtype=tf.int64)
    return examples.shuffle(members.size, seed=shuffle_seed).map(
        lambda example: {**example, "epoch": number})

  first_epoch, offset = divmod(start_position, members.size)
  return tf.data.Dataset.counter(first_epoch).flat_map(epoch).skip(offset)


def _warn_if_upsampling(info: DatasetInfo, image_size: int) -> None:
  if info.image_shape and min(info.image_shape[:2]) < image_size:
    logging.warning(
        "%s images are %dx%d, smaller than image_size=%d: every image is upsampled (right for "
        "probing an encoder trained at that size, wasteful for pretraining)", info.name,
        info.image_shape[0], info.image_shape[1], image_size)


class _EvalBatches:
  """One deterministic pass per iteration; padding rows have mask False and index -1."""

  def __init__(self, make_batches: Callable[[], Iterator[dict[str, np.ndarray]]],
               to_device, num_batches: int, num_examples: int):
    self._make_batches = make_batches
    self._to_device = to_device
    self.num_batches = num_batches
    self.num_examples = num_examples

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    return device_prefetch.Prefetcher(self._make_batches(), self._to_device,
                                      prefetch_batches=PREFETCH_BATCHES)


def create_eval_iterator(dataset: str, *, data_dir: str | None, split: str,
                         global_batch_size: int, image_size: int,
                         mesh: jax.sharding.Mesh) -> _EvalBatches:
  """Global batches {'image' uint8 [B,S,S,3], 'label', 'index', 'mask'} covering `split` once.

  Centre crop of 87.5% of the shorter side then bicubic resize (only the resize for image_size
  <= 32). Every process yields the same number of batches; each example appears exactly once
  with mask True. Iterating again makes a new pass.
  """
  source = sources.open_source(dataset, data_dir)
  _check_int("image_size", image_size)
  pieces, num_examples = sources.resolve_split(source, split)
  sharding, row_start, row_stop = _batch_sharding(mesh, global_batch_size)
  local_batch = row_stop - row_start
  slots = global_batch_size // local_batch
  slot = row_start // local_batch
  start, stop = slot * num_examples // slots, (slot + 1) * num_examples // slots
  num_batches = math.ceil(math.ceil(num_examples / slots) / local_batch)
  _warn_if_upsampling(source.info, image_size)

  def decode(example):
    image = host_crops.decode_rgb(source.image_bytes(example["image"]))
    if image_size > NO_CENTRE_CROP_MAX_SIZE:
      image = host_crops.resize(host_crops.centre_crop(image), image_size)
    elif source.info.image_shape is None or source.info.image_shape[:2] != (image_size,
                                                                           image_size):
      image = host_crops.resize(image, image_size)
    return {"image": tf.ensure_shape(image, [image_size, image_size, 3]),
            "label": tf.cast(example["label"], tf.int32),
            "index": tf.cast(example["index"], tf.int32)}

  def make_batches():
    batches = iter(())  # a process whose share is empty feeds padding only
    if stop > start:
      examples = sources.read_positions(source, pieces, start, stop).map(
          decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
      batches = examples.batch(local_batch).prefetch(tf.data.AUTOTUNE).with_options(
          _tf_options()).as_numpy_iterator()
      batches = _naming_undecodable(batches, lambda number: sources.read_positions(
          source, pieces, start, stop).skip(number * local_batch).take(
              local_batch).as_numpy_iterator(), decode, source)
    for _ in range(num_batches):
      yield _padded(next(batches, None), local_batch, image_size)

  return _EvalBatches(make_batches, device_prefetch.to_global(sharding, global_batch_size),
                      num_batches, num_examples)


def _padded(batch: dict[str, np.ndarray] | None, size: int, image_size: int
            ) -> dict[str, np.ndarray]:
  count = 0 if batch is None else len(batch["label"])
  padded = {"image": np.zeros((size, image_size, image_size, 3), np.uint8),
            "label": np.zeros(size, np.int32),
            "index": np.full(size, -1, np.int32),
            "mask": np.arange(size) < count}
  if count:
    for key in ("image", "label", "index"):
      padded[key][:count] = batch[key]
  return padded


def label_subset(dataset: str, *, data_dir: str | None, split: str,
                 fraction: float | None = None, per_class: int | None = None,
                 seed: int) -> np.ndarray:
  """Sorted example indices: the same number from every class, chosen by `seed`.

  `fraction` (e.g. 0.01, 0.1) takes round(fraction * num_examples / num_classes) per class,
  `per_class` takes exactly that many. Reads labels only.
  """
  if (fraction is None) == (per_class is None):
    raise ValueError(f"give exactly one of fraction or per_class, got fraction={fraction!r}, "
                     f"per_class={per_class!r}")
  source = sources.open_source(dataset, data_dir)
  pieces, num_examples = sources.resolve_split(source, split)
  num_classes = source.info.num_classes
  if fraction is not None:
    if not 0 < fraction <= 1:
      raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    per_class = max(1, round(fraction * num_examples / num_classes))
  _check_int("per_class", per_class)
  labels = np.concatenate([source.labels(piece) for piece in pieces])
  rng = np.random.default_rng(seed)
  chosen = []
  for label, class_name in enumerate(source.info.class_names):
    candidates = np.flatnonzero(labels == label)
    if candidates.size < per_class:
      raise ValueError(
          f"class {class_name!r} of {dataset!r} split {split!r} has {candidates.size} examples, "
          f"fewer than the {per_class} per class requested")
    chosen.append(rng.choice(candidates, per_class, replace=False))
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def train_iterator_from_config(config: Any, *, mesh: jax.sharding.Mesh, start_step: int,
                               subset: np.ndarray | None = None
                               ) -> Iterator[dict[str, jax.Array]]:
  """`create_train_iterator` with a job config's data fields (dataset, data_dir, train_split,
  batch, image size, host crops as `config.augment` samples them, seed, data_shards: 0 = one
  stream per process, create_train_iterator's default)."""
  return create_train_iterator(
      config.dataset, data_dir=config.data_dir or None, split=config.train_split,
      global_batch_size=config.global_batch_size, image_size=config.image_size,
      host_crop_views=config.host_crop_views, seed=config.seed, start_step=start_step,
      mesh=mesh, subset=subset, data_shards=config.data_shards or None,
      host_crop=HostCrop.from_augment_config(config.augment) if config.host_crop_views else None)
