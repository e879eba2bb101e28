"""Training data: Megatron .bin/.idx datasets through megatron-core, served in a fixed order.

The order of samples is a pure function of (seed, data, split, seq_length): megatron-core's
GPTDataset shuffles documents and samples with the seed, and the sampler below walks the sample
index from `consumed_samples`. Resuming at consumed_samples therefore continues the exact stream.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from megatron_code.errors import ConfigError
from megatron_code.training.config import DataConfig


def parse_blend(data_path: list[str], flag: str = "--data-path") -> tuple[list[str], list[float] | None]:
    """`[w1, p1, w2, p2]` -> ([p1, p2], [w1, w2]); `[p1, p2]` -> ([p1, p2], None) (Megatron syntax).
    `flag` names the option in error messages."""
    if not data_path:
        raise ConfigError(f"{flag} is required: one or more dataset prefixes (PREFIX.bin/.idx), "
                          "optionally weighted as `0.7 PREFIX_A 0.3 PREFIX_B`.")

    def is_number(text: str) -> bool:
        try:
            float(text)
            return True
        except ValueError:
            return False

    if not is_number(data_path[0]):
        return list(data_path), None
    if len(data_path) % 2 or not all(is_number(w) for w in data_path[::2]):
        raise ConfigError(f"{flag} {' '.join(data_path)}: a weighted blend alternates WEIGHT PREFIX "
                          "pairs, e.g. `0.7 data/a_text_document 0.3 data/b_text_document`.")
    weights = [float(w) for w in data_path[::2]]
    if any(w <= 0 for w in weights):
        raise ConfigError(f"{flag}: blend weights must be positive, got {weights}.")
    return list(data_path[1::2]), weights


def pretraining_prefixes(data: DataConfig) -> dict[str, list[str]]:
    """The pretraining datasets' prefixes per flag: --data-path, and --valid-data-path if given."""
    prefixes = {"--data-path": parse_blend(data.data_path)[0]}
    if data.valid_data_path:
        prefixes["--valid-data-path"] = parse_blend(data.valid_data_path, "--valid-data-path")[0]
    return prefixes


def check_data_files(prefixes: list[str], flag: str = "--data-path") -> None:
    for prefix in prefixes:
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise ConfigError(
                    f"{flag}: {prefix + ext} does not exist. Give the prefix without extension "
                    "(e.g. data/code_text_document for data/code_text_document.bin/.idx); build it "
                    "with `mcode-preprocess-data`."
                )


def split_weights(split: str) -> list[float]:
    parts = [p for p in split.replace("/", ",").split(",") if p.strip()]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--split {split!r}: expected comma-separated numbers like 949,50,1.") from None
    if len(weights) > 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"--split {split!r}: expected up to 3 non-negative weights (train,valid,test).")
    return weights + [0.0] * (3 - len(weights))


def documents_per_split(num_documents: int, weights: list[float]) -> list[int]:
    """How megatron-core's builder cuts N documents by split weights (rounded bookends)."""
    total, bounds, acc = sum(weights), [0], 0.0
    for w in weights:
        acc += w / total
        bounds.append(round(acc * num_documents))
    return [b - a for a, b in zip(bounds, bounds[1:])]


def usable_split(prefixes: list[str], split: str, need_valid: bool) -> str:
    """The split string to hand megatron-core. A split with weight > 0 but no documents makes its
    sample-index builder loop forever, so an empty split that the run needs (train; valid when
    evaluating) is an error, and one it does not need (test is never read) is dropped."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    weights = split_weights(split)
    counts = [documents_per_split(len(IndexedDataset(p)), weights) for p in prefixes]
    smallest = [min(c[i] for c in counts) for i in range(3)]
    needed = (True, need_valid, False)
    for index, name in enumerate(("train", "validation", "test")):
        if weights[index] > 0 and smallest[index] == 0:
            if needed[index]:
                raise ConfigError(
                    f"--split {split}: the {name} split of the smallest dataset gets 0 documents "
                    f"(documents per split: {counts}). Add data or give the {name} split more weight."
                )
            weights[index] = 0.0
    return ",".join(f"{w:g}" for w in weights)


@dataclass
class SyntheticVocabulary:
    """What --mock-data needs of a tokenizer when none is given: the vocabulary size and the EOD id
    (2, as in tokenizers made by mcode-train-tokenizer)."""

    vocab_size: int
    eod: int = 2

    @property
    def unique_identifiers(self) -> dict:  # megatron-core hashes these into its cache keys
        return {"class": type(self).__name__, "vocab_size": self.vocab_size, "eod": self.eod}


@dataclass
class Datasets:
    train: GPTDataset
    valid: GPTDataset | None
    test: GPTDataset | None


def build_datasets(data: DataConfig, tokenizer, seed: int, num_samples: list[int], need_valid: bool) -> Datasets:
    """Build train/valid/test through megatron-core. Needs torch.distributed initialized."""
    blend_per_split = None
    if data.mock_data:  # megatron-core makes mock data when no blend is given
        blend, split, dataset_class = None, None, MockGPTDataset
    elif data.valid_data_path:  # every document of --data-path trains; validation has its own
        blend, split, dataset_class = None, None, GPTDataset
        valid = parse_blend(data.valid_data_path, "--valid-data-path") if need_valid else None
        blend_per_split = [parse_blend(data.data_path), valid, None]
    else:
        prefixes, weights = parse_blend(data.data_path)
        blend, dataset_class = (prefixes, weights), GPTDataset
        split = usable_split(prefixes, data.split, need_valid=need_valid)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=data.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=split,
        path_to_cache=data.data_cache_path,
        tokenizer=tokenizer,
        reset_position_ids=data.reset_position_ids,
        reset_attention_mask=data.reset_attention_mask,
        eod_mask_loss=data.eod_mask_loss,
        # The model derives document boundaries from the tokens; an [s, s] mask per sample would
        # cost O(s^2) host memory (8 GB at 128K).
        create_attention_mask=False,
    )
    # Sizes are given for every split: megatron-core skips zero-weight splits itself, and with
    # blend weights it asserts that no size is None.
    builder = BlendedMegatronDatasetBuilder(dataset_class, num_samples, lambda: True, config)
    train, valid, test = build_or_explain_missing_cache(builder, data.data_cache_path)
    if train is None:
        raise ConfigError(f"--split {data.split}: the train split is empty.")
    return Datasets(train, valid, test)


def build_or_explain_missing_cache(builder: BlendedMegatronDatasetBuilder, cache_path: str | None):
    """builder.build(), with a clear error where megatron-core's index cache is not shared.

    megatron-core builds the sample and shuffle indices on global rank 0 alone, writes them to the
    cache directory, and every other rank loads them from there after a barrier. On a node that
    does not see rank 0's files (node-local data or cache) numpy raises a bare FileNotFoundError."""
    try:
        return builder.build()
    except FileNotFoundError as missing:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank == 0:
            raise
        where = f"--data-cache-path {cache_path}" if cache_path else "the default cache (DIR/cache beside each --data-path prefix)"
        raise ConfigError(
            f"rank {rank} cannot read megatron-core's dataset index {missing.filename}: global rank 0 "
            f"builds it into {where} and every other rank loads it from there, so that directory must "
            "be on a file system all nodes share. Point --data-cache-path at a shared directory "
            "(the data itself may stay node-local)."
        ) from missing


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Yields this data-parallel rank's micro-batches of sample indices, global batch after global
    batch, starting at `consumed_samples` (Megatron's MegatronPretrainingSampler)."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 global_batch_size: int, dp_rank: int = 0, dp_size: int = 1):
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.per_rank = global_batch_size // dp_size
        self.dp_rank = dp_rank

    def __iter__(self):
        start = self.consumed_samples
        while start + self.global_batch_size <= self.total_samples:
            first = start + self.dp_rank * self.per_rank
            for offset in range(0, self.per_rank, self.micro_batch_size):
                yield list(range(first + offset, first + offset + self.micro_batch_size))
            start += self.global_batch_size

    def __len__(self):
        steps = (self.total_samples - self.consumed_samples) // self.global_batch_size
        return steps * self.per_rank // self.micro_batch_size


def micro_batch_loader(dataset, sampler: ResumableBatchSampler, num_workers: int, pin_memory: bool, seed: int):
    """Its own generator: a DataLoader draws its workers' base seed when iterated, from torch's
    global RNG unless given one, and a resumed run creates its loader after restoring that RNG,
    which then drew other dropout masks than the uninterrupted run."""
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed),
    )


def segment_ids_from_eod(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """[b, s] -> [b, s] document index of each token. The EOD token belongs to the document it
    ends, so the next token starts a new segment (Megatron's --reset-attention-mask semantics)."""
    is_eod = (tokens == eod).long()
    return torch.cumsum(is_eod, dim=1) - is_eod
