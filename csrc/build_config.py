"""What the compiled extension is built from and with, in one place.

Plain Python with no imports beyond the standard library: setup.py loads this file by path
(the package is not importable while it is being built) and so does the first-use build of
``adarts_kernels._ext`` (from the copy of csrc/ that every wheel carries as
``adarts_kernels/_csrc``). Both builds therefore compile the same sources with the same flags.

- cpu_sources(csrc) / cuda_sources(csrc): the translation units under the folder csrc (the
  checkout's csrc/ or a wheel's adarts_kernels/_csrc).
- cxx_flags(...) / link_flags(...): release builds carry no debug information (-g0, and the
  linker strips the library: 12.4 MB with the interpreter's default -g, see the README for the
  stripped size); ADARTS_DEBUG=1 keeps both, and the CUDA device asserts (nvcc_flags.py, whose
  debug_build() reads the variable for both builds).
- record(...): what a built library records about the torch it was built against; a library
  whose record differs from the running torch is not loaded (a C++ extension built against
  one torch release does not load into another: undefined symbols, or worse).
"""
import glob
import os

RECORD_NAME = "_C_build.json"


def _under(csrc, *parts):
    return sorted(glob.glob(os.path.join(csrc, *parts)))


def cpu_sources(csrc):
    """adarts.cpp (the schemas), edge.cpp (the fused edge's host sequence, device-generic ATen),
    edge_node.cpp (the fused edge as one autograd node) and cpu/*.cpp (the CPU kernels)."""
    return [os.path.join(csrc, "adarts.cpp"), os.path.join(csrc, "edge.cpp"),
            os.path.join(csrc, "edge_node.cpp")] + _under(csrc, "cpu", "*.cpp")


def cuda_sources(csrc):
    """cuda/*.cu (plain CUDA, no torch headers) and cuda/*.cpp (their torch bindings, compiled
    only with WITH_CUDA): [] unless both kinds are present."""
    cu, bindings = _under(csrc, "cuda", "*.cu"), _under(csrc, "cuda", "*.cpp")
    return cu + bindings if cu and bindings else []


def headers(csrc):
    """Every header the sources include (the build's dependencies)."""
    return _under(csrc, "*.h") + _under(csrc, "*", "*.h") + _under(csrc, "*", "*.cuh")


def build_files(csrc):
    """Every file either build reads: sources, headers and the two flag files. setup.py ships
    them in the wheel; the sdist test checks that the sdist holds them all."""
    return (cpu_sources(csrc) + _under(csrc, "cuda", "*.cu") + _under(csrc, "cuda", "*.cpp") + headers(csrc)
            + [os.path.join(csrc, "build_config.py"), os.path.join(csrc, "cuda", "nvcc_flags.py")])


def openmp(platform: str, parallel_info: str) -> bool:
    """-fopenmp for Linux with an OpenMP torch (the pip wheels). at::parallel_for is
    header-inline: without _OPENMP it runs every range serially in the extension, whatever
    torch.get_num_threads() says (attention_score fwd at 256x16x32x32 took 0.97 ms with 1 or 2
    threads before this flag, measured on 2 threads)."""
    return platform.startswith("linux") and "OpenMP" in parallel_info


def cxx_flags(platform: str, parallel_info: str, debug: bool) -> list:
    """C++ flags. No -std flag: torch's build helpers add the standard its headers need
    (-std=c++20 for torch 2.13); the sources are plain C++17."""
    if platform.startswith("win"):
        return ["/O2"]
    flags = ["-O3"] + ([] if debug else ["-g0"])
    return flags + (["-fopenmp"] if openmp(platform, parallel_info) else [])


def link_flags(platform: str, parallel_info: str, debug: bool) -> list:
    """Linker flags: OpenMP where the compile uses it; -s (strip) for release builds on Linux."""
    if platform.startswith("win"):
        return []
    flags = ["-fopenmp"] if openmp(platform, parallel_info) else []
    return flags + (["-s"] if platform.startswith("linux") and not debug else [])


def record(torch_version: str, cuda_version, cuda_kernels: bool, python: str, debug: bool) -> dict:
    """The build record written beside a built library (RECORD_NAME)."""
    return {"torch": torch_version, "cuda": cuda_version, "cuda_kernels": bool(cuda_kernels),
            "python": python, "debug": bool(debug)}
