"""Install adarts_kernels.

    pip install torch            # first: the build never chooses your torch for you
    pip install --no-build-isolation -e .
"""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(HERE, "adarts_kernels", "__init__.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip('"')
    raise RuntimeError("no __version__ in adarts_kernels/__init__.py")


setup(
    name="adarts_kernels",
    version=read_version(),
    description="Memory-efficient differentiable architecture search (ADARTS, PC-DARTS, DARTS) for PyTorch",
    packages=find_packages(include=["adarts_kernels", "adarts_kernels.*"]),
    python_requires=">=3.9",
    # Never an exact torch pin: the user's torch (CPU or CUDA build) is the one to use.
    install_requires=["torch>=2.11", "numpy", "tqdm", "matplotlib", "scikit-learn"],
    extras_require={"test": ["pytest", "pytest-benchmark"]},
)
