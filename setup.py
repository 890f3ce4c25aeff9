"""Install adarts_kernels.

    pip install torch            # first: the build never chooses your torch for you
    pip install --no-build-isolation -e .

The compiled operators (torch.ops.adarts_C.*, module adarts_kernels._C) are built from
csrc/ whenever a C++ compiler is present; without one, or with ADARTS_SKIP_EXT=1, the
package installs as pure Python and uses the plain-PyTorch reference ops.

Environment:
    ADARTS_SKIP_EXT=1   do not build the extension (pure Python install)
    FORCE_CUDA=1        build the CUDA kernels even where no GPU is visible (needs a CUDA torch and nvcc)
    ADARTS_DEBUG=1      keep the CUDA device asserts (release builds pass -DNDEBUG to nvcc, see
                        csrc/cuda/nvcc_flags.py: a bad idx entry is then skipped by the kernels
                        instead of killing the CUDA context)
    MAX_JOBS=N          parallel compile jobs (default: min(cores, RAM / 4 GB))
"""
import glob
import importlib.util
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")


def load_nvcc_flags():
    """csrc/cuda/nvcc_flags.py, the one list of nvcc flags (the compile test uses it too)."""
    spec = importlib.util.spec_from_file_location("adarts_nvcc_flags", os.path.join(CSRC, "cuda", "nvcc_flags.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def read_version():
    with open(os.path.join(HERE, "adarts_kernels", "__init__.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip('"')
    raise RuntimeError("no __version__ in adarts_kernels/__init__.py")


def say(msg):
    print(f"adarts_kernels: {msg}", file=sys.stderr, flush=True)


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def has_cxx_compiler():
    """A C++ compiler on PATH: $CXX if set, else the usual names (cl on Windows)."""
    names = [os.environ["CXX"].split()[0]] if os.environ.get("CXX") else []
    names += ["cl"] if os.name == "nt" else ["c++", "g++", "clang++"]
    return any(shutil.which(n) for n in names)


def default_max_jobs():
    """min(cores, RAM / 4 GB), at least 1: each heavy C++ translation unit takes 1-3 GB."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return max(1, cores)
    return max(1, min(cores, ram // (4 * 1024 ** 3)))


def rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def cpu_sources():
    return rel([os.path.join(CSRC, "adarts.cpp")] + glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))


def cuda_sources(torch):
    """The CUDA sources to add, or [] for a CPU-only build.

    CUDA is wanted when FORCE_CUDA=1, or when this torch is a CUDA build and nvcc is found
    (torch's CUDA_HOME). The sources are csrc/cuda/*.cu (plain CUDA, no torch headers) and
    csrc/cuda/*.cpp (the torch bindings, one per op, each with its own
    TORCH_LIBRARY_IMPL(adarts_C, CUDA, ...) registrations); if they are not there yet, the
    build stays CPU-only.
    """
    from torch.utils.cpp_extension import CUDA_HOME

    if env_flag("FORCE_CUDA"):
        wanted, why = True, "FORCE_CUDA=1"
    else:
        wanted = torch.version.cuda is not None and CUDA_HOME is not None
        why = f"torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA_HOME={CUDA_HOME}"
    if not wanted:
        return []
    cu = glob.glob(os.path.join(CSRC, "cuda", "*.cu"))
    bindings = glob.glob(os.path.join(CSRC, "cuda", "*.cpp"))
    if not cu or not bindings:
        say(f"CUDA wanted ({why}) but csrc/cuda/*.cu and csrc/cuda/*.cpp are not both present: CPU only")
        return []
    if torch.version.cuda is None:
        raise RuntimeError(f"adarts_kernels: FORCE_CUDA=1 but torch {torch.__version__} is a CPU-only build; "
                           "install a CUDA build of torch or unset FORCE_CUDA")
    if CUDA_HOME is None:
        raise RuntimeError("adarts_kernels: FORCE_CUDA=1 but no CUDA toolkit was found (nvcc not on PATH and "
                           "CUDA_HOME unset); set CUDA_HOME or unset FORCE_CUDA")
    return rel(cu + bindings)


def extension_build():
    """(ext_modules, cmdclass): the compiled extension, or ([], {}) for a pure Python install."""
    if env_flag("ADARTS_SKIP_EXT"):
        say("ADARTS_SKIP_EXT=1: pure Python install (no compiled extension)")
        return [], {}
    if not has_cxx_compiler():
        say("no C++ compiler found: pure Python install (no compiled extension)")
        return [], {}
    try:
        import torch  # only here: a pure Python install never needs torch at build time
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as e:
        say(f"torch is not importable at build time ({e}): pure Python install. "
            "Install torch first and use `pip install --no-build-isolation` to build the extension")
        return [], {}

    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    sources = cpu_sources()
    kernels = len(glob.glob(os.path.join(CSRC, "cpu", "*_kernel.cpp")))
    if os.name == "nt":
        cxx = ["/O2"]
    else:
        # No -std flag here: BuildExtension adds the standard this torch's headers need
        # (-std=c++20 for torch 2.13, whose headers use C++20 features); the sources
        # themselves are plain C++17.
        cxx = ["-O3"]
    # at::parallel_for is header-inline: without -fopenmp (_OPENMP undefined) it runs every
    # range serially in the extension, whatever torch.get_num_threads() says. Measured with
    # 2 threads: attention_score fwd at 256x16x32x32 took 0.97 ms with 1 or 2 threads before
    # this flag. Linux/GCC and an OpenMP torch (the pip wheels) only; elsewhere it stays serial.
    link = []
    if sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info():
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    common = dict(
        extra_link_args=link,
        include_dirs=[CSRC],
        depends=rel(glob.glob(os.path.join(CSRC, "*.h")) + glob.glob(os.path.join(CSRC, "*", "*.h"))
                    + glob.glob(os.path.join(CSRC, "*", "*.cuh"))),
        py_limited_api=False,
    )
    cuda = cuda_sources(torch)
    if cuda:
        nv = load_nvcc_flags()
        debug = nv.debug_build()
        if debug:
            say("ADARTS_DEBUG=1: CUDA device asserts kept (no -DNDEBUG for nvcc)")
        ext = CUDAExtension(
            "adarts_kernels._C",
            sources + cuda,
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nv.nvcc_flags(debug)},
            **common,
        )
        say(f"building CPU + CUDA extension ({kernels} kernels, {len(cuda)} CUDA sources), "
            f"MAX_JOBS={os.environ['MAX_JOBS']}")
    else:
        ext = CppExtension("adarts_kernels._C", sources, extra_compile_args={"cxx": cxx}, **common)
        say(f"building CPU extension ({kernels} kernels), MAX_JOBS={os.environ['MAX_JOBS']}")
    return [ext], {"build_ext": BuildExtension}


EXT_MODULES, CMDCLASS = extension_build()

setup(
    name="adarts_kernels",
    version=read_version(),
    description="Memory-efficient differentiable architecture search (ADARTS, PC-DARTS, DARTS) for PyTorch",
    packages=find_packages(include=["adarts_kernels", "adarts_kernels.*"]),
    python_requires=">=3.9",
    # Never an exact torch pin: the user's torch (CPU or CUDA build) is the one to use.
    install_requires=["torch>=2.11", "numpy", "tqdm", "matplotlib", "scikit-learn"],
    extras_require={"test": ["pytest", "pytest-benchmark", "triton", "ruff"]},
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    zip_safe=False,
)
