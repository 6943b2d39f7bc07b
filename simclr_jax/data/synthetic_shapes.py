"""`synthetic_shapes`: a small image-classification dataset generated from code, no download.

Why it exists: the smoke recipes, the README's first command and the tests must run on a fresh
machine without network, and still show that contrastive pretraining learns something. Each
32x32 RGB image shows one of ten shapes or textures, drawn at a random position, scale, rotation
(shapes) or period and phase (textures), with random foreground and background colours and pixel
noise. The class is geometry only: colour carries no label information (colour jitter and
grayscale views cannot erase it), raw pixels are useless for a nearest-class-mean classifier, and
crops keep enough of a shape or texture for two views to agree.

Generation is vectorised NumPy from a fixed seed per split, so every machine writes the same
images; preparing both splits takes a few seconds.
"""
import io
import math

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

IMAGE_SIZE = 32
CLASS_NAMES = ("circle", "square", "triangle", "cross", "ring", "horizontal_stripes",
               "vertical_stripes", "checkerboard", "dots", "gradient")
SPLIT_SIZES = {"train": 5000, "test": 1000}
_SPLIT_SEEDS = {"train": 0, "test": 1}
_SUPERSAMPLING = 2  # draw at 2x and average: anti-aliased edges
_MIN_LUMINANCE_GAP = 0.3  # foreground vs background, so grayscale views still show the shape
_NOISE_STDDEV = 0.04
_LUMINANCE = np.array([0.299, 0.587, 0.114])


def _pixel_grid() -> tuple[np.ndarray, np.ndarray]:
  centres = (np.arange(IMAGE_SIZE * _SUPERSAMPLING, dtype=np.float32) + 0.5) / _SUPERSAMPLING
  rows, cols = np.meshgrid(centres, centres, indexing="ij")
  return rows[None], cols[None]  # [1, H, W]: broadcasts against per-image parameters [N, 1, 1]


def _uniform(rng: np.random.Generator, low: float, high: float, count: int) -> np.ndarray:
  return rng.uniform(low, high, count).astype(np.float32)[:, None, None]


def _rotated_frame(rng, count):
  """Pixel coordinates relative to a random centre, in a randomly rotated frame."""
  rows, cols = _pixel_grid()
  centre_row = _uniform(rng, 10, 22, count)
  centre_col = _uniform(rng, 10, 22, count)
  angle = _uniform(rng, 0, 2 * np.pi, count)
  dy, dx = rows - centre_row, cols - centre_col
  return np.cos(angle) * dy - np.sin(angle) * dx, np.sin(angle) * dy + np.cos(angle) * dx


def _shape_mask(name: str, rng: np.random.Generator, count: int) -> np.ndarray:
  """Foreground coverage in [0, 1] at supersampled resolution, [count, 64, 64]."""
  if name in ("circle", "square", "triangle", "cross", "ring"):
    y, x = _rotated_frame(rng, count)
    radius = _uniform(rng, 6, 12, count)
    if name == "circle":
      return y * y + x * x <= radius * radius
    if name == "ring":
      distance = np.sqrt(y * y + x * x)
      return (distance <= radius) & (distance >= radius * (1 - _uniform(rng, 0.25, 0.45, count)))
    if name == "square":
      half_side = 0.85 * radius
      return (np.abs(y) <= half_side) & (np.abs(x) <= half_side)
    if name == "triangle":  # equilateral, circumradius `radius`: inside three half-planes
      inside = np.ones(np.broadcast_shapes(y.shape, radius.shape), bool)
      for edge_angle in np.pi / 2 + np.array([0, 2, 4]) * np.pi / 3:
        inside &= np.cos(edge_angle) * x + np.sin(edge_angle) * y <= radius / 2
      return inside
    arm = _uniform(rng, 0.25, 0.4, count) * radius  # cross
    return (((np.abs(y) <= radius) & (np.abs(x) <= arm))
            | ((np.abs(x) <= radius) & (np.abs(y) <= arm)))

  rows, cols = _pixel_grid()
  if name == "gradient":
    angle = _uniform(rng, 0, 2 * np.pi, count)
    centre = IMAGE_SIZE / 2
    along = np.cos(angle) * (rows - centre) + np.sin(angle) * (cols - centre)
    return np.clip(along / (IMAGE_SIZE / math.sqrt(2)) + 0.5, 0, 1)
  if name == "dots":
    spacing = _uniform(rng, 5, 9, count)
    dot_radius = _uniform(rng, 0.2, 0.32, count) * spacing
    dy = (rows + _uniform(rng, 0, 9, count)) % spacing - spacing / 2
    dx = (cols + _uniform(rng, 0, 9, count)) % spacing - spacing / 2
    return dy * dy + dx * dx <= dot_radius * dot_radius
  period = _uniform(rng, 4, 9, count)
  phase = _uniform(rng, 0, 9, count)
  tilt = np.deg2rad(_uniform(rng, -10, 10, count))
  along_rows = np.cos(tilt) * rows + np.sin(tilt) * cols + phase
  along_cols = np.cos(tilt) * cols - np.sin(tilt) * rows + phase
  if name == "horizontal_stripes":
    return along_rows % period < period / 2
  if name == "vertical_stripes":
    return along_cols % period < period / 2
  if name == "checkerboard":
    return (along_rows // (period / 2) + along_cols // (period / 2)) % 2 == 0
  raise ValueError(f"unknown synthetic shape {name!r}; known: {CLASS_NAMES}")


def _colour_pairs(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
  """Random foreground/background colours whose luminances differ by at least the gap."""
  foreground = rng.uniform(0, 1, (count, 3)).astype(np.float32)
  background = rng.uniform(0, 1, (count, 3)).astype(np.float32)
  while True:
    too_close = np.abs((foreground - background) @ _LUMINANCE) < _MIN_LUMINANCE_GAP
    if not too_close.any():
      return foreground, background
    foreground[too_close] = rng.uniform(0, 1, (too_close.sum(), 3))
    background[too_close] = rng.uniform(0, 1, (too_close.sum(), 3))


def generate(num_examples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Images uint8 [N, 32, 32, 3] and labels int64 [N] (balanced: example i has class i % 10)."""
  rng = np.random.default_rng(seed)
  labels = np.arange(num_examples) % len(CLASS_NAMES)
  images = np.empty((num_examples, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  for label, name in enumerate(CLASS_NAMES):
    members = np.flatnonzero(labels == label)
    coverage = _shape_mask(name, rng, len(members)).astype(np.float32)
    coverage = coverage.reshape(len(members), IMAGE_SIZE, _SUPERSAMPLING, IMAGE_SIZE,
                                _SUPERSAMPLING).mean(axis=(2, 4))[..., None]
    foreground, background = _colour_pairs(rng, len(members))
    noise = _NOISE_STDDEV * rng.standard_normal(coverage.shape[:3] + (3,), dtype=np.float32)
    pixels = (coverage * foreground[:, None, None] + (1 - coverage) * background[:, None, None]
              + noise)
    images[members] = np.clip(np.round(pixels * 255), 0, 255).astype(np.uint8)
  return images, labels


class SyntheticShapes(tfds.core.GeneratorBasedBuilder):
  """Ten classes of shapes and textures, 32x32 RGB, generated locally (registered on import)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Ten shape/texture classes, 5000 train / 1000 test images."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=("image", "label"),
    )

  # TFDS prints "Downloading and preparing dataset..." and "...Subsequent calls will reuse this
  # data." to stdout around every preparation; nothing is downloaded here, and the input pipeline
  # logs the generation itself.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split) for split in SPLIT_SIZES}

  def _generate_examples(self, split):
    images, labels = generate(SPLIT_SIZES[split], _SPLIT_SEEDS[split])
    for key, (image, label) in enumerate(zip(images, labels)):
      yield key, {"image": _png(image), "label": int(label)}


def _png(image: np.ndarray) -> bytes:
  """PNG bytes via Pillow: much faster than TFDS's per-image TF graph encoder."""
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG", compress_level=0)
  return buffer.getvalue()
