"""Per-op tests: a test parametrised with ``impl`` runs only where that backend can run."""
import pytest
from helpers import require


@pytest.fixture(autouse=True)
def _backend_available(request):
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and "impl" in callspec.params:
        require(callspec.params["impl"])
