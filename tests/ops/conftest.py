"""Per-op tests: a test parametrised with ``impl`` runs only where that backend can run.
Every Triton launch interpreted on CPU is bounds-checked, and converts float32 to bfloat16
by rounding to nearest even as on a GPU (``tests/triton_guard.py``)."""
import pytest
from helpers import require
from triton_guard import checked_triton, rtne_bfloat16


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if call.when == "call":
        item.triton_call_failed = outcome.get_result().failed


@pytest.fixture(autouse=True)
def _backend_available(request):
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and "impl" in callspec.params:
        require(callspec.params["impl"])


@pytest.fixture(autouse=True)
def _triton_bounds_checked(request):
    """Loads and stores of interpreted Triton kernels stay inside their tensor arguments;
    a violation the test swallowed fails its teardown (one the test failed with is not
    reported twice)."""
    with rtne_bfloat16(), checked_triton() as guard:
        yield guard
        guard.quiet = getattr(request.node, "triton_call_failed", False)
