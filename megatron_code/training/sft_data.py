"""SFT samples: chat-formatted conversations packed into rows of --seq-length tokens.

Conversations are visited in a seeded random order, epoch after epoch (a new permutation each
epoch), and packed next-fit: a conversation goes into the current row if it fits, else it starts
the next row, whose unused tail is padding. The packed index is therefore a pure function of
(seed, data, split, seq_length), and its first k rows do not depend on how many rows are asked
for: a run resumed at consumed_samples reads exactly the rows the uninterrupted run would have.

Each row holds seq_length + 1 ids, shifted into tokens/labels as in pretraining. The loss mask is
1 exactly where the label is a response id (the response's EOD included). Position ids restart
at every conversation with --reset-position-ids, and --reset-attention-mask keeps the packed
conversations from attending to each other (the trainer cuts segments at EOD, which only ends a
response); without these flags they see the earlier conversations of their row.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from megatron_code.training.chat_format import ChatFormat
from megatron_code.training.conversations import Conversations


def epoch_orders(records: np.ndarray, seed: tuple[int, ...]) -> Iterator[np.ndarray]:
    """Endless permutations of `records`, one per epoch, seeded by (seed, epoch)."""
    epoch = 0
    while True:
        yield np.random.default_rng((*seed, epoch)).permutation(records)
        epoch += 1


def pack_next_fit(lengths: np.ndarray, records: np.ndarray, capacity: int, num_rows: int,
                  seed: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(members, offsets): row r holds records members[offsets[r]:offsets[r + 1]]. Every record in
    `records` must fit (lengths[record] <= capacity)."""
    members: list[int] = []
    offsets, used = [0], 0
    for order in epoch_orders(records, seed):
        for record in order.tolist():
            length = int(lengths[record])
            if used + length > capacity:
                offsets.append(len(members))
                used = 0
                if len(offsets) > num_rows:
                    return np.asarray(members, dtype=np.int64), np.asarray(offsets, dtype=np.int64)
            members.append(record)
            used += length
    raise AssertionError("unreachable: epoch_orders is endless")


class PackedSFTDataset(torch.utils.data.Dataset):
    """Rows of packed conversations as the trainer's samples (tokens, labels, loss_mask, position_ids)."""

    def __init__(self, conversations: Conversations, records: np.ndarray, num_rows: int, seq_length: int,
                 seed: tuple[int, ...], chat: ChatFormat, pad_id: int, reset_position_ids: bool):
        self.conversations, self.chat = conversations, chat
        self.capacity, self.pad_id, self.reset_position_ids = seq_length + 1, pad_id, reset_position_ids
        lengths = conversations.longest(chat.overhead)
        self.members, self.offsets = pack_next_fit(lengths, records, self.capacity, num_rows, seed)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row_records(self, row: int) -> np.ndarray:
        """Record (document) indices of the conversations packed into `row`."""
        return self.members[self.offsets[row]:self.offsets[row + 1]]

    def __getitem__(self, row: int) -> dict:
        ids, is_response, positions = [], [], []
        for record in self.row_records(row).tolist():
            prompt, (response,) = self.conversations.get(record)
            conversation, mask = self.chat.conversation(prompt, response)
            ids.append(conversation)
            is_response.append(mask)
            positions.append(np.arange(len(conversation)))
        padding = self.capacity - sum(len(c) for c in ids)
        ids.append(np.full(padding, self.pad_id, dtype=np.int64))
        is_response.append(np.zeros(padding, dtype=bool))
        positions.append(np.arange(padding))
        return shifted_sample(np.concatenate(ids), np.concatenate(is_response),
                              np.concatenate(positions) if self.reset_position_ids else np.arange(self.capacity))


def shifted_sample(ids: np.ndarray, is_response: np.ndarray, positions: np.ndarray) -> dict:
    """seq_length + 1 ids -> the trainer's sample: token t predicts label t = id t + 1."""
    return {
        "tokens": torch.from_numpy(ids[:-1].astype(np.int64)),
        "labels": torch.from_numpy(ids[1:].astype(np.int64)),
        "loss_mask": torch.from_numpy(is_response[1:].astype(np.float32)),
        "position_ids": torch.from_numpy(positions[:-1].astype(np.int64)),
    }
