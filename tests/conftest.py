"""Every test runs on 8 simulated CPU devices, set before jax is first imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402  (after the flags above)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
  """Tests marked with a platform (`gpu`: the GPU tier, `pytest -m gpu`; `tpu`) skip unless jax's
  backend is that platform."""
  del config
  backend = jax.default_backend()
  for platform in ("gpu", "tpu"):
    if backend == platform:
      continue
    skip = pytest.mark.skip(reason=f"{platform} tier: run on a {platform.upper()} with "
                                   f"JAX_PLATFORMS={'cuda' if platform == 'gpu' else 'tpu'} "
                                   f"python -m pytest -m {platform} tests")
    for item in items:
      if item.get_closest_marker(platform) is not None:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def devices():
  """The 8 simulated CPU devices. Under JAX_PLATFORMS=cuda (the suite run on a GPU) the tests that take them
  skip: they need the simulated mesh."""
  if jax.default_backend() != "cpu":
    pytest.skip("needs the 8 simulated CPU devices; run with JAX_PLATFORMS=cpu")
  assert len(jax.devices()) == 8, "tests/conftest.py must run before jax initialises its backend"
  return jax.devices()
