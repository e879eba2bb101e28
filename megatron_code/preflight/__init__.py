"""Preflight check of a job's GPUs and links before a long run (`python -m megatron_code.preflight`,
launch/slurm/preflight.sbatch): every rank's GEMM throughput, each node's all-reduce bandwidth and
the bandwidth between neighbouring nodes, compared across the job; the slow GPUs and nodes are
named with a `--exclude` list for sbatch. One slow GPU or link sets the pace of all 512."""
