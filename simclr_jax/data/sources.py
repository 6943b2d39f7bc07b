"""Dataset sources: undecoded records of a prepared TFDS dataset or an image folder, in order.

Records are {'index': int64, 'label': int64, 'image': bytes (TFDS) or path (folder)}, where
`index` is the example's position in the requested split. Reading never downloads and never
decodes: the input pipeline decodes only what it batches.
"""
import dataclasses
import difflib
import fcntl
import os
from typing import Callable

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from simclr_jax.data import synthetic_shapes

FOLDER_PREFIX = "folder:"
SYNTHETIC_DATASET = synthetic_shapes.SyntheticShapes.name  # importing the module registers it
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_READ_PARALLEL_FILES = 16
_PARSE_BATCH = 1024
_UNBUFFERED_MIN_RECORD_BYTES = 16 * 1024  # measured: 2 KB records read 3x slower unbuffered

@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer and evaluators need to know about a dataset before reading it."""
  name: str
  num_classes: int
  class_names: tuple[str, ...]
  split_sizes: dict[str, int]
  image_shape: tuple[int, int, int] | None  # as delivered (always 3 channels); None: sizes vary


@dataclasses.dataclass(frozen=True)
class Range:
  """Examples [start, stop) of a stored split, at positions first_index... of the requested one."""
  split: str
  start: int
  stop: int
  first_index: int


class TfdsSource:
  """A prepared TFDS dataset, read from its files directly (parsing in batches, no decoding)."""

  random_access = False  # TFRecord files are read sequentially, after a skip within one file

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

  def read(self, piece: Range, *, with_images: bool = True) -> tf.data.Dataset:
    instructions = self._file_instructions(piece)
    files = tf.data.Dataset.from_tensor_slices(tuple(map(np.array, zip(*instructions))))
    records = files.interleave(
        self._file_records, cycle_length=min(_READ_PARALLEL_FILES, len(instructions)),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return self._parsed(records, with_images)

  def range_reader(self, pieces: list[Range]) -> Callable[[tf.Tensor], tf.data.Dataset]:
    """A tf.data function: int64 [n, 2] position ranges [start, stop) -> their records.

    Each range opens only the files holding it and skips within them (record headers only):
    no record before a range is read, which makes resuming at any position cheap.
    """
    paths, skips, counts, starts = map(np.array, zip(*[
        instruction for piece in pieces for instruction in self._file_instructions(piece)]))
    ends = starts + counts

    def files_of(position_range):
      start, stop = position_range[0], position_range[1]
      files = tf.range(tf.searchsorted(ends, start[None], side="right")[0],
                       tf.searchsorted(starts, stop[None], side="left")[0])
      first = tf.maximum(start, tf.gather(starts, files))
      last = tf.minimum(stop, tf.gather(ends, files))
      return tf.data.Dataset.from_tensor_slices((
          tf.gather(paths, files), tf.gather(skips, files) + first - tf.gather(starts, files),
          last - first, first))

    def read(ranges):
      records = tf.data.Dataset.from_tensor_slices(ranges).flat_map(files_of).interleave(
          lambda *segment: self._file_records(*segment, seeking=True),
          cycle_length=_READ_PARALLEL_FILES,
          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
      return self._parsed(records, with_images=True)

    return read

  def _file_instructions(self, piece: Range) -> list[tuple[str, int, int, int]]:
    """(file, records to skip in it, records to take, position of the first) covering `piece`."""
    instructions = self.builder.info.splits[
        f"{piece.split}[{piece.start}:{piece.stop}]"].file_instructions
    counts = [instruction.take for instruction in instructions]
    first_indices = piece.first_index + np.cumsum([0] + counts[:-1])
    return [(os.fspath(instruction.filename), instruction.skip, count, int(first))
            for instruction, count, first in zip(instructions, counts, first_indices)]

  def _file_records(self, path, skip, take, first_index, seeking=False) -> tf.data.Dataset:
    """Records [skip, skip + take) of a file.

    `seeking` (a skip to a random place, for each block of windowed_shuffle): large records are
    read unbuffered, so the skip reads record headers only; buffered, it reads every record it
    skips (half a file per block on average). Small records stay buffered: there, a few system
    calls per record cost more than reading the records skipped.
    """
    file_format = self.builder.info.file_format or tfds.core.file_adapters.FileFormat.TFRECORD
    splits = self.split_infos.values()
    record_bytes = sum(split.num_bytes for split in splits) / max(
        1, sum(split.num_examples for split in splits))
    if (seeking and file_format == tfds.core.file_adapters.FileFormat.TFRECORD
        and record_bytes >= _UNBUFFERED_MIN_RECORD_BYTES):
      records = tf.data.TFRecordDataset(path, buffer_size=0)
    else:
      records = tfds.core.file_adapters.ADAPTER_FOR_FORMAT[file_format].make_tf_data(path)
    records = records.skip(skip).take(take)
    return tf.data.Dataset.zip(records, tf.data.Dataset.range(first_index, first_index + take))

  def _parsed(self, records: tf.data.Dataset, with_images: bool) -> tf.data.Dataset:
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

  def labels(self, piece: Range) -> np.ndarray:
    labels = np.empty(piece.stop - piece.start, np.int64)
    for batch in self.read(piece, with_images=False).batch(8192).as_numpy_iterator():
      labels[batch["index"] - piece.first_index] = batch["label"]
    return labels

  def image_bytes(self, image: tf.Tensor) -> tf.Tensor:
    return image

  def describe(self, example: dict[str, np.ndarray]) -> str:
    return f"example {example['index']} of the requested split of {self.info.name!r}"


class FolderSource:
  """`root/<split>/<class>/*.{jpg,jpeg,png}` (the layout of tfds.folder_dataset.ImageFolder)."""

  random_access = True  # one file per example

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
          entries = tf.io.gfile.listdir(class_dir)
          files = sorted(entry for entry in entries if entry.lower().endswith(IMAGE_EXTENSIONS))
          if not files:
            raise ValueError(
                f"{name!r}: class folder {class_dir} holds no {'/'.join(IMAGE_EXTENSIONS)} "
                f"images (it holds {len(entries)} entries: {sorted(entries)[:3]}). Every class "
                "folder of a split needs images; delete the folder if the class has none")
          paths += [os.path.join(class_dir, entry) for entry in files]
          labels += [label] * len(files)
      if paths:
        self.examples[split] = (paths, np.array(labels, np.int64))
    if not self.examples:
      raise FileNotFoundError(
          f"{name!r}: no {'/'.join(IMAGE_EXTENSIONS)} images under {root}/<split>/<class>/")
    self.split_infos = {
        split: tfds.core.SplitInfo(name=split, shard_lengths=[len(paths)], num_bytes=0)
        for split, (paths, _) in self.examples.items()}
    self.info = DatasetInfo(
        name=name, num_classes=len(class_names), class_names=tuple(class_names),
        split_sizes={split: len(paths) for split, (paths, _) in self.examples.items()},
        image_shape=None)

  def read(self, piece: Range) -> tf.data.Dataset:
    paths, labels = self.examples[piece.split]
    return tf.data.Dataset.from_tensor_slices({
        "index": np.arange(piece.first_index, piece.first_index + piece.stop - piece.start),
        "label": labels[piece.start:piece.stop],
        "image": paths[piece.start:piece.stop],
    })

  def range_reader(self, pieces: list[Range]) -> Callable[[tf.Tensor], tf.data.Dataset]:
    """A tf.data function: int64 [n, 2] position ranges [start, stop) -> their records."""
    paths = np.concatenate([self.examples[piece.split][0][piece.start:piece.stop]
                            for piece in pieces])
    labels = np.concatenate([self.labels(piece) for piece in pieces])

    def read(ranges):
      positions = tf.ragged.range(ranges[:, 0], ranges[:, 1]).flat_values
      return tf.data.Dataset.from_tensor_slices(positions).map(lambda position: {
          "index": position, "label": tf.gather(labels, position),
          "image": tf.gather(paths, position)})

    return read

  def labels(self, piece: Range) -> np.ndarray:
    return self.examples[piece.split][1][piece.start:piece.stop]

  def image_bytes(self, path: tf.Tensor) -> tf.Tensor:
    return tf.io.read_file(path)  # after shuffling and skipping: only read what is decoded

  def describe(self, example: dict[str, np.ndarray]) -> str:
    return os.fsdecode(example["image"])


def open_source(dataset: str, data_dir: str | None) -> TfdsSource | FolderSource:
  if not isinstance(dataset, str) or not dataset:
    raise ValueError(f"dataset must be a TFDS name or '{FOLDER_PREFIX}/path', got {dataset!r}")
  if dataset.startswith(FOLDER_PREFIX):
    return FolderSource(dataset, os.path.expanduser(dataset[len(FOLDER_PREFIX):]))
  return TfdsSource(dataset, _prepared_builder(dataset, data_dir))


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


def resolve_split(source, split: str) -> tuple[list[Range], int]:
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
      pieces.append(Range(instruction.splitname, start, stop, total))
      total += stop - start
  if not total:
    raise ValueError(f"Split {split!r} of {source.info.name!r} selects no examples ({sizes})")
  return pieces, total


def read_positions(source, pieces: list[Range], start: int, stop: int) -> tf.data.Dataset:
  """Records at positions [start, stop) of the requested split, in order."""
  parts = []
  for piece in pieces:
    first = max(start, piece.first_index)
    last = min(stop, piece.first_index + piece.stop - piece.start)
    if last > first:
      offset = piece.start - piece.first_index
      parts.append(source.read(Range(piece.split, first + offset, last + offset, first)))
  records = parts[0]
  for part in parts[1:]:
    records = records.concatenate(part)
  return records

