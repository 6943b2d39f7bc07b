"""Test setup: 8 fake CPU devices, so multi-device code runs here as on a pod slice."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The tests compile far more than they run (tiny models, a few steps each): XLA's cheapest compile
# (LLVM -O0, no expensive passes) makes the suite ~25% faster. Results differ from the optimised
# build's only by float rounding. Subprocesses the tests launch inherit it.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.set_visible_devices([], "GPU")
assert jax.device_count() == 8, "tests expect 8 fake CPU devices; import jax only after conftest"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
  """A TFDS data_dir holding the generated synthetic_shapes, made once per test module."""
  from simclr_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  directory = str(tmp_path_factory.mktemp("tfds"))
  input_pipeline.get_dataset_info("synthetic_shapes", data_dir=directory)
  return directory
