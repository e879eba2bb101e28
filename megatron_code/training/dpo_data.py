"""DPO samples: one preference pair per sample, its chosen and rejected conversations as two rows.

Pairs are visited in a seeded random order, epoch after epoch, like SFT conversations
(sft_data.epoch_orders), so the order is a pure function of (seed, data, split) and resumes
exactly. Each conversation is padded to seq_length + 1 ids (no packing: the loss needs one summed
log-probability per conversation) and shifted into tokens/labels; the loss mask marks the response
ids. A sample's tensors are [2, seq_length]: row 0 chosen, row 1 rejected.
"""
from __future__ import annotations

from itertools import chain, islice

import numpy as np
import torch

from megatron_code.training.chat_format import ChatFormat
from megatron_code.training.conversations import Conversations
from megatron_code.training.sft_data import epoch_orders, shifted_sample


class PreferencePairDataset(torch.utils.data.Dataset):
    """Samples of (chosen, rejected) rows; every record in `records` must fit in seq_length + 1."""

    def __init__(self, conversations: Conversations, records: np.ndarray, num_samples: int, seq_length: int,
                 seed: tuple[int, ...], chat: ChatFormat, pad_id: int):
        self.conversations, self.chat = conversations, chat
        self.capacity, self.pad_id = seq_length + 1, pad_id
        stream = chain.from_iterable(order.tolist() for order in epoch_orders(records, seed))
        self.order = np.fromiter(islice(stream, num_samples), dtype=np.int64, count=num_samples)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> dict:
        prompt, responses = self.conversations.get(int(self.order[index]))
        rows = [self._row(prompt, response) for response in responses]
        return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}

    def _row(self, prompt: np.ndarray, response: np.ndarray) -> dict:
        ids, is_response = self.chat.conversation(prompt, response)
        padding = self.capacity - len(ids)
        ids = np.concatenate([ids, np.full(padding, self.pad_id, dtype=np.int64)])
        is_response = np.concatenate([is_response, np.zeros(padding, dtype=bool)])
        return shifted_sample(ids, is_response, np.arange(self.capacity))
