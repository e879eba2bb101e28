"""Checks of a whole run, done before any model, dataset or process group is built. Each problem
raises ConfigError naming the flag or file, what was expected and what was found."""
from __future__ import annotations

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_code.errors import ConfigError
from megatron_code.tokenizer import SentencePieceTokenizer
from megatron_code.training.config import RunConfig
from megatron_code.training.data import check_data_files, parse_blend, split_weights
from megatron_code.training.lr_schedule import LearningRateSchedule

# Enough tokens to catch data tokenized with another tokenizer, cheap on an mmap.
_TOKENS_TO_SCAN = 1_000_000


def load_tokenizer(cfg: RunConfig) -> SentencePieceTokenizer:
    if not cfg.data.tokenizer_model:
        raise ConfigError("--tokenizer-model is required: the sentencepiece .model the data was built with.")
    try:
        tokenizer = SentencePieceTokenizer(cfg.data.tokenizer_model)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"--tokenizer-model {cfg.data.tokenizer_model} has {tokenizer.vocab_size} tokens but "
            f"--vocab-size is {cfg.model.vocab_size}: the model cannot embed them. Drop --vocab-size "
            "(it defaults to the tokenizer's) or raise it."
        )
    return tokenizer


def check_batch_sizes(cfg: RunConfig, data_parallel_size: int) -> None:
    t = cfg.training
    if t.micro_batch_size <= 0:
        raise ConfigError(f"--micro-batch-size must be positive, got {t.micro_batch_size}.")
    if t.global_batch_size is None:
        t.global_batch_size = t.micro_batch_size * data_parallel_size
    if t.global_batch_size % (t.micro_batch_size * data_parallel_size):
        raise ConfigError(
            f"--global-batch-size ({t.global_batch_size}) must be divisible by --micro-batch-size "
            f"({t.micro_batch_size}) x data-parallel size ({data_parallel_size})."
        )
    if t.train_iters <= 0:
        raise ConfigError(f"--train-iters must be positive, got {t.train_iters}.")


def check_data_matches_tokenizer(prefixes: list[str], padded_vocab: int) -> None:
    for prefix in prefixes:
        dataset = IndexedDataset(prefix)
        if len(dataset) == 0:
            raise ConfigError(f"--data-path {prefix}: the dataset holds no documents.")
        sizes = dataset.sequence_lengths
        count = int(np.searchsorted(np.cumsum(sizes), _TOKENS_TO_SCAN)) + 1
        largest = max(int(dataset[i].max()) for i in range(min(count, len(dataset))) if sizes[i])
        if largest >= padded_vocab:
            raise ConfigError(
                f"--data-path {prefix}: token id {largest} is outside the model's vocabulary "
                f"({padded_vocab} rows). The data was tokenized with a different tokenizer than "
                "--tokenizer-model; re-run mcode-preprocess-data with this tokenizer."
            )


def validate_run(cfg: RunConfig, data_parallel_size: int = 1) -> SentencePieceTokenizer:
    """Validate everything; fill derived defaults (vocab size, global batch). Returns the tokenizer."""
    tokenizer = load_tokenizer(cfg)
    cfg.model.validate()
    check_batch_sizes(cfg, data_parallel_size)
    if cfg.data.seq_length > cfg.model.max_position_embeddings:
        raise ConfigError(
            f"--seq-length ({cfg.data.seq_length}) exceeds --max-position-embeddings "
            f"({cfg.model.max_position_embeddings}); raise the latter or shorten the sequences."
        )
    prefixes, _ = parse_blend(cfg.data.data_path)
    check_data_files(prefixes)
    weights = split_weights(cfg.data.split)
    if cfg.training.eval_interval and weights[1] == 0:
        raise ConfigError(
            f"--eval-interval {cfg.training.eval_interval} needs a validation split, but --split "
            f"{cfg.data.split} gives it weight 0. Use e.g. --split 949,50,1 or --eval-interval 0."
        )
    if cfg.model.params_dtype != "float32":
        raise ConfigError(
            f"--params-dtype {cfg.model.params_dtype}: training keeps float32 master weights; use "
            "--bf16 for bfloat16 compute and leave --params-dtype at float32."
        )
    if cfg.checkpoint.save_interval and not cfg.checkpoint.save:
        raise ConfigError("--save-interval is set but --save (the checkpoint directory) is not.")
    if cfg.checkpoint.keep_last is not None and cfg.checkpoint.keep_last < 1:
        raise ConfigError(f"--keep-last must be >= 1 (checkpoints to keep), got {cfg.checkpoint.keep_last}.")
    LearningRateSchedule(cfg.scheduler, cfg.optimizer, cfg.training.train_iters)
    check_data_matches_tokenizer(prefixes, cfg.model.padded_vocab_size())
    return tokenizer
