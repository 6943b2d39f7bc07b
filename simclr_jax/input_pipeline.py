"""Host input pipeline: TFDS or an image folder -> tf.data on every process -> global jax.Arrays.

Design, and why:
- Records are read undecoded (image bytes + label + the example's index in the requested split)
  straight from the prepared files, so reading never downloads, label-only passes are fast and
  skipping records on resume costs no decoding.
- The global batch is made of `data_shards` equal parts (one per process by default). Shard `s`
  owns a contiguous block of the split (or of the `subset`) and runs its own endless stream:
  epoch `e` is its examples shuffled with a seed derived from (seed, shard, e), then the epochs are
  concatenated and batched. Step `k` is therefore at stream position `k * shard_batch`, so resuming
  at any step computes the epoch and offset and skips only that many undecoded records of one epoch.
- Random host crops use stateless ops seeded by (seed, epoch, example index, view): the pixels of a
  batch do not depend on tf.data parallelism, on the mesh or on where the run was resumed.
- Each process builds the rows of the global batch that its devices hold and hands them to
  `jax.make_array_from_process_local_data`; a background thread keeps two device batches ready.
"""
import dataclasses
import difflib
import fcntl
import math
import os
import queue
import threading
from typing import Any, Callable, Iterator, Mapping

from absl import logging
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from simclr_jax import augment
from simclr_jax.data import synthetic_shapes

FOLDER_PREFIX = "folder:"
SYNTHETIC_DATASET = synthetic_shapes.SyntheticShapes.name  # importing the module registers it
SHUFFLE_BUFFER_SIZE = 50_000  # whole shards of CIFAR/STL/flowers/imagenette: perfect shuffles
PREFETCH_BATCHES = 2
CENTRE_CROP_FRACTION = 0.875
NO_CENTRE_CROP_MAX_SIZE = 32  # official: no eval crop for image sizes <= 32
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_READ_PARALLEL_FILES = 16
_PARSE_BATCH = 1024
_CROP_DEFAULTS = augment.OP_DEFAULTS["random_resized_crop"]
# Seed purposes, so shuffle seeds and crop seeds never coincide.
_SHUFFLE_PURPOSE = 0
_CROP_PURPOSE = 1


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer and evaluators need to know about a dataset before reading it."""
  name: str
  num_classes: int
  class_names: tuple[str, ...]
  split_sizes: dict[str, int]
  image_shape: tuple[int, int, int] | None  # as delivered (always 3 channels); None: sizes vary


@dataclasses.dataclass(frozen=True)
class _Range:
  """Examples [start, stop) of a stored split, at positions first_index... of the requested one."""
  split: str
  start: int
  stop: int
  first_index: int


# ----------------------------------------------------------------------------------------------
# Sources: undecoded records {'index': int64, 'label': int64, 'image': bytes or path} in order.


class _TfdsSource:
  """A prepared TFDS dataset, read from its files directly (parsing in batches, no decoding)."""

  def __init__(self, name: str, builder: tfds.core.DatasetBuilder):
    self.builder = builder
    features = builder.info.features
    self.image_key, self.label_key = builder.info.supervised_keys or ("image", "label")
    image_feature = features[self.image_key] if self.image_key in features else None
    label_feature = features[self.label_key] if self.label_key in features else None
    if not (isinstance(image_feature, tfds.features.Image)
            and isinstance(label_feature, tfds.features.ClassLabel)):
      raise ValueError(
          f"{name!r} is not an image-classification dataset: it needs an Image feature "
          f"{self.image_key!r} and a ClassLabel feature {self.label_key!r}; its features are "
          f"{features}")
    height, width, _ = image_feature.shape
    self.split_infos = dict(builder.info.splits)
    self.info = DatasetInfo(
        name=name, num_classes=label_feature.num_classes, class_names=tuple(label_feature.names),
        split_sizes={split: info.num_examples for split, info in self.split_infos.items()},
        image_shape=(height, width, 3) if height and width else None)

  def read(self, piece: _Range, *, with_images: bool = True) -> tf.data.Dataset:
    instructions = self.builder.info.splits[
        f"{piece.split}[{piece.start}:{piece.stop}]"].file_instructions
    counts = [instruction.take for instruction in instructions]
    first_indices = piece.first_index + np.cumsum([0] + counts[:-1])
    adapter = tfds.core.file_adapters.ADAPTER_FOR_FORMAT[
        self.builder.info.file_format or tfds.core.file_adapters.FileFormat.TFRECORD]

    def file_records(path, skip, take, first_index):
      records = adapter.make_tf_data(path).skip(skip).take(take)
      return tf.data.Dataset.zip(records, tf.data.Dataset.range(first_index, first_index + take))

    files = tf.data.Dataset.from_tensor_slices((
        [os.fspath(instruction.filename) for instruction in instructions],
        np.array([instruction.skip for instruction in instructions], np.int64),
        np.array(counts, np.int64), first_indices.astype(np.int64)))
    records = files.interleave(
        file_records, cycle_length=min(_READ_PARALLEL_FILES, len(instructions)),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    spec = {self.label_key: tf.io.FixedLenFeature([], tf.int64)}
    if with_images:
      spec[self.image_key] = tf.io.FixedLenFeature([], tf.string)

    def parse(serialized, index):
      example = tf.io.parse_example(serialized, spec)
      parsed = {"index": index, "label": example[self.label_key]}
      if with_images:
        parsed["image"] = example[self.image_key]
      return parsed

    return records.batch(_PARSE_BATCH).map(parse, num_parallel_calls=tf.data.AUTOTUNE).unbatch()

  def labels(self, piece: _Range) -> np.ndarray:
    labels = np.empty(piece.stop - piece.start, np.int64)
    for batch in self.read(piece, with_images=False).batch(8192).as_numpy_iterator():
      labels[batch["index"] - piece.first_index] = batch["label"]
    return labels

  def image_bytes(self, image: tf.Tensor) -> tf.Tensor:
    return image


class _FolderSource:
  """`root/<split>/<class>/*.{jpg,jpeg,png}` (the layout of tfds.folder_dataset.ImageFolder)."""

  def __init__(self, name: str, root: str):
    if not tf.io.gfile.isdir(root):
      raise FileNotFoundError(
          f"{name!r}: image folder {root} does not exist; expected {root}/<split>/<class>/*.jpg")
    subdirs = lambda path: sorted(
        entry for entry in tf.io.gfile.listdir(path)
        if tf.io.gfile.isdir(os.path.join(path, entry)))
    splits = subdirs(root)
    class_names = sorted({name for split in splits for name in subdirs(os.path.join(root, split))})
    self.examples: dict[str, tuple[list[str], np.ndarray]] = {}
    for split in splits:
      paths, labels = [], []
      for label, class_name in enumerate(class_names):
        class_dir = os.path.join(root, split, class_name)
        if tf.io.gfile.isdir(class_dir):
          files = sorted(entry for entry in tf.io.gfile.listdir(class_dir)
                         if entry.lower().endswith(_IMAGE_EXTENSIONS))
          paths += [os.path.join(class_dir, entry) for entry in files]
          labels += [label] * len(files)
      if paths:
        self.examples[split] = (paths, np.array(labels, np.int64))
    if not self.examples:
      raise FileNotFoundError(
          f"{name!r}: no {'/'.join(_IMAGE_EXTENSIONS)} images under {root}/<split>/<class>/")
    self.split_infos = {
        split: tfds.core.SplitInfo(name=split, shard_lengths=[len(paths)], num_bytes=0)
        for split, (paths, _) in self.examples.items()}
    self.info = DatasetInfo(
        name=name, num_classes=len(class_names), class_names=tuple(class_names),
        split_sizes={split: len(paths) for split, (paths, _) in self.examples.items()},
        image_shape=None)

  def read(self, piece: _Range) -> tf.data.Dataset:
    paths, labels = self.examples[piece.split]
    return tf.data.Dataset.from_tensor_slices({
        "index": np.arange(piece.first_index, piece.first_index + piece.stop - piece.start),
        "label": labels[piece.start:piece.stop],
        "image": paths[piece.start:piece.stop],
    })

  def labels(self, piece: _Range) -> np.ndarray:
    return self.examples[piece.split][1][piece.start:piece.stop]

  def image_bytes(self, path: tf.Tensor) -> tf.Tensor:
    return tf.io.read_file(path)  # after shuffling and skipping: only read what is decoded


def _open_source(dataset: str, data_dir: str | None) -> _TfdsSource | _FolderSource:
  if not isinstance(dataset, str) or not dataset:
    raise ValueError(f"dataset must be a TFDS name or '{FOLDER_PREFIX}/path', got {dataset!r}")
  if dataset.startswith(FOLDER_PREFIX):
    return _FolderSource(dataset, os.path.expanduser(dataset[len(FOLDER_PREFIX):]))
  return _TfdsSource(dataset, _prepared_builder(dataset, data_dir))


def _prepared_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The TFDS builder of prepared data; never downloads (synthetic_shapes is generated here)."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    known = tfds.list_builders(with_community_datasets=False) + [SYNTHETIC_DATASET]
    suggestions = difflib.get_close_matches(name, known, n=3)
    raise ValueError(
        f"Unknown dataset {name!r}"
        + (f" (did you mean {', '.join(map(repr, suggestions))}?)" if suggestions else "")
        + ". Use a TFDS name (list them with `python -c \"import tensorflow_datasets as tfds; "
        "print(tfds.list_builders())\"` or see https://www.tensorflow.org/datasets/catalog/"
        f"overview), {SYNTHETIC_DATASET!r} (generated locally), or "
        f"'{FOLDER_PREFIX}/path/to/root' for images in root/<split>/<class>/*.jpg") from None
  if builder.name == SYNTHETIC_DATASET and not builder.is_prepared():
    builder = _prepare_synthetic_shapes(name, data_dir, builder.data_dir)
  if not builder.is_prepared():
    dataset_dir = os.path.dirname(builder.data_dir)
    versions = (sorted(tf.io.gfile.listdir(dataset_dir)) if tf.io.gfile.isdir(dataset_dir)
                else [])
    raise FileNotFoundError(
        f"Dataset {name!r} is not prepared: TFDS looked in {builder.data_dir}"
        + (f" ({dataset_dir} holds {versions})" if versions else "")
        + f" for data_dir={data_dir!r}. This pipeline never downloads. Prepare it on a machine "
        f"with network access: `tfds build {builder.name} --data_dir=DIR` (or "
        f"tfds.builder({builder.name!r}, data_dir=DIR).download_and_prepare()), then pass DIR "
        "(or a copy of it) as data_dir")
  return builder


def _prepare_synthetic_shapes(name: str, data_dir: str | None,
                              version_dir: str) -> tfds.core.DatasetBuilder:
  """Generates the dataset once; a file lock makes concurrent local processes wait for it."""
  dataset_dir = os.path.dirname(version_dir)
  os.makedirs(dataset_dir, exist_ok=True)
  with open(os.path.join(dataset_dir, ".prepare.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    builder = tfds.builder(name, data_dir=data_dir)  # another process may have finished it
    if not builder.is_prepared():
      logging.info("Generating %s into %s", SYNTHETIC_DATASET, version_dir)
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


def _resolve_split(source, split: str) -> tuple[list[_Range], int]:
  """TFDS split spec ('train', 'train[:90%]', 'train+test') -> stored ranges and total size."""
  sizes = source.info.split_sizes
  try:
    instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(source.split_infos)
  except (ValueError, TypeError, AttributeError) as error:
    raise ValueError(
        f"Unknown split {split!r} of {source.info.name!r}: available splits are {sizes} "
        f"(TFDS slices such as 'train[:90%]' work too). TFDS says: {error}") from None
  pieces, total = [], 0
  for instruction in instructions:
    start, stop, _ = slice(instruction.from_, instruction.to).indices(
        sizes[instruction.splitname])
    if stop > start:
      pieces.append(_Range(instruction.splitname, start, stop, total))
      total += stop - start
  if not total:
    raise ValueError(f"Split {split!r} of {source.info.name!r} selects no examples ({sizes})")
  return pieces, total


def _read_positions(source, pieces: list[_Range], start: int, stop: int) -> tf.data.Dataset:
  """Records at positions [start, stop) of the requested split, in order."""
  parts = []
  for piece in pieces:
    first = max(start, piece.first_index)
    last = min(stop, piece.first_index + piece.stop - piece.start)
    if last > first:
      offset = piece.start - piece.first_index
      parts.append(source.read(_Range(piece.split, first + offset, last + offset, first)))
  records = parts[0]
  for part in parts[1:]:
    records = records.concatenate(part)
  return records


# ----------------------------------------------------------------------------------------------
# Decoding and cropping (uint8 in, uint8 out: 4x less host->device traffic than float32).


@dataclasses.dataclass(frozen=True)
class HostCrop:
  """How the host samples its random resized crops: the augmentation config's
  `random_resized_crop` parameters (names and defaults of augment.OP_DEFAULTS), so host and device
  crops have one source. `p` (one number, or one per view) is the chance of cropping at all;
  otherwise the whole image is resized, as on the device."""
  p: float | tuple[float, ...] = _CROP_DEFAULTS["p"]
  area_min: float = _CROP_DEFAULTS["area_min"]
  area_max: float = _CROP_DEFAULTS["area_max"]
  aspect_ratio_min: float = _CROP_DEFAULTS["aspect_ratio_min"]
  aspect_ratio_max: float = _CROP_DEFAULTS["aspect_ratio_max"]
  max_attempts: int = _CROP_DEFAULTS["max_attempts"]
  min_object_covered: float = _CROP_DEFAULTS["min_object_covered"]

  def __post_init__(self):
    augment.validate({"ops": ("random_resized_crop",),
                      "random_resized_crop": dataclasses.asdict(self)})

  @classmethod
  def from_augment_config(cls, aug_config) -> "HostCrop | None":
    """The pipeline's random_resized_crop parameters; None if its `ops` have no such crop (then
    create_train_iterator refuses host crops)."""
    augment.validate(aug_config)
    aug_config = augment.resolve_config(aug_config)
    if "random_resized_crop" not in aug_config["ops"]:
      return None
    params = dict(aug_config.get("random_resized_crop", {}))
    if isinstance(params.get("p"), (list, tuple)):
      params["p"] = tuple(params["p"])
    return cls(**params)

  def probability(self, view: int) -> float:
    if not isinstance(self.p, tuple):
      return float(self.p)
    if view >= len(self.p):
      raise ValueError(f"random_resized_crop.p={self.p} has probabilities for {len(self.p)} "
                       f"views, but the host crops {view + 1} or more")
    return float(self.p[view])


def _decode_rgb(image_bytes: tf.Tensor) -> tf.Tensor:
  """Any PNG/JPEG/BMP/GIF; grayscale is repeated and alpha dropped, so the result is RGB."""
  return tf.io.decode_image(image_bytes, channels=3, expand_animations=False)


def _resize(image: tf.Tensor, size: int) -> tf.Tensor:
  """Bicubic to [size, size, 3] uint8. TF's bicubic kernel runs 10-15% faster on float32 than
  on uint8, and quantize clips (bicubic overshoots) and rounds in one pass where clip, round and
  cast take twice as long (ties round up instead of to even)."""
  resized = tf.image.resize(tf.cast(image, tf.float32), [size, size],
                            method=tf.image.ResizeMethod.BICUBIC)
  return tf.bitcast(tf.raw_ops.QuantizeV2(  # tf.quantization.quantize logs a deprecation
      input=resized, min_range=0.0, max_range=255.0, T=tf.quint8, mode="MIN_COMBINED",
      round_mode="HALF_AWAY_FROM_ZERO").output, tf.uint8)


def _crop_window(image_shape: tf.Tensor, seed: tf.Tensor, crop: HostCrop, view: int
                 ) -> tf.Tensor:
  """[offset_y, offset_x, height, width] of the official random-resized-crop sampling."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
      min_object_covered=crop.min_object_covered,
      aspect_ratio_range=(crop.aspect_ratio_min, crop.aspect_ratio_max),
      area_range=(crop.area_min, crop.area_max), max_attempts=crop.max_attempts,
      use_image_if_no_bounding_boxes=True)
  window = tf.stack([begin[0], begin[1], size[0], size[1]])
  probability = crop.probability(view)
  if probability >= 1.0:
    return window
  coin = tf.random.stateless_uniform([], seed=tf.random.experimental.stateless_fold_in(seed, 1))
  whole_image = tf.stack([0, 0, image_shape[0], image_shape[1]])
  return tf.where(coin < probability, window, whole_image)


def _random_resized_crops(image_bytes: tf.Tensor, seeds: list[tf.Tensor], size: int,
                          crop: HostCrop) -> tf.Tensor:
  """[V, size, size, 3] uint8, view v from seeds[v].

  A JPEG is decoded once and only inside the box holding every view's window
  (decode_and_crop_jpeg): less work than decoding the whole image, or each window on its own (a
  decode reads the compressed rows above its window too). experiments/results/
  host_crop_throughput.md measures it against the official per-image preprocessing.
  """

  def windows(image_shape):
    return tf.stack([_crop_window(image_shape, seed, crop, view)
                     for view, seed in enumerate(seeds)])

  def resized_views(image, views):
    resized = []
    for view in tf.unstack(views):
      top, left, height, width = tf.unstack(view)
      resized.append(_resize(image[top:top + height, left:left + width], size))
    return tf.stack(resized)

  def from_jpeg():
    views = windows(tf.image.extract_jpeg_shape(image_bytes))
    corner = tf.reduce_min(views[:, :2], axis=0)
    extent = tf.reduce_max(views[:, :2] + views[:, 2:], axis=0) - corner
    image = tf.image.decode_and_crop_jpeg(image_bytes, tf.concat([corner, extent], 0),
                                          channels=3)
    return resized_views(image, views - tf.concat([corner, [0, 0]], 0))

  def from_other_formats():
    image = _decode_rgb(image_bytes)
    return resized_views(image, windows(tf.shape(image)))

  return tf.cond(tf.io.is_jpeg(image_bytes), from_jpeg, from_other_formats)


def _centre_crop(image: tf.Tensor) -> tf.Tensor:
  """The central square keeping 87.5% of the shorter side (official `center_crop`)."""
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  side = tf.cast(tf.math.rint(CENTRE_CROP_FRACTION * tf.cast(tf.minimum(height, width),
                                                              tf.float32)), tf.int32)
  top, left = (height - side + 1) // 2, (width - side + 1) // 2
  return image[top:top + side, left:left + side]


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


class _Prefetcher:
  """Iterates `batches` on a thread, `PREFETCH_BATCHES` device batches ahead of the consumer."""

  _END = object()

  def __init__(self, batches: Iterator[dict[str, np.ndarray]],
               to_device: Callable[[dict[str, np.ndarray]], dict[str, jax.Array]]):
    self._queue = queue.Queue(maxsize=PREFETCH_BATCHES)
    self._stop = threading.Event()
    # The thread must not reference `self`, so dropping the iterator stops it (see __del__).
    self._thread = threading.Thread(
        target=_produce, args=(batches, to_device, self._queue, self._stop), daemon=True)
    self._thread.start()

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    item = self._queue.get()
    if item is _Prefetcher._END:
      self._queue.put(item)
      raise StopIteration
    if isinstance(item, BaseException):
      self._queue.put(item)
      raise item
    return item

  def close(self) -> None:
    """Stops the thread and waits for it, so no batch is produced after the caller moves on."""
    self._stop.set()
    if self._thread is not threading.current_thread():
      self._thread.join()

  def __del__(self):
    self._stop.set()


def _produce(batches, to_device, output: queue.Queue, stop: threading.Event) -> None:
  def put(item) -> bool:
    while not stop.is_set():
      try:
        output.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  try:
    for batch in batches:
      if not put(to_device(batch)):
        return
    put(_Prefetcher._END)
  except Exception as error:  # re-raised in the consumer's thread  # pylint: disable=broad-except
    put(error)


def _to_global(sharding: jax.NamedSharding, global_batch_size: int):
  def to_device(batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    return {key: jax.make_array_from_process_local_data(
        sharding, value, (global_batch_size,) + value.shape[1:]) for key, value in batch.items()}
  return to_device


def _tf_options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  return options


# ----------------------------------------------------------------------------------------------
# Public API.


def get_dataset_info(name: str, data_dir: str | None = None) -> DatasetInfo:
  """Classes, split sizes and image shape; prepares synthetic_shapes on first use."""
  return _open_source(name, data_dir).info


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
  source = _open_source(dataset, data_dir)
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
  pieces, num_examples = _resolve_split(source, split)
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
      image = _random_resized_crops(image_bytes, seeds, image_size, host_crop)
      image = tf.ensure_shape(image, [host_crop_views, image_size, image_size, 3])
    else:  # full resolution: the device crops from it and resizes to image_size
      image = tf.ensure_shape(_decode_rgb(image_bytes), info.image_shape[:2] + (3,))
    return {"image": image, "label": tf.cast(example["label"], tf.int32),
            "index": tf.cast(example["index"], tf.int32)}

  streams = []
  for shard in range(row_start // shard_batch, row_stop // shard_batch):
    shard_members = members[shard * members.size // data_shards:
                            (shard + 1) * members.size // data_shards]
    streams.append(_shard_stream(
        source, pieces, shard_members, seed=seed, shard=shard,
        start_position=start_step * shard_batch, batch_size=shard_batch, decode=decode))
  batches = streams[0] if len(streams) == 1 else tf.data.Dataset.zip(tuple(streams)).map(
      lambda *parts: {key: tf.concat([part[key] for part in parts], 0) for key in parts[0]})
  batches = batches.prefetch(tf.data.AUTOTUNE).with_options(_tf_options())
  return _Prefetcher(batches.as_numpy_iterator(), _to_global(sharding, global_batch_size))


def _shard_stream(source, pieces, members: np.ndarray, *, seed: int, shard: int,
                  start_position: int, batch_size: int, decode) -> tf.data.Dataset:
  """One shard's batches from stream position `start_position` on (epochs back to back)."""
  start, stop = int(members[0]), int(members[-1]) + 1
  examples = _read_positions(source, pieces, start, stop)
  if members.size < stop - start:
    keep = np.zeros(stop - start, bool)
    keep[members - start] = True
    keep = tf.constant(keep)
    examples = examples.filter(lambda example: tf.gather(keep, example["index"] - start))
  if members.size <= SHUFFLE_BUFFER_SIZE:
    examples = examples.cache()  # undecoded; read the files once, not every epoch
  buffer_size = min(members.size, SHUFFLE_BUFFER_SIZE)

  def epoch(number):
    shuffle_seed = tf.random.stateless_uniform(
        [], seed=_derived_seed(seed, number, _SHUFFLE_PURPOSE, shard), minval=None,
        maxval=None, dtype=tf.int64)
    return examples.shuffle(buffer_size, seed=shuffle_seed).map(
        lambda example: {**example, "epoch": number})

  first_epoch, offset = divmod(start_position, members.size)
  stream = tf.data.Dataset.counter(first_epoch).flat_map(epoch).skip(offset)
  stream = stream.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return stream.batch(batch_size, drop_remainder=True)


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
    return _Prefetcher(self._make_batches(), self._to_device)


def create_eval_iterator(dataset: str, *, data_dir: str | None, split: str,
                         global_batch_size: int, image_size: int,
                         mesh: jax.sharding.Mesh) -> _EvalBatches:
  """Global batches {'image' uint8 [B,S,S,3], 'label', 'index', 'mask'} covering `split` once.

  Centre crop of 87.5% of the shorter side then bicubic resize (only the resize for image_size
  <= 32). Every process yields the same number of batches; each example appears exactly once
  with mask True. Iterating again makes a new pass.
  """
  source = _open_source(dataset, data_dir)
  _check_int("image_size", image_size)
  pieces, num_examples = _resolve_split(source, split)
  sharding, row_start, row_stop = _batch_sharding(mesh, global_batch_size)
  local_batch = row_stop - row_start
  slots = global_batch_size // local_batch
  slot = row_start // local_batch
  start, stop = slot * num_examples // slots, (slot + 1) * num_examples // slots
  num_batches = math.ceil(math.ceil(num_examples / slots) / local_batch)
  _warn_if_upsampling(source.info, image_size)

  def decode(example):
    image = _decode_rgb(source.image_bytes(example["image"]))
    if image_size > NO_CENTRE_CROP_MAX_SIZE:
      image = _resize(_centre_crop(image), image_size)
    elif source.info.image_shape is None or source.info.image_shape[:2] != (image_size,
                                                                           image_size):
      image = _resize(image, image_size)
    return {"image": tf.ensure_shape(image, [image_size, image_size, 3]),
            "label": tf.cast(example["label"], tf.int32),
            "index": tf.cast(example["index"], tf.int32)}

  def make_batches():
    batches = iter(())  # a process whose share is empty feeds padding only
    if stop > start:
      examples = _read_positions(source, pieces, start, stop).map(
          decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
      batches = examples.batch(local_batch).prefetch(tf.data.AUTOTUNE).with_options(
          _tf_options()).as_numpy_iterator()
    for _ in range(num_batches):
      yield _padded(next(batches, None), local_batch, image_size)

  return _EvalBatches(make_batches, _to_global(sharding, global_batch_size), num_batches,
                      num_examples)


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
  source = _open_source(dataset, data_dir)
  pieces, num_examples = _resolve_split(source, split)
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
  stream per process)."""
  return create_train_iterator(
      config.dataset, data_dir=config.data_dir or None, split=config.train_split,
      global_batch_size=config.global_batch_size, image_size=config.image_size,
      host_crop_views=config.host_crop_views, seed=config.seed, start_step=start_step,
      mesh=mesh, subset=subset, data_shards=config.data_shards or jax.process_count(),
      host_crop=HostCrop.from_augment_config(config.augment) if config.host_crop_views else None)
