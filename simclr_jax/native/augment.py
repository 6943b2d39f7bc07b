"""The augmentation kernel (`augment_kernels.cc`): a run of consecutive augmentation steps taken
through every image in one call, while the image sits in cache; XLA on a CPU makes a dozen passes
over the batch instead. The random numbers are drawn in JAX (simclr_jax/augment.py), so the views
equal the JAX ops' to float32 rounding.
"""
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from simclr_jax.native import build

# The augmentation ops the kernel applies, with the codes of their steps there (`Step` in
# augment_kernels.cc, which also says what numbers each step takes).
AUGMENT_STEPS = {"random_resized_crop": 0, "center_crop": 0, "flip": 1, "color_jitter": 2,
                 "grayscale": 3, "blur": 4}
TARGET = "simclr_augment_steps"
KERNELS = build.Kernels("augment_kernels.cc", (TARGET,))


def run_augment_steps(image: jax.Array, steps: Sequence[tuple[str, Sequence]], size: int
                      ) -> jax.Array:
  """`steps` ((op of AUGMENT_STEPS, its numbers: scalars or arrays, flattened in order)) applied
  to one float32 image as one kernel call, which clips its views to [0, 1]; a crop step resizes
  to [size, size, 3]. Under vmap, one call for the whole batch ('broadcast_all')."""
  if not steps:
    return image
  KERNELS.register()
  codes = [AUGMENT_STEPS[op] for op, _ in steps]
  shape = (size, size, 3) if AUGMENT_STEPS["random_resized_crop"] in codes else image.shape
  numbers = jnp.concatenate([jnp.ravel(jnp.asarray(part, jnp.float32))
                             for _, parts in steps for part in parts])
  # The views vary over the same mesh axes as the images (inside shard_map).
  result = jax.typeof(image).update(shape=shape, dtype=jnp.float32)
  return jax.ffi.ffi_call(TARGET, result, vmap_method="broadcast_all")(
      image, numbers, steps=np.asarray(codes, np.int64))
