"""The decoder's shape and numerics, and the named presets built from it."""
from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass

import torch

from megatron_code.errors import ConfigError

ATTENTION_BACKENDS = ("sdpa", "flash", "te")
PARAMS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# How to get each optional backend; the error for a missing one quotes this.
_BACKEND_INSTALL = {
    "flash": ("flash_attn", "pip install flash-attn --no-build-isolation (needs CUDA; see docs/install.md)"),
    "te": ("transformer_engine", "pip install 'transformer-engine[pytorch]' (needs CUDA; see docs/install.md)"),
}


@dataclass
class ModelConfig:
    """A GQA + RoPE + SwiGLU + RMSNorm decoder (Llama architecture). Field names are Megatron-LM's
    argument names, so `--hidden-size` on the command line sets `hidden_size` here."""

    num_layers: int = 4
    """Number of transformer layers."""
    hidden_size: int = 256
    """Width of the residual stream."""
    ffn_hidden_size: int = 704
    """Width of the SwiGLU MLP's gate and up projections."""
    num_attention_heads: int = 4
    """Number of query heads."""
    group_query_attention: bool = False
    """Use grouped-query attention with `num_query_groups` key/value heads (else one per query head)."""
    num_query_groups: int | None = None
    """Number of key/value heads when `group_query_attention` is set."""
    kv_channels: int | None = None
    """Head dimension; defaults to hidden_size / num_attention_heads."""
    vocab_size: int | None = None
    """Tokenizer vocabulary size (unpadded). Normally taken from --tokenizer-model."""
    make_vocab_size_divisible_by: int = 128
    """Pad the embedding rows to a multiple of this times the tensor-parallel size (GEMM efficiency)."""
    max_position_embeddings: int = 1024
    """Longest sequence the model is configured for (RoPE itself has no table and no hard limit)."""
    rotary_base: float = 10000.0
    """RoPE theta."""
    use_rope_scaling: bool = False
    """Apply Llama-3.1-style frequency-dependent RoPE scaling (for long-context extension)."""
    rope_scaling_factor: float = 8.0
    """Llama-3.1 RoPE scaling factor: long wavelengths are stretched by this much."""
    rope_low_freq_factor: float = 1.0
    """Llama-3.1 RoPE scaling: wavelengths above original_max / low_freq_factor are fully scaled."""
    rope_high_freq_factor: float = 4.0
    """Llama-3.1 RoPE scaling: wavelengths below original_max / high_freq_factor are left unscaled."""
    rope_original_max_position_embeddings: int = 8192
    """Llama-3.1 RoPE scaling: context length the model was pretrained with before extension."""
    norm_epsilon: float = 1e-5
    """Epsilon of RMSNorm."""
    init_method_std: float = 0.02
    """Std of the normal init; output projections use std / sqrt(2 * num_layers)."""
    untie_embeddings_and_output_weights: bool = False
    """Give the output layer its own weight instead of reusing the input embedding."""
    params_dtype: str = "float32"
    """Dtype the parameters are created in (float32, bfloat16, float16). Training needs float32
    master weights: float32 parameters are their own (--bf16 autocasts the compute), bfloat16
    ones train with --bf16 --use-distributed-optimizer, which keeps their fp32 master weights
    sharded (Megatron-LM's distributed optimizer: 6 + 12/DP bytes per parameter instead of
    10 + 12/DP). Also for inference and conversion."""
    attention_backend: str = "sdpa"
    """Core attention kernel: sdpa (torch, any device), flash (flash-attn), te (Transformer Engine)."""
    recompute_granularity: str | None = None
    """Activation recompute (Megatron's semantics): full (whole transformer layers, chosen by
    recompute_method) or selective (core attention only, in every layer). Unset: store everything."""
    recompute_method: str | None = None
    """With --recompute-granularity full: uniform (checkpoint groups of recompute_num_layers
    consecutive layers, storing only each group's input) or block (recompute only the first
    recompute_num_layers layers of each pipeline stage)."""
    recompute_num_layers: int | None = None
    """With full recompute: layers per checkpointed group (uniform) or recomputed layers per
    pipeline stage (block). Must be unset for selective recompute."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities (Llama-style pretraining uses 0)."""
    hidden_dropout: float = 0.0
    """Dropout after the attention and MLP blocks, before the residual add."""
    fp8_format: str | None = None
    """FP8 for the transformer layers' linear GEMMs: e4m3, or hybrid (e4m3 forward, e5m2 gradients).
    Unset = no FP8. Needs a Hopper-class GPU for speed (the torch backend also runs on CPU)."""
    fp8_recipe: str = "delayed"
    """FP8 scaling: delayed (per-tensor amax history, Transformer Engine's default) or tensorwise
    (current per-tensor amax)."""
    fp8_backend: str = "torch"
    """torch (torch._scaled_mm, no extra packages) or te (Transformer Engine modules)."""
    fp8_margin: int = 0
    """FP8 scales are divided by 2^margin for headroom."""
    fp8_amax_history_len: int = 1024
    """Delayed scaling: how many past amax values each tensor remembers."""
    fp8_amax_compute_algo: str = "max"
    """Delayed scaling: max over the amax history, or most_recent."""
    fp8_wgrad_impl: str = "auto"
    """FP8 (torch backend) under gradient-accumulation fusion: how micro-batches after a step's first
    add their weight gradient into the fp32 gradient. triton: inside the FP8 GEMM's epilogue
    (kernels/triton_fp8_gemm.py); reference: torch._scaled_mm writes it, then an add; auto: triton
    on CUDA when triton imports, else reference."""
    fp8_fused_swiglu: bool = True
    """FP8 (torch backend): the MLP's SwiGLU writes its output and its input gradient directly in FP8
    for the GEMMs on either side (kernels/fp8_mlp.py), instead of in bf16 for those GEMMs' casts to
    read again. Off: two FP8 linears around a bf16 SwiGLU (for A/B timing)."""
    num_layers_at_start_in_bf16: int = 0
    """Keep this many first transformer layers out of FP8."""
    num_layers_at_end_in_bf16: int = 0
    """Keep this many last transformer layers out of FP8."""
    rmsnorm_impl: str = "auto"
    """RMSNorm kernel: auto (Triton on CUDA when triton imports, else reference), triton, reference
    (plain torch, any device), te (Transformer Engine's RMSNorm) or apex (apex MixedFusedRMSNorm)."""
    rope_impl: str = "auto"
    """RoPE kernel (q and k rotated together): auto, triton (one launch for q and k) or reference."""
    swiglu_impl: str = "auto"
    """silu(gate) * up kernel: auto, triton (one pass forward and backward, recomputes silu) or reference."""
    cross_entropy_impl: str = "auto"
    """Loss head: unfused (full logits, then vocab-parallel cross-entropy); triton or reference (output
    GEMM fused with the cross-entropy in token chunks, never holding [tokens, vocab] logits; the
    backward recomputes each chunk's logits); auto = triton on CUDA when triton imports, else unfused."""
    fp32_residual_connection: bool = False
    """Keep the residual stream (embedding output, the sums of the blocks' outputs, the norms'
    inputs) in fp32 under bf16 autocast. Off (Megatron-LM's default): it stays in bf16, halving
    its memory traffic and the layer inputs that activation recompute keeps; the norms still
    reduce in fp32."""
    gradient_accumulation_fusion: bool = True
    """Under bf16 autocast, the attention and MLP linears' weight-gradient GEMMs write fp32 straight
    into the master gradient, and each weight's bf16 copy is made once per step rather than per
    micro-batch; the embedding adds its row gradients into its master gradient in place
    (megatron_code/parallel/fused_wgrad.py). Off: autograd's bf16 weight gradient, cast and added
    per micro-batch, and the embedding's dense gradient added per micro-batch. Zero-bubble pipeline schedules always run it off."""

    # ---- derived quantities -------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_query_groups if self.group_query_attention else self.num_attention_heads

    @property
    def torch_params_dtype(self) -> torch.dtype:
        return PARAMS_DTYPES[self.params_dtype]

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        """Vocab rounded up to a multiple of make_vocab_size_divisible_by * TP (Megatron's rule)."""
        if self.vocab_size is None:
            raise ConfigError("vocab_size is unknown: pass --tokenizer-model (or --vocab-size).")
        multiple = self.make_vocab_size_divisible_by * tensor_parallel_size
        return -(-self.vocab_size // multiple) * multiple

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- validation -----------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError for the first inconsistent field, naming it and the fix."""
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{_flag(name)} must be positive, got {getattr(self, name)}.")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"--hidden-size ({self.hidden_size}) must be divisible by --num-attention-heads "
                f"({self.num_attention_heads}); or set --kv-channels explicitly."
            )
        if self.group_query_attention:
            if not self.num_query_groups:
                raise ConfigError("--group-query-attention needs --num-query-groups (number of KV heads).")
            if self.num_attention_heads % self.num_query_groups:
                raise ConfigError(
                    f"--num-attention-heads ({self.num_attention_heads}) must be divisible by "
                    f"--num-query-groups ({self.num_query_groups})."
                )
        for name in ("init_method_std", "rotary_base") + (("rope_scaling_factor",) if self.use_rope_scaling else ()):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{_flag(name)} must be > 0, got {getattr(self, name)}.")
        for name in ("attention_dropout", "hidden_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{_flag(name)} must be in [0, 1), got {getattr(self, name)}.")
        if self.head_dim % 2:
            raise ConfigError(f"head dim must be even for RoPE, got {self.head_dim}.")
        if self.params_dtype not in PARAMS_DTYPES:
            raise ConfigError(f"--params-dtype must be one of {sorted(PARAMS_DTYPES)}, got {self.params_dtype!r}.")
        _check_attention_backend(self.attention_backend)
        _check_recompute(self)
        _check_fp8(self)
        _check_kernels(self)

    def num_parameters(self, tensor_parallel_size: int = 1) -> int:
        """Exact parameter count of GPTModel built from this config (tested against the model)."""
        h, d, L = self.hidden_size, self.head_dim, self.num_layers
        attn = h * d * (self.num_attention_heads + 2 * self.num_kv_heads) + self.num_attention_heads * d * h
        mlp = 3 * h * self.ffn_hidden_size
        norms = 2 * h
        embed = self.padded_vocab_size(tensor_parallel_size) * h
        output = embed if self.untie_embeddings_and_output_weights else 0
        return L * (attn + mlp + norms) + h + embed + output


def _flag(name: str) -> str:
    return name.replace("_", "-")


RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")


def _check_recompute(config: ModelConfig) -> None:
    """Megatron-LM's rules for the three recompute flags."""
    granularity, method, count = config.recompute_granularity, config.recompute_method, config.recompute_num_layers
    if granularity is None:
        if method is not None or count is not None:
            raise ConfigError("--recompute-method/--recompute-num-layers need --recompute-granularity full.")
        return
    if granularity not in RECOMPUTE_GRANULARITIES:
        raise ConfigError(f"--recompute-granularity must be one of {RECOMPUTE_GRANULARITIES}, got {granularity!r}.")
    if granularity == "selective":
        if method is not None or count is not None:
            raise ConfigError("--recompute-granularity selective recomputes core attention in every layer: "
                              "drop --recompute-method and --recompute-num-layers (they apply to full).")
        return
    if method not in RECOMPUTE_METHODS:
        raise ConfigError(f"--recompute-granularity full needs --recompute-method, one of {RECOMPUTE_METHODS}; "
                          f"got {method!r}.")
    if count is None or not 1 <= count <= config.num_layers:
        raise ConfigError(f"--recompute-granularity full needs --recompute-num-layers between 1 and --num-layers "
                          f"({config.num_layers}); got {count}.")


def _check_kernels(config: ModelConfig) -> None:
    """Each *_impl names a known implementation whose package imports; whether the tensors' device
    suits it (Triton on CPU needs TRITON_INTERPRET=1) is checked at the kernel's first call."""
    from kernels.dispatch import KernelSelectionError, check_choice
    from kernels.fp8_linear import FP8_WGRAD_IMPLS
    from kernels.linear_cross_entropy import LOSS_HEAD_IMPLS
    from kernels.rmsnorm import RMSNORM_IMPLS
    from kernels.rotary import ROPE_IMPLS
    from kernels.swiglu import SWIGLU_IMPLS

    choices = {"rmsnorm_impl": RMSNORM_IMPLS, "rope_impl": ROPE_IMPLS, "swiglu_impl": SWIGLU_IMPLS,
               "cross_entropy_impl": LOSS_HEAD_IMPLS, "fp8_wgrad_impl": FP8_WGRAD_IMPLS}
    for name, allowed in choices.items():
        try:
            check_choice(f"--{_flag(name)}", getattr(config, name), allowed)
        except KernelSelectionError as err:
            raise ConfigError(str(err)) from None


def _check_te_fp8(config: ModelConfig) -> None:
    """What Transformer Engine's Linear under te.autocast can run (megatron_code/model/te_linear.py)."""
    from kernels.dispatch import package_imports

    if not package_imports("transformer_engine.pytorch"):
        module, how = _BACKEND_INSTALL["te"]
        raise ConfigError(f"--fp8-backend te needs the '{module}' package, which does not import here (it needs "
                          f"CUDA). Install it with: {how}. Or use --fp8-backend torch (torch._scaled_mm).")
    if config.fp8_recipe == "tensorwise" and config.fp8_margin:
        raise ConfigError(f"--fp8-margin {config.fp8_margin}: Transformer Engine's current scaling "
                          "(--fp8-recipe tensorwise) has no margin; drop it or use --fp8-recipe delayed.")
    if config.recompute_granularity == "full":
        # torch's checkpoint reruns the layers outside te.autocast, without their FP8 state.
        raise ConfigError("--fp8-backend te does not run under --recompute-granularity full; use selective "
                          "recompute or --fp8-backend torch.")


def _check_attention_backend(backend: str) -> None:
    if backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"--attention-backend must be one of {ATTENTION_BACKENDS}, got {backend!r}.")
    if backend in _BACKEND_INSTALL:
        module, how = _BACKEND_INSTALL[backend]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"--attention-backend {backend} needs the '{module}' package, which is not installed. "
                f"Install it with: {how}. Or use --attention-backend sdpa (works everywhere)."
            )


def _check_fp8(config: ModelConfig) -> None:
    from kernels.fp8_scaling import AMAX_ALGOS, FORMATS, RECIPES

    if config.fp8_format is None:
        return
    choices = {"fp8_format": FORMATS, "fp8_recipe": RECIPES, "fp8_amax_compute_algo": AMAX_ALGOS,
               "fp8_backend": ("torch", "te")}
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ConfigError(f"--{_flag(name)} must be one of {allowed}, got {getattr(config, name)!r}.")
    if config.fp8_backend == "te":
        _check_te_fp8(config)
    if config.fp8_amax_history_len < 1:
        raise ConfigError(f"--fp8-amax-history-len must be >= 1, got {config.fp8_amax_history_len}.")
    bf16_layers = config.num_layers_at_start_in_bf16 + config.num_layers_at_end_in_bf16
    if min(config.num_layers_at_start_in_bf16, config.num_layers_at_end_in_bf16) < 0 or bf16_layers > config.num_layers:
        raise ConfigError(
            f"--num-layers-at-start-in-bf16 ({config.num_layers_at_start_in_bf16}) + --num-layers-at-end-in-bf16 "
            f"({config.num_layers_at_end_in_bf16}) must be non-negative and at most --num-layers ({config.num_layers})."
        )
