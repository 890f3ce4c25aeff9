"""Install adarts_kernels.

    pip install torch            # first: the build never chooses your torch for you
    pip install .                # or a wheel, or the sdist; -e . --no-build-isolation to develop

The compiled operators (torch.ops.adarts_C.*, module adarts_kernels._C) are built from csrc/
against the torch that will run them: the build environment's torch, or, when pip's build
isolation hides it, the torch that the installing interpreter imports (found by asking that
interpreter; an isolated build never downloads a torch). The built library records that torch
version (_C_build.json beside it): the package loads it only under the same torch. Where no
torch is visible at build time (or ADARTS_SKIP_EXT=1, or no compiler), the package installs
without it and builds it at the first use of a fused op (adarts_kernels._ext: the same sources,
shipped in every wheel as adarts_kernels/_csrc, the same flags, a per-user cache).

Environment:
    ADARTS_SKIP_EXT=1   do not build the extension now (it is built at first use instead)
    FORCE_CUDA=1        build the CUDA kernels even where no GPU is visible (needs a CUDA torch and nvcc)
    ADARTS_DEBUG=1      keep debug information and the CUDA device asserts (release builds pass -g0 and
                        strip the library, and pass -DNDEBUG to nvcc, see csrc/cuda/nvcc_flags.py: a bad
                        idx entry is then skipped by the kernels instead of killing the CUDA context)
    MAX_JOBS=N          parallel compile jobs (default: min(cores, RAM / 4 GB))
"""
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")


def load_by_path(name, path):
    """A plain-Python file of csrc/ (the package itself is not importable during its build)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_nvcc_flags():
    """csrc/cuda/nvcc_flags.py, the one list of nvcc flags (the compile test uses it too)."""
    return load_by_path("adarts_nvcc_flags", os.path.join(CSRC, "cuda", "nvcc_flags.py"))


BC = load_by_path("adarts_build_config", os.path.join(CSRC, "build_config.py"))


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


def cuda_sources(torch):
    """The CUDA sources to add, or [] for a CPU-only build.

    CUDA is wanted when FORCE_CUDA=1, or when this torch is a CUDA build and nvcc is found
    (torch's CUDA_HOME). The sources are csrc/cuda/*.cu (plain CUDA, no torch headers) and
    csrc/cuda/*.cpp (the torch bindings, one per op, each with its own
    TORCH_LIBRARY_IMPL(adarts_C, CUDA, ...) registrations); if they are not both there (a
    source tree that lost them), the build stays CPU-only and says so.
    """
    from torch.utils.cpp_extension import CUDA_HOME

    if env_flag("FORCE_CUDA"):
        wanted, why = True, "FORCE_CUDA=1"
    else:
        wanted = torch.version.cuda is not None and CUDA_HOME is not None
        why = f"torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA_HOME={CUDA_HOME}"
    if not wanted:
        return []
    sources = BC.cuda_sources(CSRC)
    if not sources:
        say(f"CUDA wanted ({why}) but csrc/cuda/*.cu and csrc/cuda/*.cpp are not both present: CPU only")
        return []
    if torch.version.cuda is None:
        raise RuntimeError(f"adarts_kernels: FORCE_CUDA=1 but torch {torch.__version__} is a CPU-only build; "
                           "install a CUDA build of torch or unset FORCE_CUDA")
    if CUDA_HOME is None:
        raise RuntimeError("adarts_kernels: FORCE_CUDA=1 but no CUDA toolkit was found (nvcc not on PATH and "
                           "CUDA_HOME unset); set CUDA_HOME or unset FORCE_CUDA")
    return rel(sources)


#: Asked of the installing interpreter when the build environment has no torch.
_WHERE_IS_TORCH = "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))"


def runtime_torch_dir(run=subprocess.run):
    """The site-packages folder holding the torch that sys.executable imports outside this build
    environment, or None.

    pip's isolated build runs this file with the interpreter it installs into, but hides that
    interpreter's packages (PYTHONPATH points at its own overlay, whose sitecustomize drops the
    environment's site-packages). Asked without those two variables, the same interpreter
    imports the environment's torch: the one the package will run with.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    try:
        out = run([sys.executable, "-c", _WHERE_IS_TORCH], env=env, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines or not os.path.isdir(os.path.join(lines[-1], "torch")):
        return None
    return lines[-1]


def import_torch():
    """(torch, None), or (None, why) when no torch is visible to this build at all."""
    try:
        import torch  # only here: a build without the extension never needs torch
        return torch, None
    except ImportError as e:
        first = f"{type(e).__name__}: {e}"
    found = runtime_torch_dir()
    if found is None:
        return None, first
    sys.path.append(found)    # after the build environment's own packages: its setuptools wins
    try:
        import torch
    except ImportError as e:
        return None, f"{first}; the environment's torch at {found} does not import here ({e})"
    say(f"the isolated build environment has no torch: building against the environment's torch "
        f"{torch.__version__} ({found})")
    return torch, None


LATER = ("the package installs without the compiled extension; the first use of a fused op builds it "
         "(about a minute, once per torch version, cached; see the README's Install section)")


def build_record_class(base, record):
    """build_ext that writes the build record (csrc/build_config.py RECORD_NAME) beside each built
    library, so that the package can refuse a library built against another torch."""

    class BuildWithRecord(base):
        def run(self):
            super().run()
            self._records = []
            for ext in self.extensions:
                path = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), BC.RECORD_NAME)
                with open(path, "w") as f:
                    json.dump(record, f, indent=1)
                self._records.append(path)

        def get_outputs(self):
            return super().get_outputs() + list(getattr(self, "_records", []))

    return BuildWithRecord


class BuildPyWithSources(build_py):
    """build_py that also copies every file of the extension's build (csrc/build_config.py
    build_files) into the package as adarts_kernels/_csrc/: an installed package can then build
    or rebuild its extension at first use (a new torch, an install without a compiler at build
    time) with no checkout."""

    def run(self):
        super().run()
        dest = os.path.join(self.build_lib, "adarts_kernels", "_csrc")
        for src in BC.build_files(CSRC):
            target = os.path.join(dest, os.path.relpath(src, CSRC))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(src, target)


def extension_build():
    """(ext_modules, cmdclass): the compiled extension, or no extension (built at first use)."""
    cmdclass = {"build_py": BuildPyWithSources}
    if env_flag("ADARTS_SKIP_EXT"):
        say(f"ADARTS_SKIP_EXT=1: {LATER}")
        return [], cmdclass
    if not has_cxx_compiler():
        say(f"no C++ compiler found: {LATER}")
        return [], cmdclass
    torch, why = import_torch()
    if torch is None:
        say(f"torch is not importable at build time ({why}): {LATER}. To build it now, install torch first")
        return [], cmdclass
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    nv = load_nvcc_flags()
    debug = nv.debug_build()
    info = torch.__config__.parallel_info()
    cxx = BC.cxx_flags(sys.platform, info, debug)
    kernels = len(glob.glob(os.path.join(CSRC, "cpu", "*_kernel.cpp")))
    common = dict(
        extra_link_args=BC.link_flags(sys.platform, info, debug),
        include_dirs=[CSRC],
        depends=rel(BC.headers(CSRC)),
        py_limited_api=False,
    )
    cuda = cuda_sources(torch)
    if debug:
        say("ADARTS_DEBUG=1: debug information and the CUDA device asserts kept (no -g0, no strip, no -DNDEBUG)")
    if cuda:
        ext = CUDAExtension(
            "adarts_kernels._C",
            rel(BC.cpu_sources(CSRC)) + cuda,
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nv.nvcc_flags(debug)},
            **common,
        )
        say(f"building CPU + CUDA extension ({kernels} kernels, {len(cuda)} CUDA sources) for torch "
            f"{torch.__version__}, MAX_JOBS={os.environ['MAX_JOBS']}")
    else:
        ext = CppExtension("adarts_kernels._C", rel(BC.cpu_sources(CSRC)), extra_compile_args={"cxx": cxx}, **common)
        say(f"building CPU extension ({kernels} kernels) for torch {torch.__version__}, "
            f"MAX_JOBS={os.environ['MAX_JOBS']}")
    record = BC.record(torch.__version__, torch.version.cuda, bool(cuda),
                       f"{sys.version_info[0]}.{sys.version_info[1]}", debug)
    cmdclass["build_ext"] = build_record_class(BuildExtension, record)
    return [ext], cmdclass


def read_readme():
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


EXT_MODULES, CMDCLASS = extension_build()

setup(
    name="adarts_kernels",
    version=read_version(),
    description="Memory-efficient differentiable architecture search (ADARTS, PC-DARTS, DARTS) for PyTorch",
    long_description=read_readme(),
    long_description_content_type="text/markdown",
    author="adarts-kernels developers",
    license="Apache-2.0",
    license_files=["LICENSE"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: C++",
        "Programming Language :: Python :: 3",
        "Environment :: GPU :: NVIDIA CUDA",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    packages=find_packages(include=["adarts_kernels", "adarts_kernels.*"]),
    python_requires=">=3.9",
    # Never an exact torch pin: the user's torch (CPU or CUDA build) is the one to use. A library
    # built here against another torch is rebuilt at first use (adarts_kernels._ext), hence ninja.
    install_requires=["torch>=2.11", "ninja", "numpy", "pillow", "tqdm", "matplotlib", "scikit-learn"],
    extras_require={"test": ["pytest", "pytest-benchmark", "triton", "ruff", "build"]},
    entry_points={"console_scripts": [
        "adarts-search = adarts_kernels.commands.search:main",
        "adarts-retrain = adarts_kernels.commands.retrain:main",
        "adarts-memory = adarts_kernels.profiling.__main__:main",
    ]},
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    zip_safe=False,
)
