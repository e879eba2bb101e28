"""The chat format of SFT and DPO samples: ChatML turns built from the tokenizer's control ids.

One conversation, as token ids (control symbols in angle brackets are single ids that
``encode`` never produces, so no text in the data can forge them):

    <s> <|im_start|> "user\\n" PROMPT <|im_end|> "\\n" <|im_start|> "assistant\\n" RESPONSE </s>

The data tools' export writes PROMPT without and RESPONSE with the trailing ``</s>`` (EOD), so the
response's own EOD ends the assistant turn: generation stops at EOS. The loss covers exactly the
RESPONSE ids (its ``</s>`` included). A Hugging Face chat template reproducing the prefix is
``<s><|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_code.errors import ConfigError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


@dataclass(frozen=True)
class ChatFormat:
    """The id runs around a prompt and a response (see the module docstring)."""

    before_prompt: tuple[int, ...]
    """<s> <|im_start|> user\\n"""
    before_response: tuple[int, ...]
    """<|im_end|> \\n <|im_start|> assistant\\n"""

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "ChatFormat":
        """Read the control ids from the tokenizer; a tokenizer without them is refused."""
        sp = tokenizer.sp
        ids = {piece: sp.piece_to_id(piece) for piece in (IM_START, IM_END)}
        missing = [piece for piece, i in ids.items() if i == sp.unk_id() or not sp.is_control(i)]
        if missing or tokenizer.bos < 0:
            raise ConfigError(
                f"--tokenizer-model {tokenizer.model_path}: SFT/DPO need the control pieces <s>, "
                f"{IM_START} and {IM_END}; missing: {missing or ['<s>']}. Train the tokenizer with "
                "mcode-train-tokenizer, which reserves them."
            )
        return cls(before_prompt=(tokenizer.bos, ids[IM_START], *tokenizer.encode("user\n")),
                   before_response=(ids[IM_END], *tokenizer.encode("\n"), ids[IM_START],
                                    *tokenizer.encode("assistant\n")))

    @property
    def overhead(self) -> int:
        """Ids the format adds to a prompt and a response."""
        return len(self.before_prompt) + len(self.before_response)

    def conversation(self, prompt: np.ndarray, response: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, is_response) of one conversation; is_response marks the ids the model is trained
        to produce."""
        parts = (np.asarray(self.before_prompt), prompt, np.asarray(self.before_response), response)
        ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])
        is_response = np.zeros(len(ids), dtype=bool)
        is_response[len(ids) - len(response):] = True
        return ids, is_response
