"""ibot-fast: iBOT self-supervised pre-training of Vision Transformers, fused and fast.

`kernels/` sits at the top of the repository (Triton kernels, one file per op) and is
installed as the sub-package `ibot_fast.kernels`.
"""
from setuptools import setup

setup(
    name="ibot-fast",
    version="0.1.0",
    description="A fast, fused-kernel trainer for iBOT self-supervised pre-training of ViTs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "ibot_fast",
        "ibot_fast.models",
        "ibot_fast.reference",
        "ibot_fast.data",
        "ibot_fast.eval",
        "ibot_fast.kernels",
    ],
    package_dir={"ibot_fast": "ibot_fast", "ibot_fast.kernels": "kernels"},
    # torch is deliberately unpinned: an installed torch (CPU or CUDA build) is kept.
    # `make` installs the CPU build first on machines without a GPU.
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "pillow",
        "scikit-learn",
        "safetensors",
        "matplotlib",
        "pyyaml",  # --config FILE.yaml, config.yaml
        "tqdm>=4.60",  # the progress bar (and its logging redirect)
    ],
    extras_require={
        # CUDA 13 builds; on CUDA 12 machines use nvidia-dali-cuda120 instead.
        "gpu": ["xformers>=0.0.30", "nvidia-dali-cuda130"],
        "dali": ["nvidia-dali-cuda130"],
        "tensorboard": ["tensorboard"],  # train.tensorboard=true
        "wandb": ["wandb"],  # train.wandb=PROJECT
        "dev": ["pytest>=7", "pytest-timeout", "threadpoolctl", "tensorboard", "wandb"],
    },
    entry_points={"console_scripts": ["ibot-fast = ibot_fast.cli:main"]},
)
