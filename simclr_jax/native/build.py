"""Building the C++ kernels on first use and registering their FFI targets with XLA's CPU backend.

jaxlib ships the FFI headers, oneDNN comes from PyPI (`onednn-devel-cpu-gomp`, in
requirements.txt for x86-64 Linux) and the system's C++ compiler (`$CXX`, else g++ or clang++)
builds each source here once into a per-user cache (`$SIMCLR_JAX_CACHE`, else
`$XDG_CACHE_HOME/simclr_jax` or `~/.cache/simclr_jax`), keyed by the source (with the shared
headers), the compiler and the jaxlib version, so a change to any of them rebuilds it. Building
takes a few seconds; several processes building at once each write their own file and the last
rename wins.

Each glue module declares its source and target names once, as a `Kernels`.
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
_COMPILE_FLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden")
_ONEDNN_HEADER = os.path.join("include", "oneapi", "dnnl", "dnnl.hpp")
_ONEDNN_PACKAGES = "pip install onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0"


def _cpu_flags() -> set[str]:
  """This CPU's feature flags as Linux lists them (none elsewhere)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return set(line.split(":", 1)[1].split())
  except OSError:
    pass
  return set()


# Plain C++ loops over pixels vectorise only with these: -O3 (GCC 12's -O2 ran the augmentation
# kernels 2-8x slower), -fno-trapping-math (lets the compiler compute both sides of a select; the
# results are the same) and, on x86-64, AVX (8 floats a vector; jaxlib itself needs it there),
# with AVX2 where this CPU has it (8 ints a vector: the conversions of bfloat16 maps). Measured
# in experiments/results/augment_throughput.md and train_step.md. The flags are part of the
# build's cache key, so a CPU without AVX2 builds its own library.
_X86_VECTORS = ("-mavx", *(("-mavx2",) if "avx2" in _cpu_flags() else ()))
_VECTORISING_FLAGS = ("-O3", "-fno-trapping-math",
                      *(_X86_VECTORS if platform.machine() in ("x86_64", "AMD64") else ()))


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


def build_library(source: str, include_dirs: list[str], libraries: list[str] = (),
                  library_dir: str | None = None, flags: tuple[str, ...] = ()) -> str:
  """Path of the shared library built from `source` in SOURCE_DIR (built now unless cached);
  `flags` come after the common ones, so e.g. '-O3' overrides '-O2'."""
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


def vectorised_build() -> dict:
  """`build_library` arguments of plain C++ loops (the batch norm and augmentation kernels)."""
  return dict(include_dirs=[jax.ffi.include_dir()], flags=_VECTORISING_FLAGS)


def onednn_build() -> dict:
  """`build_library` arguments of a source calling oneDNN; raises NativeUnavailable without it."""
  prefix = _onednn_prefix()
  return dict(include_dirs=[jax.ffi.include_dir(), os.path.join(prefix, "include")],
              libraries=["dnnl", "gomp"], library_dir=os.path.join(prefix, "lib"))


class Kernels:
  """The FFI targets of one C++ source in this directory, built and registered for the CPU
  platform on first use. `build_arguments()` gives `build_library`'s other arguments."""

  def __init__(self, source: str, targets: tuple[str, ...],
               build_arguments: Callable[[], dict] = vectorised_build):
    self.source = source
    self.targets = tuple(targets)
    self._build_arguments = build_arguments
    self._registered = False

  def register(self) -> None:
    """Builds (once) and registers the targets. Raises NativeUnavailable saying what is missing."""
    if self._registered:
      return
    path = build_library(self.source, **self._build_arguments())
    try:
      library = ctypes.cdll.LoadLibrary(path)
    except OSError as e:
      raise NativeUnavailable(f"loading {path} failed: {e}") from e
    for name in self.targets:
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)), platform="cpu")
    self._registered = True

  @functools.cache
  def unavailable_reason(self) -> str | None:
    """None when the kernels can run here, else why not."""
    try:
      self.register()
    except NativeUnavailable as e:
      return str(e)
    return None
