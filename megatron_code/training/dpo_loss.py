"""The DPO objective (Rafailov et al. 2023, "Direct Preference Optimization"):

    loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))

where log pi(y) is the log-probability of the response y given the prompt, summed over the
response tokens, under the policy pi being trained and under the frozen reference. The implicit
rewards beta * (log pi(y) - log ref(y)) of chosen and rejected responses are what DPO pushes apart.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def sequence_log_probs(token_losses: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """[n, s] per-token cross-entropy (-log p of each label) and 0/1 response mask -> [n] summed
    log-probability of each sequence's response."""
    return -(token_losses * loss_mask).sum(dim=-1)


@dataclass
class PairLosses:
    """Per pair of one micro-batch."""

    losses: torch.Tensor
    """[b] DPO loss of each pair (with autograd history through the policy's log-probs)."""
    chosen_rewards: torch.Tensor
    """[b] beta * (log pi(chosen) - log ref(chosen)), detached."""
    rejected_rewards: torch.Tensor
    """[b] beta * (log pi(rejected) - log ref(rejected)), detached."""


def dpo_losses(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> PairLosses:
    """policy, reference: [b, 2] summed response log-probs, column 0 chosen, column 1 rejected."""
    rewards = beta * (policy - reference)
    losses = -F.logsigmoid(rewards[:, 0] - rewards[:, 1])
    detached = rewards.detach()
    return PairLosses(losses, detached[:, 0], detached[:, 1])
