"""host_memory.keep_freed_memory: XLA's per-execution temporaries stop page-faulting."""
import json
import subprocess
import sys

import pytest

# Runs a jitted function whose temporaries (64 MiB) exceed what glibc serves from a thread's
# arena without mmap, and prints the page faults of each call.
SCRIPT = """
import json, resource, sys, time
from simclr_jax import host_memory
kept = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else False
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.flip(x * 2.0, 0) @ jnp.ones((4096, 8))))
x = jnp.ones((4096, 4096))
temp_bytes = f.lower(x).compile().memory_analysis().temp_size_in_bytes
faults = []
for _ in range(16):
  time.sleep(0.05)  # XLA frees a call's temporaries on its own thread, soon after the call ends
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "temp_bytes": temp_bytes, "faults": faults}))
"""


def faults_per_call(mode: str) -> dict:
  completed = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                             check=True)
  return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is Linux's")
def test_kept_memory_ends_the_page_faults_of_each_execution():
  default, kept = faults_per_call("default"), faults_per_call("keep")
  assert kept["kept"] and not default["kept"]
  pages = default["temp_bytes"] // 4096
  assert pages > 10_000
  faulting = lambda run: sum(faults > pages // 2 for faults in run["faults"][-8:])
  # Without it every call maps its temporaries afresh and faults on most of their pages ...
  assert faulting(default) == 8, default
  # ... with it the heap grows over the first calls (while a call's temporaries may still be
  # allocated before the previous call's are freed) and the later calls reuse its pages.
  assert faulting(kept) <= 1, kept
