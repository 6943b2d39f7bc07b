"""C++ kernels that XLA's CPU backend calls through its FFI, one function per op; nothing outside
this package knows about the FFI.

- `conv_function(backend)`: the `conv_general_dilated` for `nn.Conv` of a conv backend (conv.py,
  oneDNN).
- `batch_norm_train(x, scale, bias, residual, relu, epsilon, axis_name) -> (y, mean, var)`:
  training-mode batch norm + residual + ReLU (batch_norm.py).
- `run_augment_steps(image, steps, size)`: a run of the augmentation ops of `AUGMENT_STEPS`
  (augment.py).
- `resolve_backend(option, choice)`, `backend_choices(option)`, `check_resolved(**backends)`: the
  config's conv_backend, norm_backend and augment_backend (backends.py).

The kernels are built with the system's C++ compiler on first use and cached (build.py).
"""
from simclr_jax.native.augment import AUGMENT_STEPS, run_augment_steps
from simclr_jax.native.backends import backend_choices, check_resolved, resolve_backend
from simclr_jax.native.batch_norm import batch_norm_train
from simclr_jax.native.build import NativeUnavailable
from simclr_jax.native.conv import conv_function

__all__ = [
    "AUGMENT_STEPS", "NativeUnavailable", "backend_choices", "batch_norm_train", "check_resolved",
    "conv_function", "resolve_backend", "run_augment_steps",
]
