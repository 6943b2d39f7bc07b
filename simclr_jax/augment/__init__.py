"""On-device augmentations: pure functions of (PRNG key, image), one key per image and view.

Every function takes one float32 image [H, W, 3] in [0, 1] and is jittable; `jax.vmap` it over a
batch of keys and images. Because each view's randomness comes only from its own key (the trainer
derives it from the step and the image's global index), views are reproducible and do not depend
on how the batch is split over devices.

The ops: color.py (jitter, grayscale), geometry.py (crop sampling, crop-then-resize, rotation),
filters.py (blur, cutout, noise, Sobel). pipeline.py turns a config (`ops` plus one block of
parameters per op, defaults in `OP_DEFAULTS`) into the `(key, image) -> image` function the
train step vmaps (`build_augmentation`), and makes a batch's views (`augment_batch`).

The SimCLR numbers follow google-research/simclr `data_util.py`: random resized crop sampled like
`tf.image.sample_distorted_bounding_box` (area [0.08, 1], aspect ratio [3/4, 4/3], 100 attempts,
whole image as fallback) with a bicubic resize; flip p=0.5; colour jitter p=0.8 with strength s
(brightness, contrast and saturation factors U[1-0.8s, 1+0.8s], hue shift U[-0.2s, 0.2s], random
order, clip after each); grayscale p=0.2; Gaussian blur p=0.5 with a kernel of 10% of the side and
sigma U[0.1, 2]. Every colour op equals its `tf.image` namesake (tested to 1e-4): brightness and
contrast are dm-pix's; saturation, hue and grayscale are written on RGB planes because that is
several times faster under vmap on CPU than dm-pix's HSV round trip and tensordot.

Backends (`build_augmentation(..., backend=)`, `config.augment_backend`): 'jax' runs every op as
above, on any device. 'native', the default on the CPU backend ('auto'), draws the same random
numbers in JAX and hands each run of consecutive ops of `native.AUGMENT_STEPS` to one C++ kernel
(`simclr_jax.native.run_augment_steps`) that takes every image through all of
them while it sits in cache; XLA on a CPU makes a dozen passes over the batch instead. The views
equal the JAX ones to float32 rounding (tests/test_native_augment.py); the speed is in
experiments/results/augment_throughput.md.
"""
from simclr_jax.augment.color import (BRIGHTNESS_IMPLS, adjust_brightness, adjust_contrast,
                                      adjust_hue, adjust_saturation, apply_color_jitter,
                                      color_jitter, sample_color_jitter, scale_brightness,
                                      to_grayscale)
from simclr_jax.augment.filters import (blur_with_sigma, cutout, gaussian_blur, gaussian_noise,
                                        random_cutout, sample_blur, sobel)
from simclr_jax.augment.geometry import (center_crop_box, crop_and_resize, resize, rotate90,
                                         sample_crop_box)
from simclr_jax.augment.pipeline import (CROP_OPS, OP_DEFAULTS, PRESETS, Augmentation,
                                         augment_batch, build_augmentation, get_preset,
                                         image_keys, make_config, resolve_config, validate)

__all__ = [
    "BRIGHTNESS_IMPLS", "CROP_OPS", "OP_DEFAULTS", "PRESETS", "Augmentation", "adjust_brightness",
    "adjust_contrast", "adjust_hue", "adjust_saturation", "apply_color_jitter", "augment_batch",
    "blur_with_sigma", "build_augmentation", "center_crop_box", "color_jitter", "crop_and_resize",
    "cutout", "gaussian_blur", "gaussian_noise", "get_preset", "image_keys", "make_config",
    "random_cutout", "resize", "resolve_config", "rotate90", "sample_blur", "sample_color_jitter",
    "sample_crop_box", "scale_brightness", "sobel", "to_grayscale", "validate",
]
