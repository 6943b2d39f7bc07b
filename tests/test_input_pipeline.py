"""Host input pipeline: batches, sharding, determinism, resume, eval padding, subsets, errors.

Runs on the package's generated `synthetic_shapes` (prepared into a temporary data_dir with the
network blocked) and on a generated image folder; never needs real datasets.
"""
import logging
import socket

import jax
import numpy as np
from PIL import Image
import pytest

from simclr_jax import input_pipeline
from simclr_jax.data import synthetic_shapes

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
