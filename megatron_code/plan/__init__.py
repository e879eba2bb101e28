"""Parallelism planner: which (TP, PP, VP, CP, DP, micro-batch, recompute, ZeRO-1) layouts fit a
model on a GPU cluster, and which is fastest. Files by idea: hardware (GPU table), layout (a
candidate and its validity), activations and memory (per-GPU bytes), timing (step time), search
(enumerate and rank), cli, and measure (tensor bytes of a real step, to check the memory model)."""
