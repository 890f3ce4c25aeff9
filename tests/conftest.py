"""Session-wide test settings.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. The variable
must be set before any ``@triton.jit`` function is defined, so it is set here, before
the test modules (and through them the library's Triton kernels) are imported.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    with tiny or small networks it is as fast, and immune to an oversubscribed CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
