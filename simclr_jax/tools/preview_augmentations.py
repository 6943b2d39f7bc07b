r"""Writes a PNG of dataset images next to their augmented views, for any augmentation config.

  python -m simclr_jax.tools.preview_augmentations --dataset=cifar10 --data_dir=DIR \
      --preset=simclr_cifar --num_images=8 --num_views=6 --out=aug.png

`--ops` replaces the preset's op list by a free one with default parameters, e.g.
`--ops=random_resized_crop,rotate90,cutout,gaussian_noise`. Images are read from prepared data
(any TFDS name, `synthetic_shapes`, or `folder:/root` as in training), centre-cropped to a square
and resized to `--image_size` (default: the dataset's own size when fixed, else 224).
"""
from absl import app
from absl import flags
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from simclr_jax import augment
from simclr_jax import input_pipeline
from simclr_jax.visualize import augmentations

_DATASET = flags.DEFINE_string("dataset", "cifar10", "TFDS name, 'synthetic_shapes' or "
                               "'folder:/root' (root/<split>/<class>/*.jpg).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir holding the prepared dataset.")
_SPLIT = flags.DEFINE_string("split", "train", "Split to take the first images from.")
_PRESET = flags.DEFINE_enum("preset", "simclr_cifar", sorted(augment.PRESETS),
                            "Augmentation preset (simclr_jax.augment.get_preset).")
_OPS = flags.DEFINE_list("ops", None, "Free list of augmentation ops (default parameters) "
                         f"instead of the preset; known: {', '.join(sorted(augment.OP_DEFAULTS))}.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 8, "Rows: images to show.", lower_bound=1)
_NUM_VIEWS = flags.DEFINE_integer("num_views", 6, "Augmented views per image.", lower_bound=1)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "Side of the views; 0: the dataset's own "
                                   "size when all images share it, else 224.", lower_bound=0)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the augmentation keys.")
_OUT = flags.DEFINE_string("out", None, "Output PNG path.")
flags.mark_flags_as_required(["out"])

DEFAULT_VARIABLE_SIZE = 224


def square_rgb(image: np.ndarray, size: int) -> np.ndarray:
  """RGB uint8 [size, size, 3]: channels repeated or alpha dropped, centre square, bicubic."""
  image = tf.convert_to_tensor(image)
  if image.shape[-1] == 1:
    image = tf.tile(image, [1, 1, 3])
  image = image[..., :3]
  side = min(image.shape[0], image.shape[1])
  top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
  image = image[top:top + side, left:left + side]
  if side != size:
    image = tf.round(tf.clip_by_value(tf.image.resize(image, (size, size), "bicubic"), 0, 255))
  return tf.cast(image, tf.uint8).numpy()


def read_examples(dataset: str, data_dir: str | None, split: str, count: int):
  """The first `count` (image, label) pairs of a split, as decoded NumPy arrays."""
  info = input_pipeline.get_dataset_info(dataset, data_dir)  # clear errors; prepares synthetic
  if dataset.startswith(input_pipeline.FOLDER_PREFIX):
    root = dataset[len(input_pipeline.FOLDER_PREFIX):]
    builder = tfds.folder_dataset.ImageFolder(root)
    examples = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
  else:
    try:
      examples = tfds.load(dataset, split=split, data_dir=data_dir, as_supervised=True,
                           download=False, shuffle_files=False)
    except (ValueError, KeyError, AssertionError) as error:
      raise ValueError(f"cannot read split {split!r} of {dataset!r} (splits: "
                       f"{info.split_sizes}): {error}") from None
  pairs = list(tfds.as_numpy(examples.take(count)))
  if not pairs:
    raise ValueError(f"split {split!r} of {dataset!r} holds no examples")
  return info, pairs


def main(argv):
  del argv
  info, pairs = read_examples(_DATASET.value, _DATA_DIR.value, _SPLIT.value, _NUM_IMAGES.value)
  image_size = _IMAGE_SIZE.value
  if not image_size:
    shape = info.image_shape
    image_size = shape[0] if shape is not None and shape[0] == shape[1] else DEFAULT_VARIABLE_SIZE
  originals = np.stack([square_rgb(image, image_size) for image, _ in pairs])
  labels = [info.class_names[int(label)] if 0 <= int(label) < len(info.class_names)
            else str(label) for _, label in pairs]
  config = (augment.make_config(tuple(_OPS.value)) if _OPS.value
            else augment.get_preset(_PRESET.value))
  views = augmentations.augmented_views(originals, config, image_size=image_size,
                                        num_views=_NUM_VIEWS.value, seed=_SEED.value)
  recipe = "ops: " + ", ".join(config.ops) if _OPS.value else f"preset {_PRESET.value}"
  path = augmentations.plot_augmentation_grid(
      originals, views, _OUT.value, row_labels=labels,
      title=f"{_DATASET.value} ({_SPLIT.value}, {image_size} px), {recipe}")
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
