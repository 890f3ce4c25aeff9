"""Memory accounting for supernets: saved-for-backward bytes, the memory report
(``python -m adarts_kernels.profiling``) and the largest-batch probe."""
from .max_batch import find_max_batch, is_oom, safe_batch
from .saved import SavedTensorCounter, module_tensors, saved_activation_bytes

__all__ = ["SavedTensorCounter", "module_tensors", "saved_activation_bytes", "find_max_batch", "is_oom",
           "safe_batch"]
