"""Megatron-style pretraining of code language models: model, parallelism, training loop."""

__version__ = "0.1.0"

import warnings

# megatron-core warns at import time that TE/apex are absent; we only use its datasets, which
# need neither, and our own GPU fallbacks are reported where they apply.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
