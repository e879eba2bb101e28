"""Package definition for the code-LM pretraining stack.

Install on a CPU machine (CI, laptops)::

    pip install torch==2.13.0 && pip install -e ".[test]"

On a GPU cluster add the ``gpu`` extra (Transformer Engine, flash-attn); those need CUDA
and a compiler, so they are never installed on CPU CI. See docs/install.md.
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    # torch is deliberately given as a range that 2.13.0 satisfies: the README installs the
    # pinned CPU wheel first so that pip never pulls a multi-GB CUDA build on CPU machines.
    "torch>=2.6",
    "megatron-core>=0.16.1",
    "sentencepiece>=0.2.0",
    "numpy>=1.26",
    "safetensors>=0.4",
    "pyyaml>=6.0",
    "tqdm>=4.66",
    "tensorboard>=2.16",
    "wandb>=0.17",
]

EXTRAS = {
    "test": ["pytest>=8", "transformers>=4.46"],
    # Cluster-only accelerators; need CUDA toolkits and a compiler. See docs/install.md.
    "gpu": ["transformer-engine[pytorch]>=2.0", "flash-attn>=2.6"],
}

CONSOLE_SCRIPTS = [
    "mcode-train=megatron_code.train:main",
    "mcode-seed-corpus=data_tools.seed_corpus:main",
    "mcode-train-tokenizer=data_tools.train_tokenizer:main",
    "mcode-preprocess-data=data_tools.preprocess_data:main",
    "mcode-convert=checkpoints_convert.__main__:main",
]

setup(
    name="megatron-code",
    version="0.1.0",
    description="Megatron-style pretraining of code LLMs on synthetic, execution-validated data",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_code*", "kernels*", "data_tools*", "checkpoints_convert*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
)
