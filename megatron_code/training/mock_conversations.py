"""--mock-data for --training-mode sft and dpo: synthetic conversations that stand in for an export
prefix, so that SFT and DPO steps can be profiled and layouts tried without data (what
megatron-core's MockGPTDataset is for pretraining).

Record i has a prompt and one (SFT) or two (DPO: chosen, rejected) responses of random token ids;
their lengths are drawn once for all records (prompts up to a quarter, responses up to half of the
ids the format leaves), so that conversations vary in length as real ones do (SFT packs two or
three per row on average, DPO pads each pair) and every one fits in --seq-length + 1 ids.
Responses end with the EOD id, prompts do not, as in the export. The ids and lengths are a pure
function of (seed, record): every rank builds the same samples, and a resumed run reads the rows
the uninterrupted one would have. The real dataset classes (PackedSFTDataset,
PreferencePairDataset) consume them: only the source is synthetic.
"""
from __future__ import annotations

import numpy as np

from megatron_code.errors import ConfigError
from megatron_code.training.chat_format import ChatFormat

RECORDS = 4096
"""Enough records that packing and shuffling see many lengths; epochs repeat them as for real data."""
FIRST_PLAIN_ID = 16
"""Ids below this are left to control pieces (<unk>, <s>, </s>, <pad>, the chat markers)."""


def synthetic_chat_format() -> ChatFormat:
    """The chat format's id runs for a run without a tokenizer (--mock-data --vocab-size N): the
    ids of <s>, <|im_start|> and <|im_end|> in tokenizers made by mcode-train-tokenizer (1, 7, 8)
    and plain ids for the words, as many as that tokenizer's format adds (13 ids: "user", "\n",
    "assistant" are several pieces each there)."""
    newline = 18
    return ChatFormat(before_prompt=(1, 7, 16, 17, newline),
                      before_response=(8, newline, 7, 19, 20, 21, 22, newline))


class MockConversations:
    """The interface of conversations.Conversations (prefix, mode, len, get, longest) over synthetic
    records."""

    prefix = "--mock-data"

    def __init__(self, mode: str, vocab_size: int, eod: int, seq_length: int, overhead: int, seed: int):
        self.mode, self.vocab_size, self.eod, self.seed = mode, vocab_size, eod, seed
        room = seq_length + 1 - overhead  # ids left for a prompt and its longest response
        if room < 4 or vocab_size <= FIRST_PLAIN_ID:
            raise ConfigError(
                f"--mock-data --training-mode {mode}: --seq-length {seq_length} leaves {room} ids beside the "
                f"chat format's {overhead}, and --vocab-size {vocab_size} must exceed {FIRST_PLAIN_ID}; "
                "use --seq-length >= 16."
            )
        rng = np.random.default_rng((seed, RECORDS, seq_length))
        # Prompts up to a quarter of the room, responses (EOD included) up to half: SFT rows then
        # hold two or three conversations on average, and the longest one still fits.
        self.prompt_lengths = rng.integers(1, room // 4 + 1, RECORDS)
        responses = 1 if mode == "sft" else 2
        self.response_lengths = rng.integers(2, room // 2 + 1, (RECORDS, responses))

    def __len__(self) -> int:
        return RECORDS

    def get(self, index: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """(prompt ids, [response ids, ...]) of record `index`; responses end with EOD."""
        rng = np.random.default_rng((self.seed, index))
        prompt = rng.integers(FIRST_PLAIN_ID, self.vocab_size, int(self.prompt_lengths[index]))
        responses = []
        for length in self.response_lengths[index].tolist():
            ids = rng.integers(FIRST_PLAIN_ID, self.vocab_size, length)
            ids[-1] = self.eod
            responses.append(ids)
        return prompt, responses

    def longest(self, overhead: int) -> np.ndarray:
        """Per record, the length of its longest chat-formatted conversation."""
        return overhead + self.prompt_lengths + self.response_lengths.max(axis=1)
