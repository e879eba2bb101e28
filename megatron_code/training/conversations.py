"""The SFT and DPO files written by the data tools' export (data_tools/export.py), read and checked.

An export prefix PREFIX (e.g. ``export/sft``) names aligned megatron-core indexed datasets, one per
field, ``PREFIX_{field}_document.bin/.idx``: document i of each belongs to record i. Prompts carry
no EOD token, responses (``response``; ``chosen`` and ``rejected``) end with one.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_code.errors import ConfigError

FIELDS = {"sft": ("prompt", "response"), "dpo": ("prompt", "chosen", "rejected")}
FLAGS = {"sft": "--sft-data-path", "dpo": "--dpo-data-path"}
# Documents whose EOD placement is checked: enough to catch swapped or foreign files, cheap on an mmap.
_DOCUMENTS_TO_CHECK = 16


def field_path(prefix: str, field: str) -> str:
    return f"{prefix}_{field}_document"


class Conversations:
    """The aligned datasets of one export prefix: prompts, then one or two response datasets."""

    def __init__(self, prefix: str, mode: str):
        self.prefix, self.mode = prefix, mode
        self.prompts, *self.responses = (IndexedDataset(field_path(prefix, f)) for f in FIELDS[mode])

    def __len__(self) -> int:
        return len(self.prompts)

    def get(self, index: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """(prompt ids, [response ids, ...]) of record `index`."""
        return self.prompts[index], [dataset[index] for dataset in self.responses]

    def longest(self, overhead: int) -> np.ndarray:
        """Per record, the length of its longest chat-formatted conversation (prompt + a response)."""
        responses = np.stack([d.sequence_lengths for d in self.responses]).max(axis=0)
        return overhead + self.prompts.sequence_lengths.astype(np.int64) + responses


def files_exist(prefix: str, mode: str) -> bool:
    """Every field's .bin and .idx exist."""
    return all(os.path.isfile(field_path(prefix, f) + ext) for f in FIELDS[mode] for ext in (".bin", ".idx"))


def check_files(prefix: str, mode: str) -> None:
    """Every field's .bin/.idx exists, or one error naming the missing file and the fix."""
    for field in FIELDS[mode]:
        for ext in (".bin", ".idx"):
            path = field_path(prefix, field) + ext
            if not os.path.isfile(path):
                raise ConfigError(
                    f"{FLAGS[mode]} {prefix}: {path} does not exist. Give the export's prefix "
                    f"(OUTPUT_DIR/{mode} for OUTPUT_DIR/{mode}_{field}_document.bin), written by "
                    f"`python -m data_tools export --formats {mode} --tokenizer TOKENIZER.model`."
                )


def check_alignment(conversations: Conversations, eod: int) -> None:
    """The same number of records in every field, and EOD only where the export puts it."""
    mode, flag = conversations.mode, FLAGS[conversations.mode]
    counts = {f: len(d) for f, d in zip(FIELDS[mode], (conversations.prompts, *conversations.responses))}
    if len(set(counts.values())) > 1:
        raise ConfigError(
            f"{flag} {conversations.prefix}: the datasets are not aligned, documents per field: {counts}. "
            "They must come from one export run; re-run the export into an empty directory."
        )
    if not len(conversations):
        raise ConfigError(f"{flag} {conversations.prefix}: the datasets hold no records.")
    for index in range(min(len(conversations), _DOCUMENTS_TO_CHECK)):
        prompt, responses = conversations.get(index)
        for field, ids, ends_with_eod in ((FIELDS[mode][0], prompt, False),
                                          *((f, r, True) for f, r in zip(FIELDS[mode][1:], responses))):
            if (len(ids) > 0 and int(ids[-1]) == eod) != ends_with_eod:
                raise ConfigError(
                    f"{flag} {conversations.prefix}: document {index} of {field_path(conversations.prefix, field)} "
                    f"{'does not end' if ends_with_eod else 'ends'} with the EOD id {eod}; the export writes "
                    "prompts without and responses with EOD. Were the files swapped or made by another tool?"
                )


def check_export_tokenizer(prefix: str, mode: str, tokenizer_model: str) -> None:
    """When the export's manifest.json sits next to the prefix, its tokenizer must be this run's."""
    manifest_path = os.path.join(os.path.dirname(os.path.abspath(prefix)), "manifest.json")
    if not os.path.isfile(manifest_path):
        return
    with open(manifest_path) as fh:
        recorded = (json.load(fh).get("tokenizer") or {})
    if not recorded.get("sha256"):
        return
    with open(tokenizer_model, "rb") as fh:
        actual = hashlib.sha256(fh.read()).hexdigest()
    if actual != recorded["sha256"]:
        raise ConfigError(
            f"{FLAGS[mode]} {prefix}: {manifest_path} says the data was tokenized with "
            f"{recorded.get('path')} (sha256 {recorded['sha256'][:12]}...), but --tokenizer-model "
            f"{tokenizer_model} has sha256 {actual[:12]}.... Pass the export's tokenizer, or re-export "
            "with this one."
        )
