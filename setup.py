"""Packaging for mambalrp. The Triton sources live in ``kernels/`` and install as ``mambalrp.kernels``."""

from setuptools import find_packages, setup

setup(
    name="mambalrp",
    version="0.1.0",
    description="Faithful, fast Layer-wise Relevance Propagation for Mamba / selective state space models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["mambalrp", "mambalrp.*"]) + ["mambalrp.kernels"],
    package_dir={"mambalrp.kernels": "kernels"},
    package_data={"mambalrp": ["assets/zoo/*/*"]},
    # The ranges tested: torch 2.13 (CPU) and 2.11 (GPU); transformers 4.52.4, 4.57.6 and 5.24.0 in
    # the version matrix (noxfile.py, `make test-matrix`), 5.12.1 and 5.17.0 by hand.
    install_requires=["torch>=2.11,<2.14", "numpy>=1.24", "tqdm>=4.60", "safetensors>=0.4"],
    extras_require={
        "transformers": ["transformers>=4.52,<5.25"],
        "triton": ["triton>=3.0"],
        "zennit": ["zennit>=0.5"],
        "mamba-ssm": ["mamba-ssm>=2.2", "causal-conv1d>=1.4"],
        "viz": ["matplotlib>=3.7"],
        "ray": ["ray[data]>=2.40", "pyarrow>=14", "pandas>=2.0"],
        "bench": ["matplotlib>=3.7", "tokenizers>=0.15", "safetensors>=0.4"],
        "dev": ["pytest>=7", "hypothesis>=6", "transformers>=4.52,<5.25", "triton>=3.0", "matplotlib>=3.7", "nox>=2024.4",
                "ray[data]>=2.40", "pyarrow>=14", "pandas>=2.0"],
    },
    entry_points={"console_scripts": ["mambalrp=mambalrp.cli:main"]},
)
