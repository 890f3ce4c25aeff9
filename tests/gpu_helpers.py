"""Helpers shared by the GPU test files."""
import contextlib

import torch


@contextlib.contextmanager
def no_host_sync():
    """Any host<->device synchronisation inside raises (torch's sync debug mode)."""
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(prev)
