"""Tests run on 8 simulated CPU devices; XLA_FLAGS must be set before jax is imported."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# The measured CPU peak (for MFU) is cached; keep the tests' measurement out of the user's cache.
if "DANLU_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["DANLU_CACHE_DIR"] = tempfile.mkdtemp(prefix="danlu-test-cache-")
