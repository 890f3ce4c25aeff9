"""Constants that every backend of the fused ops shares, below all of them.

The op layer (:mod:`adarts_kernels.ops`) dispatches to the Triton launchers
(:mod:`adarts_kernels.triton`) and the modules (:mod:`adarts_kernels.nn`) call the ops; a
constant they all need lives here, so that no backend imports the op layer that dispatches to
it. The compiled kernels carry the same numbers in ``csrc/validate.h`` (tests/test_backend.py
checks that they agree).
"""

#: The most BN-ended inputs ``z`` one ``mixed_sum`` call takes: the CUDA and Triton kernels hold
#: the ``z`` pointers in fixed arrays of this size (``kMixedSumMaxZ`` in csrc/validate.h).
MAX_Z = 5
