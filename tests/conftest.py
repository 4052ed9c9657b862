"""Test-session setup shared by every test file.

* Triton runs on CPU only under its interpreter, and the interpreter is chosen
  when `triton` is first imported: so set it here, before any test module (or
  `kernels.py`) is imported. NANOMEG_TEST_DEVICE=cuda (on a GPU machine) leaves the interpreter off,
  so that tests/test_kernels.py compiles and runs the kernels for real on the GPU.
* Hypothesis profiles: `ci` (default, small and quick), `dev` (more examples),
  `deep` (many examples, for a long soak). Choose with NANOMEG_PROFILE=dev.
"""

import os

if os.environ.get("NANOMEG_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=8, derandomize=True, print_blob=True, **_common)
settings.register_profile("dev", max_examples=50, **_common)
settings.register_profile("deep", max_examples=500, **_common)
settings.load_profile(os.environ.get("NANOMEG_PROFILE", "ci"))


@pytest.fixture(scope="session")
def pool():
    """Four gloo CPU workers, alive for the whole session (see tests/harness.py)."""
    from harness import WorkerPool

    workers = WorkerPool(world=4)
    workers.start()
    yield workers
    workers.stop()


@pytest.fixture(scope="session")
def pool8():
    """Eight gloo CPU workers, for the layouts of world 8 (pipeline x tensor x data parallel, 2 x 2 x 2)."""
    from harness import WorkerPool

    workers = WorkerPool(world=8)
    workers.start()
    yield workers
    workers.stop()
