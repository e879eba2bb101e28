"""--training-mode dpo: the training loop of Trainer with the DPO objective against a frozen
reference model.

The reference is a second GPTModel of the same layout (TP/SP/DP; validation refuses PP and CP),
loaded from --ref-load (default --load; with --mock-data and neither, the policy's initial weights)
and kept in eval mode without gradients (under --bf16 its GEMM weights in bf16: _freeze). Its
log-probs are computed on the fly, in the same step as the policy's: one extra forward pass per
step (about a third more compute than training the policy alone) and a second copy of the weights
(no gradients, no optimizer state). Each sample is a pair; the step's loss is the mean DPO loss over the pairs of
the global batch, so gradients do not depend on how the batch is cut into micro-batches and ranks.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from megatron_code.model import GPTModel
from megatron_code.model.core_attention import pack_documents
from megatron_code.training import checkpointing
from megatron_code.training.data import segment_ids_from_eod
from megatron_code.training.dpo_loss import PairLosses, dpo_losses, sequence_log_probs
from megatron_code.training.flops import REFERENCE_FLOPS_SHARE
from megatron_code.training.metrics import print_rank0
from megatron_code.training.resume import check_same_model
from megatron_code.training.trainer import Trainer



class DPOTrainer(Trainer):
    def __init__(self, cfg, env, tokenizer, parallel, exit_signal=None):
        super().__init__(cfg, env, tokenizer, parallel, exit_signal)
        self.reference = self._load_reference()
        self.sequences_per_sample = 2  # chosen and rejected
        self.flops_per_token *= 1.0 + REFERENCE_FLOPS_SHARE
        self._step_sums = torch.zeros(3, dtype=torch.float64)  # chosen reward, rejected reward, correct

    def _load_reference(self) -> GPTModel:
        """Built as the policy was (same seed, layout and --params-dtype: the same initial weights,
        and with bf16 parameters the same rounding, so policy and reference agree at the start),
        then loaded from the reference checkpoint; with --mock-data and none (validated), left at
        those weights."""
        ck = self.cfg.checkpoint
        root, flag = (ck.ref_load, "--ref-load") if ck.ref_load else (ck.load, "--load")
        reference = GPTModel(self.cfg.model, self.parallel, init_seed=self.cfg.training.seed).to(self.env.device)
        source = "the policy's initial weights (--mock-data, no checkpoint)"
        if root:
            state = checkpointing.read_train_state(root)
            check_same_model(state, self.cfg, flag)
            checkpointing.load_checkpoint(root, reference, None, self.parallel, restore_rng=False)
            source = f"{root} iteration {state['iteration']}"
        self._freeze(reference)
        print_rank0(f"DPO reference model: {source} (frozen), beta {self.cfg.training.dpo_beta}",
                    enabled=self.env.is_main)
        return reference

    def _freeze(self, reference: GPTModel) -> None:
        """Eval mode, no gradients; under --bf16 (without FP8) the weights that only feed GEMMs are
        stored in bf16, as autocast would cast them at every forward: half the memory, no casts,
        the same log-probs. Norm weights stay fp32 (the norms compute with them in fp32), and so
        does the embedding table when the residual stream is fp32 (its rows would be rounded)."""
        reference.eval().requires_grad_(False)
        if not self.cfg.training.bf16 or self.cfg.model.fp8_format is not None:
            return  # FP8 casts from the fp32 weight: rounding to bf16 first could change the result
        table = reference.embedding.word_embeddings.weight  # DPO runs without PP: rank has the embedding
        keep = {id(table)} if self.cfg.model.fp32_residual_connection else set()
        for param in reference.parameters():
            if param.dim() >= 2 and id(param) not in keep:
                param.data = param.data.to(torch.bfloat16)

    def _response_log_probs(self, model: GPTModel, batch: dict) -> torch.Tensor:
        """[b, 2, s] pairs -> [b, 2] summed response log-probs (column 0 chosen, 1 rejected)."""
        device = self.env.device
        tokens, positions, labels, mask = (batch[key].flatten(0, 1).to(device, non_blocking=True) for key in
                                           ("tokens", "position_ids", "labels", "loss_mask"))
        segment_ids = None
        if self.cfg.data.reset_attention_mask:  # documents found on the host (core_attention.pack_documents)
            segment_ids = pack_documents(segment_ids_from_eod(batch["tokens"].flatten(0, 1), self.tokenizer.eod), device)
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if self.cfg.training.bf16 else nullcontext())
        with autocast:
            losses = model(tokens, positions, segment_ids, labels=labels)
        return sequence_log_probs(losses, mask.to(losses.dtype)).view(-1, 2)

    def pair_losses(self, batch: dict) -> PairLosses:
        with self.timers.phase("forward"):
            policy = self._response_log_probs(self.model, batch)
        with self.timers.phase("reference-forward"), torch.no_grad():
            reference = self._response_log_probs(self.reference, batch)
        return dpo_losses(policy, reference, self.cfg.training.dpo_beta)

    def _loss_normalizer(self, micro_batches: list[dict]) -> float:
        """Pairs in the global batch: every sample is one pair."""
        return float(self.cfg.training.global_batch_size)

    def _accumulate_gradients(self, micro_batches: list[dict], total_pairs: float) -> torch.Tensor:
        total_loss = torch.zeros((), device=self.env.device)
        sums = torch.zeros(3, dtype=torch.float64, device=self.env.device)  # NCCL reduces CUDA tensors only
        for i, batch in enumerate(micro_batches):
            if self.grad_reducer is not None and i == len(micro_batches) - 1:
                self.grad_reducer.arm(1)
            pairs = self.pair_losses(batch)
            with self.timers.phase("backward"):
                (pairs.losses.sum() / total_pairs).backward()
            total_loss += pairs.losses.detach().sum() / total_pairs
            sums += torch.stack([pairs.chosen_rewards.sum(), pairs.rejected_rewards.sum(),
                                 (pairs.chosen_rewards > pairs.rejected_rewards).sum()]).double()
        self._step_sums = self._sum_over_dp(sums) / total_pairs
        return total_loss

    def step_tensors(self) -> dict[str, torch.Tensor]:
        """Means over the step's pairs, measured before its update (on the device)."""
        chosen, rejected, accuracy = self._step_sums
        return {"reward_chosen": chosen, "reward_rejected": rejected, "reward_accuracy": accuracy}

    def step_metrics(self, values: dict[str, float]) -> dict:
        return {**values, "reward_margin": values["reward_chosen"] - values["reward_rejected"]}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean DPO loss over the first eval_iters global batches of the validation split."""
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.env.device)  # [loss sum, pairs]
        for batch in self._validation_batches():
            losses = self.pair_losses(batch).losses
            totals += torch.stack([losses.sum().double(), torch.tensor(len(losses), dtype=torch.float64,
                                                                       device=totals.device)])
        loss_sum, pairs = self._sum_over_dp(totals).tolist()
        return loss_sum / pairs

    def _log_validation(self) -> None:
        self.metrics.log_validation(self.iteration, self.evaluate(), perplexity=False)
