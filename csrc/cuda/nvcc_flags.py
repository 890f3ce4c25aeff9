"""The nvcc flags of the CUDA kernels, in one place.

setup.py builds the extension with them and tests/test_cuda_compile.py compiles the .cu files
with the same list (plain Python, no torch import: setup.py loads this file by path).

- TORCH_NVCC_FLAGS: what torch.utils.cpp_extension adds to every nvcc call of an extension
  build (its COMMON_NVCC_FLAGS); the test checks that the two lists agree, and compiles with
  them so that the kernels never rely on the implicit half / bfloat16 conversions and operators.
- nvcc_flags(debug): the flags setup.py passes itself. Release builds (the default) define
  NDEBUG: the device asserts of the kernels (an out-of-range idx entry, which the kernels skip
  anyway) are compiled out, so that a bad index never kills the CUDA context; the Python layer
  checks idx with asynchronous device asserts where the user gave it. ADARTS_DEBUG=1 at build
  time keeps the device asserts (and their printf of the bad entry).
- TEST_ARCHS: the architectures the compile test builds for (Ampere and Hopper); the real
  build takes torch's (TORCH_CUDA_ARCH_LIST, or the visible GPUs).
"""
import os

TORCH_NVCC_FLAGS = (
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
)

TEST_ARCHS = ("80", "90")

DEBUG_ENV = "ADARTS_DEBUG"


def debug_build(environ=None) -> bool:
    """True when ADARTS_DEBUG is set to 1 / true / yes / on (keep the device asserts)."""
    env = os.environ if environ is None else environ
    return env.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def nvcc_flags(debug: bool = False) -> list:
    """The flags setup.py gives nvcc (torch adds TORCH_NVCC_FLAGS and the arch flags)."""
    flags = ["-O3", "-lineinfo"]
    if not debug:
        flags.append("-DNDEBUG")
    return flags


def arch_flags(archs=TEST_ARCHS) -> list:
    """-gencode flags: SASS for each sm_XX of archs."""
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
