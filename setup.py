"""Install megafusion: `pip install -e .` (add `-r requirements-ci.txt` for the pinned CPU build)."""

from setuptools import find_packages, setup

setup(
    name="megafusion",
    version="0.1.0",
    description="Megatron-style distributed pretraining for mixed-modal early-fusion models",
    # The Triton kernels' sources sit at the top of the repository (kernels/) and install as
    # megafusion.kernels. The link megafusion/kernels -> ../kernels serves a source tree on
    # PYTHONPATH and the import-layer check; package_dir makes the install independent of it.
    packages=[
        *find_packages(include=["megafusion", "megafusion.*"], exclude=["megafusion.kernels"]),
        "megafusion.kernels",
    ],
    package_dir={"megafusion.kernels": "kernels"},
    python_requires=">=3.10",
    # GPU users get their own CUDA torch; CI pins the CPU build in requirements-ci.txt.
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16.1,<0.17",
        "numpy",
        "pyyaml>=6",
        # megatron-core's dist_checkpointing writers need psutil but do not declare it.
        "psutil",
        "sentencepiece>=0.2",
        "scikit-learn>=1.3",  # ships the handwritten-digits images of the built-in set
        "pillow>=10",
        "tqdm",
        "wandb",  # offline by default; logging.wandb=false switches it off
        "diffusers>=0.30",  # VQ / KL image autoencoders and noise schedulers, loaded from local paths
        "safetensors",
        # data.tokenizer / --tokenizer may name a Hugging Face tokenizer.json, which
        # megafusion/data/tokenizers/hf.py reads with `tokenizers` itself (transformers, in the hf
        # extra, depends on it too, but reading a tokenizer needs no transformers); tested with 0.23.
        "tokenizers>=0.22",
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]"],
        # `megafusion convert hf-to-mf / mf-to-hf` (imported only there); rope_parameters configs.
        "hf": ["transformers>=5.0"],
        # megafusion's fused kernels (ops.backend=triton / auto on CUDA; tested with 3.9). CUDA
        # builds of torch already depend on a matching Triton: this extra is for CPU test machines.
        "triton": ["triton>=3.2"],
        "tensorboard": ["tensorboard"],
        # the plots of the experiments (examples/experiments) and of their reports in bench/results
        "plots": ["matplotlib"],
        # the experiment tests draw their plots too
        "test": ["pytest>=8", "pytest-xdist>=3.5", "matplotlib"],
        "dev": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "matplotlib",
            "ruff==0.17.6",
            "import-linter==2.17",
            "grimp==3.20",
        ],
    },
    entry_points={"console_scripts": ["megafusion=megafusion.commands.main:main"]},
)
