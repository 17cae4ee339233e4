import os
import shutil
import sys
import tempfile

# Without a GPU the Triton kernels run in the interpreter; it must be chosen before anything imports triton.
if not shutil.which("nvidia-smi"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
def _no_randomized_norm_records_across_tests():
    """Randomized-norm runs are recorded process-wide for the accountant (privacy/randomized_accounting.py): a test
    that ran them must not make a later test's accountant or optimizer refuse."""
    yield
    from dpcompile.privacy.randomized_accounting import take_randomized_use

    take_randomized_use()
    ro = sys.modules.get("dpcompile.codegen.randomized_ops")
    if ro is not None:
        ro.manual_probe_seed(None)
