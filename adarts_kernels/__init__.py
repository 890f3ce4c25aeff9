"""adarts_kernels: memory-efficient differentiable architecture search (ADARTS) for PyTorch."""
__version__ = "0.1.0"

from .backend import backends  # noqa: E402
from .nn.fused import FusedAttentionMixedOp  # noqa: E402

__all__ = ["backends", "FusedAttentionMixedOp", "__version__"]
