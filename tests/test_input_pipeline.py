"""Host input pipeline: batches, sharding, determinism, resume, eval padding, subsets, errors.

Runs on the package's generated `synthetic_shapes` (prepared into a temporary data_dir with the
network blocked) and on a generated image folder; never needs real datasets.
"""
import io
import itertools
import logging
import socket

import jax
import numpy as np
from PIL import Image
import pytest

from simclr_jax import input_pipeline
from simclr_jax.data import sources
from simclr_jax.data import synthetic_shapes
from simclr_jax.data import windowed_shuffle

DATASET = "synthetic_shapes"


def _mesh(num_devices: int) -> jax.sharding.Mesh:
  return jax.make_mesh((num_devices,), ("data",), devices=jax.devices()[:num_devices])


def _take(iterator, count: int) -> list[dict[str, np.ndarray]]:
  batches = [jax.tree.map(np.asarray, next(iterator)) for _ in range(count)]
  iterator.close()
  return batches


def _no_network(*args, **kwargs):
  raise AssertionError("the input pipeline tried to open a network connection")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
  directory = str(tmp_path_factory.mktemp("tfds"))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(socket, "socket", _no_network)
    input_pipeline.get_dataset_info(DATASET, directory)  # generates it on first use
  return directory


def _train(data_dir, **overrides):
  arguments = dict(data_dir=data_dir, split="train[:600]", global_batch_size=64, image_size=32,
                   host_crop_views=0, host_crop=input_pipeline.HostCrop(), seed=7, mesh=_mesh(8))
  return input_pipeline.create_train_iterator(DATASET, **{**arguments, **overrides})


def test_closing_the_train_iterator_stops_its_prefetch_thread(data_dir):
  iterator = _train(data_dir)
  next(iterator)
  iterator.close()
  assert not iterator._thread.is_alive()  # pylint: disable=protected-access


def test_synthetic_shapes_is_generated_offline_deterministic_and_learnable(data_dir):
  info = input_pipeline.get_dataset_info(DATASET, data_dir)
  assert info.class_names == synthetic_shapes.CLASS_NAMES
  assert info.split_sizes == {"train": 5000, "test": 1000}
  assert info.image_shape == (32, 32, 3)
  np.testing.assert_array_equal(synthetic_shapes.generate(20, 3)[0],
                                synthetic_shapes.generate(20, 3)[0])

  def read(split):
    batches = input_pipeline.create_eval_iterator(
        DATASET, data_dir=data_dir, split=split, global_batch_size=500, image_size=32,
        mesh=_mesh(1))
    batches = [jax.tree.map(np.asarray, batch) for batch in batches]
    return (np.concatenate([batch["image"] for batch in batches]),
            np.concatenate([batch["label"] for batch in batches]))

  def nearest_class_mean_accuracy(features):
    (train_features, train_labels), (test_features, test_labels) = features
    means = np.stack([train_features[train_labels == c].mean(0) for c in range(10)])
    distances = ((test_features[:, None] - means[None]) ** 2).sum(-1)
    return np.mean(distances.argmin(1) == test_labels)

  def spectrum(images):  # translation-, colour- and contrast-invariant shape statistics
    gray = images.astype(np.float32).mean(-1)
    gray = (gray - gray.mean((1, 2), keepdims=True)) / (gray.std((1, 2), keepdims=True) + 1e-6)
    return np.log1p(np.abs(np.fft.fft2(gray))).reshape(len(images), -1)

  splits = [read("train[:2000]"), read("test")]
  assert np.bincount(splits[1][1]).tolist() == [100] * 10
  raw_pixels = [(images.reshape(len(images), -1).astype(np.float32), labels)
                for images, labels in splits]
  spectra = [(spectrum(images), labels) for images, labels in splits]
  assert nearest_class_mean_accuracy(raw_pixels) < 0.25  # colour and position carry no label
  assert nearest_class_mean_accuracy(spectra) > 0.5  # geometry does (chance: 0.1)


@pytest.mark.parametrize("host_crop_views", [0, 2])
def test_batches_have_contract_shapes_and_are_identical_on_1_and_8_devices(
    data_dir, host_crop_views):
  batches = {}
  for num_devices in (8, 1):
    iterator = _train(data_dir, host_crop_views=host_crop_views, image_size=24,
                      mesh=_mesh(num_devices))
    batch = next(iterator)
    # without host crops the full 32 px images go to the device, which crops them to 24 px
    image_shape = (64, 32, 32, 3) if host_crop_views == 0 else (64, 2, 24, 24, 3)
    for key, shape, dtype in [("image", image_shape, np.uint8), ("label", (64,), np.int32),
                              ("index", (64,), np.int32)]:
      assert batch[key].shape == shape and batch[key].dtype == dtype
      assert batch[key].sharding == jax.NamedSharding(_mesh(num_devices), jax.P("data"))
      assert len(batch[key].addressable_shards) == num_devices
    batches[num_devices] = _take(iterator, 2)
  for one_device, eight_devices in zip(batches[1], batches[8]):
    for key in one_device:
      np.testing.assert_array_equal(one_device[key], eight_devices[key])


def test_indices_cover_the_split_once_per_epoch_and_resume_is_exact(data_dir):
  fresh = _take(_train(data_dir, host_crop_views=2, image_size=24), 12)
  indices = np.concatenate([batch["index"] for batch in fresh])  # 768 = 600 + 168 positions
  assert sorted(indices[:600]) == list(range(600))
  assert len(set(indices[600:])) == 168
  assert not np.array_equal(indices[:168], indices[600:])  # each epoch has its own order
  resumed = _take(_train(data_dir, host_crop_views=2, image_size=24, start_step=7), 5)
  for expected, actual in zip(fresh[7:], resumed):  # step 7 starts mid-epoch 0, crosses to 1
    for key in expected:
      np.testing.assert_array_equal(expected[key], actual[key])
  other_seed = _take(_train(data_dir, host_crop_views=2, image_size=24, seed=8), 1)[0]
  assert not np.array_equal(other_seed["index"], fresh[0]["index"])


def test_data_shards_split_the_batch_into_disjoint_streams(data_dir):
  batch = _take(_train(data_dir, data_shards=2), 10)
  first_half = np.concatenate([b["index"][:32] for b in batch])
  second_half = np.concatenate([b["index"][32:] for b in batch])
  assert set(first_half) == set(range(300)) and set(second_half) == set(range(300, 600))


def test_subset_restricts_training_to_a_balanced_deterministic_sample(data_dir):
  subset = input_pipeline.label_subset(DATASET, data_dir=data_dir, split="train", per_class=7,
                                       seed=0)
  assert len(subset) == 70
  np.testing.assert_array_equal(subset, input_pipeline.label_subset(
      DATASET, data_dir=data_dir, split="train", per_class=7, seed=0))
  assert set(subset) != set(input_pipeline.label_subset(
      DATASET, data_dir=data_dir, split="train", per_class=7, seed=1))
  ten_percent = input_pipeline.label_subset(DATASET, data_dir=data_dir, split="train",
                                            fraction=0.1, seed=0)
  assert len(ten_percent) == 500
  batch, = _take(_train(data_dir, split="train", global_batch_size=70, mesh=_mesh(2),
                        subset=subset), 1)  # one batch = one epoch of the subset
  assert sorted(batch["index"]) == sorted(subset)
  assert np.bincount(batch["label"], minlength=10).tolist() == [7] * 10


@pytest.mark.parametrize("num_devices", [8, 1])
def test_eval_counts_every_example_exactly_once(data_dir, num_devices):
  batches = input_pipeline.create_eval_iterator(
      DATASET, data_dir=data_dir, split="test[:101]", global_batch_size=16, image_size=32,
      mesh=_mesh(num_devices))
  assert len(batches) == 7
  batches = [jax.tree.map(np.asarray, batch) for batch in batches]
  masks = np.concatenate([batch["mask"] for batch in batches])
  indices = np.concatenate([batch["index"] for batch in batches])
  assert masks.sum() == 101 and sorted(indices[masks]) == list(range(101))
  assert (indices[~masks] == -1).all()
  assert batches[0]["image"].shape == (16, 32, 32, 3) and batches[0]["image"].dtype == np.uint8


def test_eval_centre_crops_above_32_pixels(data_dir, caplog):
  with caplog.at_level(logging.WARNING):
    batch = next(iter(input_pipeline.create_eval_iterator(
        DATASET, data_dir=data_dir, split="test[:8]", global_batch_size=8, image_size=48,
        mesh=_mesh(8))))
  assert batch["image"].shape == (8, 48, 48, 3)
  assert "upsampled" in caplog.text


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> str:
  """Grayscale, RGBA, RGB JPEG and odd sizes; class `b` has no test images."""
  root = tmp_path_factory.mktemp("folder")
  rng = np.random.default_rng(0)
  files = [("train", "a", "gray.png", "L", (23, 37)),
           ("train", "a", "rgba.png", "RGBA", (50, 9)),
           ("train", "b", "photo.jpg", "RGB", (81, 64)),
           ("train", "b", "small.JPEG", "RGB", (7, 5)),
           ("test", "a", "gray.jpg", "L", (40, 30))]
  for split, label, name, mode, (height, width) in files:
    (root / split / label).mkdir(parents=True, exist_ok=True)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(
        root / split / label / name)
  return f"{input_pipeline.FOLDER_PREFIX}{root}"


def test_image_folder_with_grayscale_rgba_and_odd_sizes(image_folder):
  info = input_pipeline.get_dataset_info(image_folder)
  assert info.class_names == ("a", "b") and info.split_sizes == {"train": 4, "test": 1}
  assert info.image_shape is None
  batch, = _take(input_pipeline.create_train_iterator(
      image_folder, data_dir=None, split="train", global_batch_size=8, image_size=16,
      host_crop_views=2, host_crop=input_pipeline.HostCrop(), seed=0, mesh=_mesh(8)), 1)
  assert batch["image"].shape == (8, 2, 16, 16, 3) and batch["image"].dtype == np.uint8
  gray = batch["image"][batch["index"] == 0]  # sorted by class then name: a/gray.png is 0
  assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
  evaluation = [jax.tree.map(np.asarray, b) for b in input_pipeline.create_eval_iterator(
      image_folder, data_dir=None, split="test", global_batch_size=8, image_size=40,
      mesh=_mesh(8))]
  assert len(evaluation) == 1 and evaluation[0]["mask"].sum() == 1
  assert evaluation[0]["image"].shape == (8, 40, 40, 3)
  with pytest.raises(ValueError, match="host_crop_views >= 1"):
    input_pipeline.create_train_iterator(
        image_folder, data_dir=None, split="train", global_batch_size=8, image_size=16,
        host_crop_views=0, seed=0, mesh=_mesh(8))


def test_bad_input_gets_clear_errors(data_dir, tmp_path):
  with pytest.raises(ValueError, match=r"Unknown dataset 'cifar_10'.*'cifar10'.*list_builders"):
    input_pipeline.get_dataset_info("cifar_10", data_dir)
  with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/cifar10/.*tfds build cifar10"):
    input_pipeline.get_dataset_info("cifar10", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    input_pipeline.get_dataset_info(f"{input_pipeline.FOLDER_PREFIX}{tmp_path}/missing")
  with pytest.raises(ValueError, match=r"Unknown split 'validation'.*'train': 5000"):
    _train(data_dir, split="validation")
  with pytest.raises(ValueError, match="global_batch_size=60 does not divide.*multiple of 8"):
    _train(data_dir, global_batch_size=60)
  with pytest.raises(ValueError, match="data_shards=3"):
    _train(data_dir, data_shards=3)
  with pytest.raises(ValueError, match=r"subset indices must lie in \[0, 600\)"):
    _train(data_dir, subset=np.array([1, 600]))
  with pytest.raises(ValueError, match="repeated"):
    _train(data_dir, subset=np.array([1, 1]))
  with pytest.raises(ValueError, match="host_crop_views must be an integer >= 0"):
    _train(data_dir, host_crop_views=-1)
  with pytest.raises(ValueError, match="fewer than the 501 per class"):
    input_pipeline.label_subset(DATASET, data_dir=data_dir, split="train", per_class=501,
                                seed=0)
  with pytest.raises(ValueError, match="exactly one of fraction or per_class"):
    input_pipeline.label_subset(DATASET, data_dir=data_dir, split="train", seed=0)


@pytest.fixture
def large_shard_limit(monkeypatch):
  """Shards above 100 examples take the windowed path: windows of 50, blocks of 12."""
  monkeypatch.setattr(input_pipeline, "SHUFFLE_BUFFER_SIZE", 100)
  monkeypatch.setattr(windowed_shuffle, "BLOCKS_PER_WINDOW", 4)


@pytest.mark.parametrize("data_shards, unbuffered_seeks", [(1, True), (2, False)])
def test_large_shards_resume_exactly_at_any_position(data_dir, large_shard_limit, monkeypatch,
                                                     data_shards, unbuffered_seeks):
  if unbuffered_seeks:  # the path of large records (ImageNet's): skips read headers only
    monkeypatch.setattr(sources, "_UNBUFFERED_MIN_RECORD_BYTES", 0)
  # two stored splits: blocks and windows straddle a file boundary
  split = "train[:300]+test[:300]"
  fresh = _take(_train(data_dir, split=split, data_shards=data_shards, host_crop_views=1,
                       image_size=16), 16)
  indices = np.concatenate([batch["index"].reshape(data_shards, -1) for batch in fresh], 1)
  per_shard = 600 // data_shards
  for shard, shard_indices in enumerate(indices):  # every epoch: each member once, a new order
    members = list(range(shard * per_shard, (shard + 1) * per_shard))
    assert sorted(shard_indices[:per_shard]) == members
    assert not np.array_equal(shard_indices[:per_shard], sorted(shard_indices[:per_shard]))
    assert not np.array_equal(shard_indices[:100], shard_indices[per_shard:per_shard + 100])
  for start_step in (3, 9, 14):  # mid-window, across the epoch boundary (600 / 64 = 9.4), later
    resumed = _take(_train(data_dir, split=split, data_shards=data_shards, host_crop_views=1,
                           image_size=16, start_step=start_step), 2)
    for expected, actual in zip(fresh[start_step:], resumed):
      for key in expected:
        np.testing.assert_array_equal(expected[key], actual[key])


def test_large_shards_keep_the_per_example_host_crops(data_dir, monkeypatch):
  def first_epoch_crops():
    batches = _take(_train(data_dir, host_crop_views=2, image_size=16), 9)  # 576 of 600
    return {index: image for batch in batches
            for index, image in zip(batch["index"], batch["image"])}

  cached = first_epoch_crops()
  monkeypatch.setattr(input_pipeline, "SHUFFLE_BUFFER_SIZE", 100)
  windowed = first_epoch_crops()
  common = set(cached) & set(windowed)
  assert len(common) > 500  # two orders of the same 600 examples
  for index in common:
    np.testing.assert_array_equal(cached[index], windowed[index])


def test_large_shards_of_a_subset_and_of_a_folder(data_dir, image_folder, large_shard_limit,
                                                  monkeypatch):
  subset = np.arange(1, 600, 2)  # the blocks' file ranges hold non-members
  batches = _take(_train(data_dir, subset=subset, data_shards=2), 10)
  for shard in range(2):
    indices = np.concatenate([batch["index"][shard * 32:(shard + 1) * 32] for batch in batches])
    assert sorted(indices[:150]) == list(subset[shard * 150:(shard + 1) * 150])
  monkeypatch.setattr(input_pipeline, "SHUFFLE_BUFFER_SIZE", 2)  # < the folder's 4 images
  batch, = _take(input_pipeline.create_train_iterator(
      image_folder, data_dir=None, split="train", global_batch_size=8, image_size=16,
      host_crop_views=1, host_crop=input_pipeline.HostCrop(), seed=0, mesh=_mesh(8)), 1)
  assert sorted(batch["index"][:4]) == sorted(batch["index"][4:]) == [0, 1, 2, 3]


def test_windowed_order_is_a_permutation_per_epoch_and_starts_anywhere():
  members = np.arange(3, 1000, 3)
  plan = dict(window_size=40, block_size=7, seed=5, shard=1)

  def stream(start_position, count):
    orders = windowed_shuffle.windows(members, start_position=start_position, **plan)
    return np.concatenate(list(itertools.islice((order for _, _, order in orders), count)))

  everything = stream(0, 40)
  assert sorted(everything[:members.size]) == list(members)
  for start_position in (0, 1, 39, 40, 332, 333, 500):
    tail = stream(start_position, 3)
    np.testing.assert_array_equal(tail, everything[start_position:start_position + tail.size])
  for epoch, ranges, order in itertools.islice(windowed_shuffle.windows(
      members, start_position=0, **plan), 10):
    inside = (order[:, None] >= ranges[:, 0]) & (order[:, None] < ranges[:, 1])
    assert (inside.sum(1) == 1).all() and epoch == 0  # the ranges read hold the window


def _encoded(pixels: np.ndarray, image_format: str, mode: str | None = None, **options) -> bytes:
  encoded = io.BytesIO()
  image = Image.fromarray(pixels)
  (image.convert(mode) if mode else image).save(encoded, image_format, **options)
  return encoded.getvalue()


def _folder_with(root, bad_name: str, bad_bytes: bytes) -> str:
  """train/a and train/b with three good JPEGs and one bad file."""
  rng = np.random.default_rng(0)
  for number, label in enumerate("aab"):
    (root / "train" / label).mkdir(parents=True, exist_ok=True)
    (root / "train" / label / f"{number}.jpg").write_bytes(
        _encoded(rng.integers(0, 256, (20, 24, 3), np.uint8), "JPEG"))
  (root / "train" / "b" / bad_name).write_bytes(bad_bytes)
  return f"{input_pipeline.FOLDER_PREFIX}{root}"


_GOOD_JPEG = _encoded(np.random.default_rng(1).integers(0, 256, (40, 30, 3), np.uint8), "JPEG")


@pytest.mark.parametrize("bad_name, bad_bytes, reason", [
    ("truncated.jpg", _GOOD_JPEG[:len(_GOOD_JPEG) // 2], "Invalid JPEG data"),
    ("corrupt.jpg", _GOOD_JPEG[:200] + np.random.default_rng(0).bytes(300) + _GOOD_JPEG[500:],
     "Invalid JPEG data"),
    ("notes.png", b"not an image, despite its name", "Unknown image file format"),
    ("empty.jpeg", b"", "Input is empty"),
])
def test_undecodable_files_are_named_in_training_and_evaluation(tmp_path, bad_name, bad_bytes,
                                                               reason):
  folder = _folder_with(tmp_path, bad_name, bad_bytes)
  message = rf"Cannot decode {tmp_path}/train/b/{bad_name}: .*{reason}.*Images must be JPEG, PNG"
  with pytest.raises(ValueError, match=message):
    _take(input_pipeline.create_train_iterator(
        folder, data_dir=None, split="train", global_batch_size=8, image_size=16,
        host_crop_views=1, host_crop=input_pipeline.HostCrop(), seed=0, mesh=_mesh(8),
        start_step=3), 2)
  with pytest.raises(ValueError, match=message):
    list(input_pipeline.create_eval_iterator(folder, data_dir=None, split="train",
                                             global_batch_size=2, image_size=16, mesh=_mesh(2)))


def test_empty_class_folders_are_named_when_the_folder_is_opened(tmp_path):
  folder = _folder_with(tmp_path, "fine.jpg", _GOOD_JPEG)
  (tmp_path / "train" / "c").mkdir()
  (tmp_path / "train" / "c" / "labels.txt").write_text("nothing here")
  with pytest.raises(ValueError, match=rf"class folder {tmp_path}/train/c holds no "
                                       r"\.jpg/\.jpeg/\.png images.*labels\.txt"):
    input_pipeline.get_dataset_info(folder)


def test_cmyk_16_bit_rgba_and_one_pixel_images_are_converted_to_rgb(tmp_path):
  rng = np.random.default_rng(2)
  rgb = np.kron(rng.integers(0, 256, (4, 4, 3), np.uint8), np.ones((4, 4, 1), np.uint8))
  rgba = rng.integers(0, 256, (16, 16, 4), np.uint8)
  gray16 = rng.integers(0, 2**16, (16, 16)).astype(np.uint16)
  files = {"cmyk.jpg": _encoded(rgb, "JPEG", "CMYK", quality=95),
           "gray16.png": _encoded(gray16, "PNG"),
           "rgba.png": _encoded(rgba, "PNG"), "pixel.png": _encoded(rgb[:1, :1], "PNG")}
  (tmp_path / "test" / "a").mkdir(parents=True)
  for name, encoded in files.items():
    (tmp_path / "test" / "a" / name).write_bytes(encoded)
  batch, = [jax.tree.map(np.asarray, b) for b in input_pipeline.create_eval_iterator(
      f"{input_pipeline.FOLDER_PREFIX}{tmp_path}", data_dir=None, split="test",
      global_batch_size=4, image_size=16, mesh=_mesh(1))]
  cmyk, gray, pixel, rgba_image = batch["image"]  # sorted by name
  assert np.abs(cmyk.astype(int) - rgb).mean() < 6  # JPEG loss (~3.4); inverted inks: ~100
  np.testing.assert_array_equal(gray, np.repeat((gray16 >> 8).astype(np.uint8)[..., None], 3, -1))
  np.testing.assert_array_equal(pixel, np.broadcast_to(rgb[0, 0], (16, 16, 3)))
  np.testing.assert_array_equal(rgba_image, rgba[..., :3])
