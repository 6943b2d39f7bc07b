"""Small helpers the test modules share."""
import jax
import numpy as np


def relative_distance(tree, reference) -> float:
  """||tree - reference|| / ||reference|| over all leaves, in float64.

  One number per state part: a few near-degenerate BN channels amplify float32 rounding in their
  own leaves, while a wrong reduction (a missed or doubled device) moves the whole part by O(1).
  """
  pairs = [(np.asarray(a, np.float64), np.asarray(b, np.float64))
           for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(reference))]
  return (np.sqrt(sum(np.sum((a - b) ** 2) for a, b in pairs)) /
          np.sqrt(sum(np.sum(b ** 2) for _, b in pairs)))


def set_fields(config, **overrides):
  """config with `a__b=value` meaning config.a.b = value."""
  for dotted, value in overrides.items():
    *parents, name = dotted.split("__")
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value
  return config


# (image height, width, output size, boxes [top, left, height, width]) for crop-and-resize
# against tf.image: upscaling and downscaling, odd sides, boxes on every border and inside, and
# boxes of fewer pixels than the 4 bicubic taps.
CROP_AND_RESIZE_CASES = {
    "20x20 -> 16, mostly upscaling": (20, 20, 16, [(3, 5, 9, 12), (0, 0, 5, 7), (13, 11, 7, 9),
                                                   (4, 4, 1, 1), (0, 17, 2, 3), (0, 0, 20, 20)]),
    "37x45 -> 13, downscaling": (37, 45, 13, [(0, 0, 37, 45), (5, 8, 31, 33), (10, 0, 27, 45),
                                              (0, 20, 30, 25), (6, 7, 13, 13)]),
    "23x17 -> 29, upscaling": (23, 17, 29, [(0, 4, 7, 13), (16, 0, 7, 17), (1, 1, 21, 15),
                                            (0, 0, 23, 3), (22, 16, 1, 1)]),
    "23x17 -> 11, both": (23, 17, 11, [(0, 0, 23, 17), (2, 3, 9, 5), (4, 0, 19, 17),
                                       (0, 9, 23, 8)]),
}


def tf_crop_and_resize(image, box, size: int):
  """The official crop_and_resize's crop and resize (google-research/simclr data_util.py):
  tf.image.crop_to_bounding_box, then a bicubic tf.image.resize without antialias."""
  import tensorflow as tf  # only the modules that need it pay for the import
  crop = tf.image.crop_to_bounding_box(image, *box)
  return tf.image.resize(crop, [size, size], method="bicubic", antialias=False).numpy()
