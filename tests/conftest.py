import os
import shutil
import sys
import tempfile

# Without a GPU the Triton kernels run in the interpreter; it must be chosen before anything imports triton.
if not shutil.which("nvidia-smi"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# every reused group trace (passes/trace_cache.py) is checked against a fresh trace of the group
os.environ.setdefault("DPCOMPILE_VERIFY_TRACE_CACHE", "1")

# Inductor's on-disk caches are shared between processes: give the test run its own
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="dpcompile-inductor-"))
sys.path.insert(0, os.path.dirname(__file__))

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_ttir_cache_mismatch():
    """Verify mode: no launch's cached TTIR (dpcompile/ttir_cache.py) differed from a fresh one during the
    test (torch's kernel analysis swallows the raise, so the record is checked here)."""
    yield
    module = sys.modules.get("dpcompile.ttir_cache")
    if module is not None and module.mismatches():
        found = module.mismatches()
        module._mismatches.clear()
        pytest.fail(f"cached TTIR differed from a fresh one: {found}")
