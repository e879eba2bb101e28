"""AdamW with decoupled weight decay on matrices only (clipping: megatron_code.parallel.grads)."""
from __future__ import annotations

import torch

from megatron_code.training.config import OptimizerConfig


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay weight matrices and embeddings; never norms or biases (1-D tensors), as Megatron does."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim == 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, config: OptimizerConfig) -> torch.optim.AdamW:
    return adamw(parameter_groups(model, config.weight_decay), config, next(model.parameters()).is_cuda)


def adamw(groups: list[dict], config: OptimizerConfig, on_cuda: bool) -> torch.optim.AdamW:
    """torch AdamW with the run's hyperparameters (shared by the distributed optimizer's shards)."""
    return torch.optim.AdamW(
        groups,
        lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps,
        fused=on_cuda or None,  # one kernel for all params on GPU; foreach on CPU
    )


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
