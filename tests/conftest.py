"""Test set-up: 8 fake CPU devices and no network, fixed before jax is imported."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TFDS_DISABLE_GCS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("NO_GCE_CHECK", "true")

# torchvision / timm / triton segfault when imported after TensorFlow on this stack; the reverse order is fine.
# Tests import both, so the torch side goes first in every test process (when the dev extras are installed).
try:
  import timm  # noqa: F401,E402  (imports torch and torchvision)
except ImportError:
  pass
