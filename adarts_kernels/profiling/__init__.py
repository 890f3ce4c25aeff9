"""Memory accounting for supernets: saved-for-backward bytes, the memory report
(``python -m adarts_kernels.profiling``), the largest-batch probe, the peak of live tensors
on any device (:mod:`.peak`) and the ``torch.utils.checkpoint`` peers (:mod:`.checkpointed`)."""
from .checkpointed import Checkpointed, checkpoint_supernet
from .max_batch import find_max_batch, is_oom, safe_batch
from .peak import PeakMemoryMode, peak_memory, step_state
from .saved import SavedTensorCounter, module_tensors, saved_activation_bytes

__all__ = ["SavedTensorCounter", "module_tensors", "saved_activation_bytes", "find_max_batch", "is_oom",
           "safe_batch", "PeakMemoryMode", "peak_memory", "step_state", "Checkpointed", "checkpoint_supernet"]
