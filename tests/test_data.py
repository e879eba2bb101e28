"""Data loading: blend syntax, split bookkeeping, deterministic sample order, the resumable
sampler, and segment ids at end-of-document tokens."""
import pytest
import torch

from megatron_code.distributed import destroy_distributed, init_distributed
from megatron_code.errors import ConfigError
from megatron_code.tokenizer import SentencePieceTokenizer
from megatron_code.training.config import DataConfig
from megatron_code.training.data import (
    ResumableBatchSampler, build_datasets, documents_per_split, parse_blend, segment_ids_from_eod,
    usable_split,
)
from tests.conftest import TOKENIZER


def test_parse_blend():
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    assert parse_blend(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    with pytest.raises(ConfigError, match="alternates WEIGHT PREFIX"):
        parse_blend(["0.3", "a", "b"])
    with pytest.raises(ConfigError, match="--data-path is required"):
        parse_blend([])


def test_documents_per_split_matches_megatron_bookends():
    assert documents_per_split(16, [949, 50, 1]) == [15, 1, 0]
    assert documents_per_split(1000, [949, 50, 1]) == [949, 50, 1]


def test_empty_needed_split_is_an_error_and_empty_test_split_is_dropped(fixture_data):
    assert usable_split([fixture_data], "949,50,1", need_valid=True) == "949,50,0"
    with pytest.raises(ConfigError, match="validation split .* gets 0 documents"):
        usable_split([fixture_data], "990,5,5", need_valid=True)


@pytest.fixture
def process_group():
    init_distributed()
    yield
    destroy_distributed()


def first_samples(prefixes, seed, n=6):
    data = DataConfig(data_path=prefixes, seq_length=64, split="949,50,1")
    datasets = build_datasets(data, SentencePieceTokenizer(TOKENIZER), seed, [n, n, n], need_valid=True)
    return torch.stack([datasets.train[i]["tokens"] for i in range(n)])


def test_sample_order_is_a_function_of_the_seed(fixture_data, process_group):
    a, b = first_samples([fixture_data], 1), first_samples([fixture_data], 1)
    assert torch.equal(a, b)
    assert not torch.equal(a, first_samples([fixture_data], 2))


def test_weighted_blend_draws_from_both(fixture_data, process_group):
    blended = first_samples(["0.5", fixture_data, "0.5", fixture_data], 1, n=8)
    assert blended.shape == (8, 64)


def test_sampler_resumes_mid_stream_and_slices_per_rank():
    full = list(ResumableBatchSampler(24, 0, micro_batch_size=2, global_batch_size=8))
    resumed = list(ResumableBatchSampler(24, 8, micro_batch_size=2, global_batch_size=8))
    assert resumed == full[4:]
    rank1 = list(ResumableBatchSampler(24, 0, micro_batch_size=2, global_batch_size=8, dp_rank=1, dp_size=2))
    assert rank1[:2] == [[4, 5], [6, 7]]


def test_segment_ids_start_after_each_eod():
    tokens = torch.tensor([[5, 6, 2, 7, 2, 2, 8]])
    assert segment_ids_from_eod(tokens, eod=2).tolist() == [[0, 0, 0, 1, 1, 2, 3]]


def test_context_parallel_chunks_are_load_balanced_and_cover_the_sequence():
    from megatron_code.parallel.context import _natural_order_cpu, local_token_indices

    held = [local_token_indices(16, 2, r, "cpu").tolist() for r in range(2)]
    assert held == [[0, 1, 2, 3, 12, 13, 14, 15], [4, 5, 6, 7, 8, 9, 10, 11]]
    gathered = torch.tensor(held[0] + held[1])
    assert torch.equal(gathered[_natural_order_cpu(16, 2)], torch.arange(16))


def test_a_rank_that_cannot_see_the_index_cache_says_it_must_be_shared(fixture_data, process_group, tmp_path,
                                                                       monkeypatch):
    """megatron-core builds the index on global rank 0 and the others load it from the cache
    directory. A rank on a node that does not see that directory (here: a rank 1 whose rank 0
    never built it, an empty cache) must name the cause and the flag, not a bare FileNotFoundError."""
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    data = DataConfig(data_path=[fixture_data], seq_length=64, split="949,50,1",
                      data_cache_path=str(tmp_path / "node-local-cache"))
    with pytest.raises(ConfigError, match=r"rank 1 cannot read megatron-core's dataset index .*node-local-cache.*"
                                          r"must be on a file system all nodes share\. Point --data-cache-path"):
        build_datasets(data, SentencePieceTokenizer(TOKENIZER), 1, [6, 6, 6], need_valid=True)
