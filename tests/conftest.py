"""Session-wide test settings.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. The variable
must be set before any ``@triton.jit`` function is defined, so it is set here, before
the test modules (and through them the library's Triton kernels) are imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
