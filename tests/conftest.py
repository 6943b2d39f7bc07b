"""Test setup: 8 fake CPU devices, so multi-device code runs here as on a pod slice."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402  (must come after XLA_FLAGS)
import tensorflow as tf  # noqa: E402

tf.config.set_visible_devices([], "GPU")
assert jax.device_count() == 8, "tests expect 8 fake CPU devices; import jax only after conftest"
