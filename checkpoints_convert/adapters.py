"""One adapter per Hugging Face architecture: how its config.json maps to our ModelConfig and how
its tensors map to ours.

The adapter is chosen by the exact `architectures` entry of config.json (never by a name prefix
or model_type guess). Each of our tensors is fused from one or more Hugging Face tensors, so the
key map is a list of `Rule`s: one of our tensors <-> its Hugging Face tensors, with the two
(exact, copy-only) transforms. Our layouts (docs/model.md):

    linear_qkv [nkv * (q_per_kv + 2) * d, h]: per KV group, its q_per_kv query heads, then its
               key head, then its value head. HF: q_proj [nq d, h], k_proj / v_proj [nkv d, h],
               query head i uses KV head i // q_per_kv: the same grouping, so only a regroup.
    linear_fc1 [2, ffn, h]: gate = [0], up = [1]  (HF gate_proj, up_proj)
    embedding / output_layer [V_padded, h]: HF gets the first vocab_size rows; HF -> ours pads
               with zero rows (padded ids are never inputs or targets).

RoPE: ours is the "rotate half" layout, the same as HF Llama/Qwen2, so q/k need no permutation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from checkpoints_convert.errors import ConvertError
from megatron_code.errors import ConfigError
from megatron_code.model.config import ModelConfig


@dataclass
class Rule:
    """One of our tensors and the Hugging Face tensors it is made of."""

    ours: str
    ours_shape: tuple
    hf: dict[str, tuple]  # HF name -> shape, in the order they are written
    to_hf: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    from_hf: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    hint: str = ""  # config fields that determine the shapes (for mismatch messages)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    out = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype)
    out[: t.shape[0]] = t
    return out


def _identity_rule(ours: str, hf: str, shape: tuple, hint: str) -> Rule:
    return Rule(ours, shape, {hf: shape}, lambda t: {hf: t}, lambda d: d[hf], hint)


class LlamaAdapter:
    """LlamaForCausalLM: our architecture exactly (GQA, RoPE rotate-half, SwiGLU, RMSNorm, no biases)."""

    architecture = "LlamaForCausalLM"
    model_type = "llama"
    default_tie = False  # LlamaConfig's default for tie_word_embeddings

    # ---- config ---------------------------------------------------------------------------
    def model_config(self, hf: dict) -> ModelConfig:
        """Our ModelConfig from a config.json dict; refuses what our model cannot compute."""
        self._refuse_unsupported(hf)
        h, heads = _require(hf, "hidden_size"), _require(hf, "num_attention_heads")
        nkv = hf.get("num_key_value_heads") or heads
        head_dim = hf.get("head_dim") or h // heads
        theta, scaling = rope_settings(hf, self.architecture)
        values = dict(
            num_layers=_require(hf, "num_hidden_layers"), hidden_size=h,
            ffn_hidden_size=_require(hf, "intermediate_size"), num_attention_heads=heads,
            group_query_attention=nkv != heads, num_query_groups=nkv if nkv != heads else None,
            kv_channels=head_dim if head_dim * heads != h else None,
            vocab_size=_require(hf, "vocab_size"),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rotary_base=float(theta), norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
            init_method_std=float(hf.get("initializer_range", 0.02)),
            untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", self.default_tie),
            attention_dropout=float(hf.get("attention_dropout", 0.0) or 0.0),
            params_dtype="float32",  # training keeps fp32 master weights; the stored dtype is kept as is
        )
        if scaling is not None:
            values.update(use_rope_scaling=True, **scaling)
        config = ModelConfig(**values)
        try:
            config.validate()
        except ConfigError as exc:
            raise ConvertError(f"config.json describes a model ours cannot build: {exc}") from None
        return config

    def _refuse_unsupported(self, hf: dict) -> None:
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConvertError(f"config.json: hidden_act={act!r}; our MLP is SwiGLU (silu) only.")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ConvertError(
                    f"config.json: {flag}=true. Our model has no bias terms, so the converted model "
                    "would compute different logits; models with biases are not supported (adding bias "
                    "support to the model is outside the converter's scope)."
                )

    def hf_config(self, config: ModelConfig, dtype: torch.dtype, special_ids: dict) -> dict:
        """config.json for transformers (v4-style rope keys, which v4 and v5 both read)."""
        rope_scaling = None
        if config.use_rope_scaling:
            rope_scaling = {
                "rope_type": "llama3", "factor": config.rope_scaling_factor,
                "low_freq_factor": config.rope_low_freq_factor, "high_freq_factor": config.rope_high_freq_factor,
                "original_max_position_embeddings": config.rope_original_max_position_embeddings,
            }
        return {
            "architectures": [self.architecture], "model_type": self.model_type,
            "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
            "intermediate_size": config.ffn_hidden_size, "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_kv_heads,
            "head_dim": config.head_dim, "hidden_act": "silu",
            "max_position_embeddings": config.max_position_embeddings,
            "initializer_range": config.init_method_std, "rms_norm_eps": config.norm_epsilon,
            "rope_theta": config.rotary_base, "rope_scaling": rope_scaling,
            "attention_bias": False, "attention_dropout": config.attention_dropout, "mlp_bias": False,
            "tie_word_embeddings": not config.untie_embeddings_and_output_weights,
            "use_cache": True, "pretraining_tp": 1,
            **special_ids, "torch_dtype": str(dtype).removeprefix("torch."),
        }

    # ---- tensors --------------------------------------------------------------------------
    def rules(self, config: ModelConfig, padded_vocab: int) -> list[Rule]:
        """Every tensor of the model, in the order they are written."""
        h, V = config.hidden_size, config.vocab_size
        rules = [_vocab_rule("embedding.word_embeddings.weight", "model.embed_tokens.weight", V, padded_vocab, h)]
        for i in range(config.num_layers):
            rules += self.layer_rules(config, i)
        rules.append(_identity_rule("decoder.final_layernorm.weight", "model.norm.weight", (h,), "hidden_size"))
        if config.untie_embeddings_and_output_weights:
            rules.append(_vocab_rule("output_layer.weight", "lm_head.weight", V, padded_vocab, h))
        return rules

    def layer_rules(self, config: ModelConfig, i: int) -> list[Rule]:
        h, d, ffn = config.hidden_size, config.head_dim, config.ffn_hidden_size
        nq, nkv = config.num_attention_heads, config.num_kv_heads
        ours, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        return [
            _identity_rule(ours + "input_layernorm.weight", hf + "input_layernorm.weight", (h,), "hidden_size"),
            _qkv_rule(ours + "self_attention.linear_qkv.weight", hf + "self_attn.", nq, nkv, d, h),
            _identity_rule(ours + "self_attention.linear_proj.weight", hf + "self_attn.o_proj.weight", (h, nq * d),
                           "hidden_size, num_attention_heads, head_dim"),
            _identity_rule(ours + "pre_mlp_layernorm.weight", hf + "post_attention_layernorm.weight", (h,), "hidden_size"),
            _gate_up_rule(ours + "mlp.linear_fc1.weight", hf + "mlp.", ffn, h),
            _identity_rule(ours + "mlp.linear_fc2.weight", hf + "mlp.down_proj.weight", (h, ffn),
                           "hidden_size, intermediate_size"),
        ]

    def ignorable(self, name: str, config: ModelConfig) -> bool:
        """HF tensors that carry nothing our model needs: old checkpoints' saved RoPE tables, and
        an lm_head stored although the embeddings are tied (transformers ignores it too)."""
        if name.endswith("rotary_emb.inv_freq"):
            return True
        return name == "lm_head.weight" and not config.untie_embeddings_and_output_weights

    def zero_tensors(self, config: ModelConfig) -> dict[str, tuple]:
        """HF tensors our model has no place for, accepted only when exactly zero."""
        return {}


class Qwen2Adapter(LlamaAdapter):
    """Qwen2ForCausalLM: Llama's block plus q/k/v biases (always present in transformers' Qwen2).

    Our model has no biases, so a Qwen2 checkpoint converts only when those biases are exactly
    zero (then the computation is identical); real Qwen2 releases have non-zero biases and are
    refused with an error that says so. Sliding-window attention is refused as well.
    """

    architecture = "Qwen2ForCausalLM"
    model_type = "qwen2"

    def _refuse_unsupported(self, hf: dict) -> None:
        super()._refuse_unsupported(hf)
        if hf.get("use_sliding_window"):
            raise ConvertError("config.json: use_sliding_window=true; our attention is full causal attention only.")

    def hf_config(self, config, dtype, special_ids):
        raise ConvertError("exporting to Qwen2ForCausalLM is not supported; our model exports as LlamaForCausalLM.")

    def zero_tensors(self, config: ModelConfig) -> dict[str, tuple]:
        d, nq, nkv = config.head_dim, config.num_attention_heads, config.num_kv_heads
        out = {}
        for i in range(config.num_layers):
            p = f"model.layers.{i}.self_attn."
            out.update({p + "q_proj.bias": (nq * d,), p + "k_proj.bias": (nkv * d,), p + "v_proj.bias": (nkv * d,)})
        return out

    def nonzero_message(self, name: str, max_abs: float) -> str:
        return (
            f"Qwen2 checkpoint has non-zero attention biases ({name}: max |b| = {max_abs:.3g}). Our model has "
            "no bias terms, so the converted model would compute different logits; converting Qwen2 models "
            "with QKV biases is not supported (adding bias support to our model is outside the converter's "
            "scope). Qwen2-architecture checkpoints whose biases are all zero convert exactly."
        )


ADAPTERS = {a.architecture: a for a in (LlamaAdapter(), Qwen2Adapter())}


def adapter_for(hf_config: dict, source: str) -> LlamaAdapter:
    """The adapter named by config.json's `architectures` field (exactly one entry)."""
    archs = hf_config.get("architectures")
    if not isinstance(archs, list) or len(archs) != 1:
        raise ConvertError(
            f"{source}: 'architectures' must list exactly one class (found {archs!r}); it selects the "
            f"converter. Supported: {', '.join(sorted(ADAPTERS))}."
        )
    if archs[0] not in ADAPTERS:
        raise ConvertError(
            f"{source}: unknown architecture {archs[0]!r}. Supported: {', '.join(sorted(ADAPTERS))} "
            "(the converter is chosen by this exact name, never guessed from model_type)."
        )
    return ADAPTERS[archs[0]]


def rope_settings(hf: dict, architecture: str) -> tuple[float, dict | None]:
    """(rope theta, our llama3 scaling fields or None) from a v4 (rope_theta / rope_scaling) or
    v5 (rope_parameters) config.json."""
    theta, scaling = hf.get("rope_theta"), hf.get("rope_scaling")
    params = hf.get("rope_parameters")
    if isinstance(params, dict):
        if "rope_type" not in params and "rope_theta" not in params:
            raise ConvertError(f"config.json: per-layer-type rope_parameters are not supported for {architecture}.")
        theta = params.get("rope_theta", theta)
        scaling = params
    theta = 10000.0 if theta is None else theta
    if not scaling:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ConvertError(
            f"config.json: rope scaling type {kind!r} is not implemented by our model (it has the default "
            "RoPE and Llama-3.1 'llama3' scaling only)."
        )
    return theta, dict(
        rope_scaling_factor=float(scaling["factor"]), rope_low_freq_factor=float(scaling["low_freq_factor"]),
        rope_high_freq_factor=float(scaling["high_freq_factor"]),
        rope_original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def _require(hf: dict, key: str):
    if key not in hf:
        raise ConvertError(f"config.json has no {key!r}.")
    return hf[key]


def _vocab_rule(ours: str, hf: str, vocab: int, padded: int, h: int) -> Rule:
    return Rule(ours, (padded, h), {hf: (vocab, h)}, lambda t: {hf: t[:vocab]},
                lambda d: _pad_rows(d[hf], padded), "vocab_size, hidden_size")


def _qkv_rule(ours: str, hf: str, nq: int, nkv: int, d: int, h: int) -> Rule:
    q_per_kv = nq // nkv
    names = {hf + "q_proj.weight": (nq * d, h), hf + "k_proj.weight": (nkv * d, h), hf + "v_proj.weight": (nkv * d, h)}
    q_name, k_name, v_name = names

    def to_hf(qkv: torch.Tensor) -> dict:
        grouped = qkv.view(nkv, q_per_kv + 2, d, h)
        return {
            q_name: grouped[:, :q_per_kv].reshape(nq * d, h),
            k_name: grouped[:, q_per_kv].reshape(nkv * d, h),
            v_name: grouped[:, q_per_kv + 1].reshape(nkv * d, h),
        }

    def from_hf(t: dict) -> torch.Tensor:
        dtype = torch.promote_types(torch.promote_types(t[q_name].dtype, t[k_name].dtype), t[v_name].dtype)
        q = t[q_name].to(dtype).view(nkv, q_per_kv, d, h)
        k = t[k_name].to(dtype).view(nkv, 1, d, h)
        v = t[v_name].to(dtype).view(nkv, 1, d, h)
        return torch.cat((q, k, v), dim=1).reshape(nkv * (q_per_kv + 2) * d, h)

    return Rule(ours, ((nq + 2 * nkv) * d, h), names, to_hf, from_hf,
                "hidden_size, num_attention_heads, num_key_value_heads, head_dim")


def _gate_up_rule(ours: str, hf: str, ffn: int, h: int) -> Rule:
    gate, up = hf + "gate_proj.weight", hf + "up_proj.weight"

    def from_hf(t: dict) -> torch.Tensor:
        dtype = torch.promote_types(t[gate].dtype, t[up].dtype)
        return torch.stack((t[gate].to(dtype), t[up].to(dtype)))

    return Rule(ours, (2, ffn, h), {gate: (ffn, h), up: (ffn, h)}, lambda w: {gate: w[0], up: w[1]}, from_hf,
                "hidden_size, intermediate_size")
