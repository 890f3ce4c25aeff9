"""Memory accounting for supernets."""
from .saved import SavedTensorCounter, module_tensors, saved_activation_bytes

__all__ = ["SavedTensorCounter", "module_tensors", "saved_activation_bytes"]
