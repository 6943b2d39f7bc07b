"""Keeps freed host memory mapped, so that XLA's CPU executions stop page-faulting every step.

XLA's CPU client allocates an execution's temporaries as one block (162 MB for the width-1/4
ResNet-18 training step at 64 pairs) with posix_memalign, from the malloc arena of the thread
that runs it. glibc serves a block that large from a thread's arena with a fresh mmap and unmaps
it when the step frees it, so each step faulted in every page again: 40,000 page faults a step,
about a tenth of that step's time (experiments/results/train_step.md). With one arena (the main
one, which grows with brk), no mmap for large blocks and no trimming, the heap grows over the
first few steps to the blocks live at once, and later steps reuse its pages. The price is that
the process keeps its peak heap, which training reaches every step anyway.
"""
import ctypes
import sys

from absl import logging

# glibc's mallopt options (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
# (glibc tunable, mallopt option, value)
_SETTINGS = (("arena_max", M_ARENA_MAX, 1), ("mmap_max", M_MMAP_MAX, 0),
             ("trim_threshold", M_TRIM_THRESHOLD, 2**31 - 1))
# The same settings for a process started with them in its environment (e.g. a benchmark's peer).
GLIBC_TUNABLES = ":".join(f"glibc.malloc.{name}={value}" for name, _, value in _SETTINGS)


def keep_freed_memory() -> bool:
  """Sets glibc's malloc as described above; True if it did, False where libc is not glibc.

  Call it first thing in the process, before JAX or TensorFlow start threads: glibc fixes its
  arena limit when a second thread first allocates.
  """
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    version = libc.gnu_get_libc_version().decode()
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  if not all(mallopt(option, value) == 1 for _, option, value in _SETTINGS):
    logging.warning("glibc %s refused a mallopt setting; freed memory may be unmapped", version)
    return False
  return True
