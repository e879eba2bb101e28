"""Shared fixtures: tokenized data built from the committed fixture corpus, and a helper that
trains in-process from a flat {field: value} mapping."""
import os

import pytest
import torch

# Triton chooses compiled or interpreted kernels when `triton` is first imported, which the project
# imports below may already do. On CPU-only machines its interpreter is switched on first, so the
# Triton kernels' tests (tests/test_kernels.py) can run them on CPU tensors; not where CUDA exists,
# since it would turn every Triton kernel of the session (tests/test_kernels_cuda.py) interpreted.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from data_tools.preprocess_data import preprocess_data  # noqa: E402
from megatron_code.training.arguments import run_config_from_values  # noqa: E402
from megatron_code.training.trainer import train  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TOKENIZER = os.path.join(FIXTURES, "code_bpe_2048.model")
CORPUS = os.path.join(FIXTURES, "stdlib_sample.jsonl")


@pytest.fixture(scope="session")
def fixture_data(tmp_path_factory) -> str:
    """Prefix of the .bin/.idx built from the fixture corpus with the fixture tokenizer."""
    out = tmp_path_factory.mktemp("data")
    summary = preprocess_data(CORPUS, TOKENIZER, str(out / "sample"), workers=1, progress=False)
    return summary.outputs["text"]


def tiny_run(data_prefix: str, **overrides) -> dict:
    """Values of a fast `tiny`-preset run on the fixture data (no eval, no workers)."""
    from megatron_code.presets import get_preset

    values = get_preset("tiny")
    values.update(
        data_path=[data_prefix], tokenizer_model=TOKENIZER, train_iters=8, lr_warmup_iters=2, eval_interval=0,
        log_interval=1000, num_workers=0, seed=1234,
    )
    values.update(overrides)
    return values


def run_training(values: dict) -> list[dict]:
    return train(run_config_from_values(values))
