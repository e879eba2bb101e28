"""Train/valid datasets of --training-mode sft and dpo, from the data tools' export prefixes (or,
with --mock-data, from synthetic conversations: mock_conversations.py).

Each prefix's records are cut into train/valid/test by --split the way megatron-core cuts
documents (contiguous ranges, data.documents_per_split); records whose conversation does not fit in
seq_length + 1 ids are skipped (counted in the log). Several prefixes are blended row by row with
megatron-core's own blending helper: `0.7 A 0.3 B` gives A about 70% of the rows; without weights
each prefix weighs its number of usable records. Everything is a pure function of the seed and
the data, so every rank builds the same index without communication.
"""
from __future__ import annotations

import numpy as np
import torch
from megatron.core.datasets import helpers

from megatron_code.errors import ConfigError
from megatron_code.training.chat_format import ChatFormat
from megatron_code.training.config import RunConfig
from megatron_code.training.conversations import FLAGS, Conversations
from megatron_code.training.data import (
    Datasets, SyntheticVocabulary, documents_per_split, parse_blend, split_weights,
)
from megatron_code.training.dpo_data import PreferencePairDataset
from megatron_code.training.mock_conversations import MockConversations, synthetic_chat_format
from megatron_code.training.sft_data import PackedSFTDataset

SPLIT_NAMES = ("train", "validation", "test")


def mode_blend(cfg: RunConfig) -> tuple[list[str], list[float] | None]:
    """(prefixes, weights) of --sft-data-path or --dpo-data-path, whichever the mode reads."""
    mode = cfg.training.training_mode
    return parse_blend(getattr(cfg.data, f"{mode}_data_path"), flag=FLAGS[mode])


def split_records(conversations: Conversations, split_index: int, split: str, capacity: int,
                  overhead: int) -> tuple[np.ndarray, int]:
    """(records of the split whose conversations fit, records skipped as too long); an empty
    result is an error naming the prefix and the fix."""
    counts = documents_per_split(len(conversations), split_weights(split))
    start = sum(counts[:split_index])
    in_split = np.arange(start, start + counts[split_index])
    fits = conversations.longest(overhead)[in_split] <= capacity
    if not fits.any():
        flag, name = FLAGS[conversations.mode], SPLIT_NAMES[split_index]
        raise ConfigError(
            f"{flag} {conversations.prefix}: the {name} split has {len(in_split)} records (--split {split}) "
            f"and {'none of them fits' if len(in_split) else 'so none fits'} in --seq-length + 1 = {capacity} "
            f"ids with the chat format. Raise --seq-length, add data or give the {name} split more weight."
        )
    return in_split[fits], int((~fits).sum())


class BlendedSamples(torch.utils.data.Dataset):
    """Sample i is sample sample_index[i] of datasets[dataset_index[i]]."""

    def __init__(self, datasets: list, dataset_index: np.ndarray, sample_index: np.ndarray):
        self.datasets, self.dataset_index, self.sample_index = datasets, dataset_index, sample_index

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int):
        return self.datasets[int(self.dataset_index[i])][int(self.sample_index[i])]


def blend_indices(weights: list[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """megatron-core's deterministic blending: each next sample goes to the dataset furthest
    below its share so far."""
    dataset_index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    normalized = np.asarray(weights, dtype=np.float64) / sum(weights)
    helpers.build_blending_indices(dataset_index, sample_index, normalized, len(weights), size, False)
    return dataset_index, sample_index


def _one_split(cfg: RunConfig, sources: list[Conversations], weights, split_index: int, size: int,
               chat: ChatFormat, pad_id: int, log) -> torch.utils.data.Dataset:
    d, mode = cfg.data, cfg.training.training_mode
    usable = [split_records(s, split_index, d.split, d.seq_length + 1, chat.overhead) for s in sources]
    dataset_index, sample_index = blend_indices(weights or [len(r) for r, _ in usable], size)
    datasets = []
    for i, (source, (records, skipped)) in enumerate(zip(sources, usable)):
        rows = int((dataset_index == i).sum())
        seed = (cfg.training.seed, split_index, i)
        if mode == "sft":
            dataset = PackedSFTDataset(source, records, max(rows, 1), d.seq_length, seed, chat, pad_id,
                                       d.reset_position_ids)
            packed = f"{len(dataset.members) / max(len(dataset), 1):.1f} conversations per row"
        else:
            dataset = PreferencePairDataset(source, records, max(rows, 1), d.seq_length, seed, chat, pad_id)
            packed = "one pair per sample, padded"
        log(f"{mode} {SPLIT_NAMES[split_index]}: {source.prefix}: {len(records)} records "
            f"({skipped} longer than --seq-length + 1 skipped), {rows} samples ({packed})")
        datasets.append(dataset)
    if len(datasets) == 1:
        return datasets[0]
    return BlendedSamples(datasets, dataset_index, sample_index)


def conversation_sources(cfg: RunConfig, tokenizer) -> tuple[list, list[float] | None, ChatFormat]:
    """(sources, blend weights, chat format): the export prefixes of the mode, or with --mock-data
    one synthetic source (and, without a tokenizer, the synthetic chat format)."""
    mode = cfg.training.training_mode
    if not cfg.data.mock_data:
        prefixes, weights = mode_blend(cfg)
        return [Conversations(prefix, mode) for prefix in prefixes], weights, ChatFormat.from_tokenizer(tokenizer)
    synthetic = isinstance(tokenizer, SyntheticVocabulary)  # --vocab-size without a tokenizer
    chat = synthetic_chat_format() if synthetic else ChatFormat.from_tokenizer(tokenizer)
    source = MockConversations(mode, cfg.model.vocab_size, tokenizer.eod, cfg.data.seq_length, chat.overhead,
                               cfg.training.seed)
    return [source], None, chat


def build_finetune_datasets(cfg: RunConfig, tokenizer, num_samples: list[int], need_valid: bool,
                            log=lambda message: None) -> Datasets:
    """Train (and, when needed, validation) datasets of num_samples[split] samples each; the test
    split is never read by the trainer and is not built."""
    sources, weights, chat = conversation_sources(cfg, tokenizer)
    pad = getattr(tokenizer, "pad", -1)  # a SyntheticVocabulary (--mock-data, no tokenizer) has none
    pad_id = pad if pad >= 0 else tokenizer.eod
    wanted = (True, need_valid and split_weights(cfg.data.split)[1] > 0)
    train, valid = (_one_split(cfg, sources, weights, i, num_samples[i], chat, pad_id, log) if want else None
                    for i, want in enumerate(wanted))
    return Datasets(train, valid, None)
