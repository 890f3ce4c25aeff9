"""The fused ADARTS edge operations as ``torch.library`` custom ops (namespace ``adarts``).

Each op's body is the plain-PyTorch reference (``adarts_kernels.ops.reference``); the
compiled C++ (CPU), CUDA and Triton kernels attach as fast paths, chosen per call with
``impl=`` or by ``ADARTS_KERNELS_IMPL`` (see ``adarts_kernels.backend``).
"""
from .attention_gather import attention_gather
from .attention_score import attention_score
from .attention_writeback import attention_writeback
from .mixed_sum import mixed_sum

__all__ = ["attention_score", "attention_gather", "attention_writeback", "mixed_sum"]
