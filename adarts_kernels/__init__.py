"""adarts_kernels: memory-efficient differentiable architecture search (ADARTS) for PyTorch."""
__version__ = "0.1.0"
