"""C++ kernels that XLA's CPU backend calls through its FFI, built on first use.

jaxlib ships the FFI headers, oneDNN comes from PyPI (`onednn-devel-cpu-gomp`, in
requirements.txt for x86-64 Linux) and the system's C++ compiler (`$CXX`, else g++ or clang++)
builds each source here once into a per-user cache (`$SIMCLR_JAX_CACHE`, else
`$XDG_CACHE_HOME/simclr_jax` or `~/.cache/simclr_jax`), keyed by the source (with the shared
headers), the compiler and the jaxlib version, so a change to any of them rebuilds it. Building
takes a few seconds; several processes building at once each write their own file and the last
rename wins.
"""
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
from typing import Callable

import jax
import jaxlib

SOURCE_DIR = os.path.dirname(os.path.abspath(__file__))
ONEDNN_CONV_TARGETS = ("simclr_conv_forward", "simclr_conv_backward_data",
                       "simclr_conv_backward_weights")
_COMPILE_FLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden")
_ONEDNN_HEADER = os.path.join("include", "oneapi", "dnnl", "dnnl.hpp")
_ONEDNN_PACKAGES = "pip install onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0"


class NativeUnavailable(RuntimeError):
  """A native kernel cannot be built or loaded here; the message says what to install."""


def cache_dir() -> str:
  if os.environ.get("SIMCLR_JAX_CACHE"):
    return os.environ["SIMCLR_JAX_CACHE"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "simclr_jax")


def _onednn_prefix() -> str:
  """The install prefix holding oneDNN's headers and library (the wheels' data directory)."""
  candidates = [sysconfig.get_path("data"), sys.prefix, site.getuserbase()]
  for prefix in dict.fromkeys(candidates):
    if os.path.exists(os.path.join(prefix, _ONEDNN_HEADER)):
      return prefix
  raise NativeUnavailable(
      f"oneDNN's headers ({_ONEDNN_HEADER}) are in none of {list(dict.fromkeys(candidates))}; "
      f"install them with `{_ONEDNN_PACKAGES}` (x86-64 Linux wheels)")


def _compiler() -> str:
  for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
    if name and shutil.which(name):
      return shutil.which(name)
  raise NativeUnavailable("no C++ compiler found ($CXX, g++, clang++ or c++): install one, e.g. "
                          "`apt install g++`")


def _build(source: str, include_dirs: list[str], libraries: list[str] = (),
           library_dir: str | None = None, flags: tuple[str, ...] = ()) -> str:
  """Path of the shared library built from `source` (built now unless cached); `flags` come
  after the common ones, so e.g. '-O3' overrides '-O2'."""
  code = b""
  for name in [source, *sorted(n for n in os.listdir(SOURCE_DIR) if n.endswith(".h"))]:
    with open(os.path.join(SOURCE_DIR, name), "rb") as f:
      code += f.read()
  compiler = _compiler()
  linked = [f"-L{library_dir}", *(f"-l{lib}" for lib in libraries),
            f"-Wl,-rpath,{library_dir}"] if library_dir else []
  command = [compiler, *_COMPILE_FLAGS, *flags, *(f"-isystem{d}" for d in include_dirs),
             os.path.join(SOURCE_DIR, source), *linked]
  key = hashlib.sha256(b"\0".join(
      [code, " ".join(command).encode(), jaxlib.__version__.encode()])).hexdigest()[:16]
  directory = os.path.join(cache_dir(), "native")
  target = os.path.join(directory, f"{os.path.splitext(source)[0]}-{key}.so")
  if os.path.exists(target):
    return target
  os.makedirs(directory, exist_ok=True)
  fd, partial = tempfile.mkstemp(suffix=".so", dir=directory)
  os.close(fd)
  start = time.monotonic()
  result = subprocess.run([*command, "-o", partial], capture_output=True, text=True)
  if result.returncode != 0:
    os.unlink(partial)
    raise NativeUnavailable(f"building {source} failed ({' '.join(command)}):\n"
                            f"{result.stderr[-4000:]}")
  os.replace(partial, target)
  logging.info("Built %s in %.1f s: %s", source, time.monotonic() - start, target)
  return target


def _register(path: str, targets: tuple[str, ...]) -> None:
  try:
    library = ctypes.cdll.LoadLibrary(path)
  except OSError as e:
    raise NativeUnavailable(f"loading {path} failed: {e}") from e
  for name in targets:
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)), platform="cpu")


@functools.cache
def register_onednn_conv() -> None:
  """Builds (once) and registers the oneDNN convolution FFI targets for the CPU platform.

  Raises NativeUnavailable saying what is missing.
  """
  prefix = _onednn_prefix()
  _register(_build("onednn_conv.cc", [jax.ffi.include_dir(), os.path.join(prefix, "include")],
                   ["dnnl", "gomp"], os.path.join(prefix, "lib")), ONEDNN_CONV_TARGETS)


def _unavailable_reason(register: Callable[[], None]) -> str | None:
  try:
    register()
  except NativeUnavailable as e:
    return str(e)
  return None


@functools.cache
def onednn_conv_unavailable_reason() -> str | None:
  """None when the oneDNN convolutions can run here, else why not."""
  return _unavailable_reason(register_onednn_conv)


# Plain C++ loops over pixels vectorise only with these: -O3 (GCC 12's -O2 ran the augmentation
# kernels 2-8x slower), -fno-trapping-math (lets the compiler compute both sides of a select; the
# results are the same) and, on x86-64, AVX (8 floats a vector; jaxlib itself needs it there).
# Measured in experiments/results/augment_throughput.md.
_VECTORISING_FLAGS = ("-O3", "-fno-trapping-math",
                      *(("-mavx",) if platform.machine() in ("x86_64", "AMD64") else ()))
AUGMENT_TARGETS = ("simclr_augment_steps",)
BATCH_NORM_TARGETS = ("simclr_bn_moments", "simclr_bn_apply", "simclr_bn_apply_residual",
                      "simclr_bn_grad_sums", "simclr_bn_grad_input",
                      "simclr_bn_grad_input_residual")


def _register_vectorised(source: str, targets: tuple[str, ...]) -> None:
  _register(_build(source, [jax.ffi.include_dir()], flags=_VECTORISING_FLAGS), targets)


@functools.cache
def register_augment_kernels() -> None:
  """Builds (once) and registers the augmentation FFI target for the CPU platform.

  Raises NativeUnavailable saying what is missing.
  """
  _register_vectorised("augment_kernels.cc", AUGMENT_TARGETS)


@functools.cache
def register_batch_norm_kernels() -> None:
  """Builds (once) and registers the batch norm FFI targets for the CPU platform.

  Raises NativeUnavailable saying what is missing.
  """
  _register_vectorised("batch_norm.cc", BATCH_NORM_TARGETS)


@functools.cache
def augment_kernels_unavailable_reason() -> str | None:
  """None when the augmentation kernels can run here, else why not."""
  return _unavailable_reason(register_augment_kernels)


@functools.cache
def batch_norm_kernels_unavailable_reason() -> str | None:
  """None when the batch norm kernels can run here, else why not."""
  return _unavailable_reason(register_batch_norm_kernels)


def resolve_backend(option: str, choice: str, *, choices: tuple[str, ...], portable: str,
                    native_default: str, unavailable_reason: Callable[[], str | None],
                    fallback: str, platform: str | None = None) -> str:
  """The backend `choice` of config field `option` ('auto', `portable` or a native one from
  `choices`), resolved for `platform` (default: this run's, `jax.default_backend()`; name
  another, e.g. 'cuda' or 'tpu', to resolve for a program lowered here for it). 'auto' is
  `native_default` on the CPU platform when the kernels can run (`unavailable_reason()` is
  None), else `portable`, logging why on CPU, where `fallback` says what runs instead. Raises
  ValueError for an unknown choice or a native one that cannot run there."""
  if choice not in choices:
    raise ValueError(f"{option}={choice!r}; allowed: {', '.join(choices)}")
  if choice == portable:
    return choice
  platform = platform or jax.default_backend()
  on_cpu = platform == "cpu"
  reason = (unavailable_reason() if on_cpu else
            f"the kernels run on the CPU platform only; this one is {platform!r}")
  if choice == "auto":
    if reason is not None and on_cpu:
      logging.warning("%s='auto' uses %s: %s", option, fallback, reason)
    return portable if reason is not None else native_default
  if reason is not None:
    raise ValueError(f"{option}={choice!r} cannot run here: {reason}. Use 'auto' or "
                     f"'{portable}'.")
  return choice
