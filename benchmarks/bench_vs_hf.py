"""Training throughput of our GPTModel vs. transformers' LlamaForCausalLM, same shapes, same process.

Measures tokens/s of one full training step -- zero_grad + forward + loss + backward + AdamW step
(foreach, identical hyperparameters) -- on CPU in fp32 with SDPA attention, for both models built
with identical shapes and identical parameter counts (HF gets our padded vocab). Both are timed in
one process, interleaved: after `--warmup` untimed steps of each, every repeat times `--steps` steps
of one model and then `--steps` of the other, alternating which goes first (ours, HF, HF, ours, ...).
Reported per model: median and best tokens/s over the repeats; and three ratios ours/HF: of the
medians (the headline), of the bests, and the median of the per-repeat ratios (each repeat's two
runs are adjacent in time, so that one cancels slow load drifts best). The thread count is torch's
default; the header prints it with the torch version, the CPU model and the load average.

On a shared machine, other processes' load makes wall-clock numbers noisy (OpenMP barriers wait for
descheduled threads). For a contention-immune cross-check, `--threads 1 --clock cpu` times each
step by the calling thread's CPU time (diagnostic mode; the default never touches the thread count).

Before timing, our weights are copied into the HF model and the max |logit difference| is printed
as a check that the two compute the same function (fp32: expect ~1e-6).

    PYTHONPATH=. python benchmarks/bench_vs_hf.py --config tiny
    PYTHONPATH=. python benchmarks/bench_vs_hf.py --config small --json small.json

See docs/benchmarks.md for results and how to read them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from megatron_code.model import GPTModel, ModelConfig

PRESETS = {
    # Same shape as megatron_code.presets "tiny".
    "tiny": dict(num_layers=4, hidden_size=256, ffn_hidden_size=704, num_attention_heads=4,
                 num_query_groups=2, vocab_size=8192, batch=8, seq=256, repeats=15),
    "small": dict(num_layers=8, hidden_size=512, ffn_hidden_size=1408, num_attention_heads=8,
                  num_query_groups=2, vocab_size=16384, batch=4, seq=512, repeats=7),
}

# AdamW hyperparameters, identical for both models (decay on matrices only, as our trainer does).
LR, BETAS, EPS, WEIGHT_DECAY = 3e-4, (0.9, 0.95), 1e-8, 0.1
ROPE_THETA, NORM_EPS = 10000.0, 1e-5


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # no /proc (not Linux): fall back to what platform knows
        return platform.processor() or "unknown"
    return platform.processor() or "unknown"


def build_ours(p: dict, seq: int) -> GPTModel:
    cfg = ModelConfig(
        num_layers=p["num_layers"], hidden_size=p["hidden_size"], ffn_hidden_size=p["ffn_hidden_size"],
        num_attention_heads=p["num_attention_heads"], group_query_attention=True,
        num_query_groups=p["num_query_groups"], vocab_size=p["vocab_size"], make_vocab_size_divisible_by=128,
        max_position_embeddings=max(seq, 1024), rotary_base=ROPE_THETA, norm_epsilon=NORM_EPS,
        untie_embeddings_and_output_weights=True, attention_backend="sdpa",
    )
    return GPTModel(cfg)


def build_hf(p: dict, padded_vocab: int, seq: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=padded_vocab, hidden_size=p["hidden_size"], intermediate_size=p["ffn_hidden_size"],
        num_hidden_layers=p["num_layers"], num_attention_heads=p["num_attention_heads"],
        num_key_value_heads=p["num_query_groups"], hidden_act="silu", max_position_embeddings=max(seq, 1024),
        rms_norm_eps=NORM_EPS, rope_theta=ROPE_THETA, tie_word_embeddings=False, attention_bias=False,
        mlp_bias=False, attention_dropout=0.0, use_cache=False, attn_implementation="sdpa",
        torch_dtype=torch.float32,
    )
    # transformers 5.x reads RoPE theta from rope_parameters; make sure it is ours whatever the version.
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict):
        rp["rope_theta"] = ROPE_THETA
    model = LlamaForCausalLM(cfg).float()
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model


@torch.no_grad()
def copy_ours_into_hf(ours: GPTModel, hf) -> None:
    c = ours.config
    nq, nkv, d, h = c.num_attention_heads, c.num_kv_heads, c.head_dim, c.hidden_size
    q_per_kv = nq // nkv
    src = dict(ours.named_parameters())
    dst = dict(hf.named_parameters())
    written = set()

    def put(name, value):
        assert dst[name].shape == value.shape, (name, dst[name].shape, value.shape)
        dst[name].copy_(value)
        written.add(name)

    put("model.embed_tokens.weight", src["embedding.word_embeddings.weight"])
    put("model.norm.weight", src["decoder.final_layernorm.weight"])
    put("lm_head.weight", src["output_layer.weight"])
    for i in range(c.num_layers):
        o, t = f"decoder.layers.{i}.", f"model.layers.{i}."
        put(t + "input_layernorm.weight", src[o + "input_layernorm.weight"])
        qkv = src[o + "self_attention.linear_qkv.weight"].view(nkv, q_per_kv + 2, d, h)
        put(t + "self_attn.q_proj.weight", qkv[:, :q_per_kv].reshape(nq * d, h))
        put(t + "self_attn.k_proj.weight", qkv[:, q_per_kv].reshape(nkv * d, h))
        put(t + "self_attn.v_proj.weight", qkv[:, q_per_kv + 1].reshape(nkv * d, h))
        put(t + "self_attn.o_proj.weight", src[o + "self_attention.linear_proj.weight"])
        put(t + "post_attention_layernorm.weight", src[o + "pre_mlp_layernorm.weight"])
        fc1 = src[o + "mlp.linear_fc1.weight"]
        put(t + "mlp.gate_proj.weight", fc1[0])
        put(t + "mlp.up_proj.weight", fc1[1])
        put(t + "mlp.down_proj.weight", src[o + "mlp.linear_fc2.weight"])
    missing = set(dst) - written
    assert not missing, f"HF parameters not written: {sorted(missing)}"


def param_groups(model: torch.nn.Module) -> list[dict]:
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model), lr=LR, betas=BETAS, eps=EPS, foreach=True)


# Equal work for the loss: our model returns the cross-entropy at all b*s positions (labels are
# already the next tokens, shifted by the data loader). If HF got labels=tokens it would shift
# internally and compute the loss over b*(s-1) positions, plus a contiguous copy of the shifted
# [b, s-1, V] logits -- different work. So HF returns the full [b, s, V] logits (it computes all s
# positions either way) and we apply the same F.cross_entropy over the same b*s (logit, label) pairs.
def step_ours(model, opt, tokens, labels):
    opt.zero_grad(set_to_none=True)
    loss = model(tokens, labels=labels).mean()
    loss.backward()
    opt.step()
    return loss


def step_hf(model, opt, tokens, labels):
    opt.zero_grad(set_to_none=True)
    logits = model(input_ids=tokens).logits  # [b, s, V]
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
    loss.backward()
    opt.step()
    return loss


def timed(step, model, opt, tokens, labels, steps: int, clock=time.perf_counter) -> float:
    t0 = clock()
    for _ in range(steps):
        step(model, opt, tokens, labels)
    return clock() - t0


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--batch", type=int, default=None, help="micro-batch size (default: per preset)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default: per preset)")
    ap.add_argument("--steps", type=int, default=1, help="timed steps per repeat per model")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per model before timing")
    ap.add_argument("--repeats", type=int, default=None,
                    help="interleaved repeats (ours, HF, HF, ours, ...); the median is reported (default: per preset)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="diagnostics only: torch.set_num_threads(N) (default: leave torch's default alone)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time (default). cpu: this thread's CPU time, immune to other processes "
                         "on a shared machine; needs --threads 1 (other threads' work would not be counted)")
    ap.add_argument("--json", metavar="OUT", default=None, help="write the results here as JSON")
    args = ap.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu needs --threads 1: it counts only the calling thread's CPU time")
    p = PRESETS[args.config]
    args.batch, args.seq, args.repeats = args.batch or p["batch"], args.seq or p["seq"], args.repeats or p["repeats"]
    return args


def print_header(args, transformers) -> tuple:
    print(f"# bench_vs_hf: config={args.config} batch={args.batch} seq={args.seq} steps={args.steps} "
          f"warmup={args.warmup} repeats={args.repeats} clock={args.clock}")
    print(f"# torch {torch.__version__}, transformers {transformers.__version__}, python "
          f"{platform.python_version()}, threads={torch.get_num_threads()}, cpu: {cpu_model()}")
    load = os.getloadavg()
    print(f"# cores={os.cpu_count()}, load average at start (1/5/15 min): "
          f"{load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}")
    if args.clock == "wall" and load[0] > 0.5 * (os.cpu_count() or 1):
        print("# WARNING: the machine is busy; with OpenMP threads oversubscribed, absolute tokens/s can "
              "drop several-fold (the interleaved ratio is more robust, but rerun on an idle machine).")
    return load


def sanity_check(ours, hf, tokens, labels, vocab: int) -> dict:
    """Same weights -> same logits and loss (eval mode; both have zero dropout anyway). Only the
    real vocabulary is compared: our model sets padded-vocabulary logits to -inf."""
    copy_ours_into_hf(ours, hf)
    ours.eval()
    hf.eval()
    with torch.no_grad():
        lo = ours(tokens)[..., :vocab]
        lh = hf(input_ids=tokens).logits[..., :vocab]
        result = dict(sanity_max_abs_logit_diff=(lo - lh).abs().max().item(),
                      sanity_loss_ours=ours(tokens, labels=labels).mean().item(),
                      sanity_loss_hf=F.cross_entropy(lh.flatten(0, 1), labels.flatten()).item())
    print(f"# sanity: max |logits ours - hf| = {result['sanity_max_abs_logit_diff']:.3e} (logit scale "
          f"{lo.abs().max().item():.3f}); loss ours={result['sanity_loss_ours']:.6f} hf={result['sanity_loss_hf']:.6f}")
    ours.train()
    hf.train()
    return result


def interleaved_times(runs: dict, tokens, labels, args, clock) -> dict:
    """Warm both up, then alternate ours/HF per repeat so load changes hit both alike."""
    for step, model, opt in runs.values():
        timed(step, model, opt, tokens, labels, args.warmup)
    times = {"ours": [], "hf": []}
    for r in range(args.repeats):
        for name in (("ours", "hf") if r % 2 == 0 else ("hf", "ours")):
            step, model, opt = runs[name]
            times[name].append(timed(step, model, opt, tokens, labels, args.steps, clock))
    return times


def summarize(times: dict, args, n_params: dict) -> dict:
    tokens_per_step = args.batch * args.seq
    tps = {k: [args.steps * tokens_per_step / t for t in v] for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in tps.items()}
    best = {k: max(v) for k, v in tps.items()}
    ms = {k: 1000 * statistics.median(v) / args.steps for k, v in times.items()}
    # Each repeat's ours and HF runs are adjacent in time, so their ratio cancels slow drifts in load.
    per_repeat = [a / b for a, b in zip(tps["ours"], tps["hf"])]
    ratio, ratio_best, ratio_paired = med["ours"] / med["hf"], best["ours"] / best["hf"], statistics.median(per_repeat)
    print()
    print("| model | params | tokens/step | ms/step (median) | tokens/s (median) | tokens/s (best) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, label in (("ours", "ours (GPTModel)"), ("hf", "HF LlamaForCausalLM (sdpa)")):
        print(f"| {label} | {n_params[name]:,} | {tokens_per_step} | {ms[name]:.1f} | {med[name]:,.0f} | {best[name]:,.0f} |")
    print(f"| **ratio ours/HF** | | | | **{ratio:.3f}x** | {ratio_best:.3f}x |")
    print()
    print(f"# load average at end: {os.getloadavg()[0]:.2f}")
    print(f"ratio ours/HF: {ratio:.3f}x (median tokens/s), {ratio_best:.3f}x (best), {ratio_paired:.3f}x "
          f"(median of per-repeat paired ratios)")
    print(f"per-repeat ratios: {', '.join(f'{x:.2f}' for x in per_repeat)}")
    return dict(
        tokens_per_s_ours=tps["ours"], tokens_per_s_hf=tps["hf"],
        median_tokens_per_s_ours=med["ours"], median_tokens_per_s_hf=med["hf"],
        median_ms_per_step_ours=ms["ours"], median_ms_per_step_hf=ms["hf"],
        best_tokens_per_s_ours=best["ours"], best_tokens_per_s_hf=best["hf"],
        ratio_ours_over_hf=ratio, ratio_best=ratio_best, ratio_paired_median=ratio_paired,
        ratio_per_repeat=per_repeat,
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    p = PRESETS[args.config]
    torch.manual_seed(args.seed)
    import transformers

    load = print_header(args, transformers)
    ours = build_ours(p, args.seq)
    hf = build_hf(p, ours.vocab_size, args.seq)
    n_params = {"ours": sum(x.numel() for x in ours.parameters()), "hf": sum(x.numel() for x in hf.parameters())}
    print(f"# params: ours={n_params['ours']:,} hf={n_params['hf']:,} (padded vocab {ours.vocab_size})")
    if n_params["ours"] != n_params["hf"]:
        sys.exit(f"parameter counts differ: ours {n_params['ours']} vs hf {n_params['hf']}")
    g = torch.Generator().manual_seed(args.seed + 1)
    tokens = torch.randint(0, p["vocab_size"], (args.batch, args.seq), generator=g)
    labels = torch.randint(0, p["vocab_size"], (args.batch, args.seq), generator=g)
    sanity = sanity_check(ours, hf, tokens, labels, p["vocab_size"])
    runs = {"ours": (step_ours, ours, make_optimizer(ours)), "hf": (step_hf, hf, make_optimizer(hf))}
    summary = summarize(interleaved_times(runs, tokens, labels, args, clock), args, n_params)
    result = dict(
        config=args.config, batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup,
        repeats=args.repeats, clock=args.clock, torch=torch.__version__, transformers=transformers.__version__,
        threads=torch.get_num_threads(), cpu=cpu_model(), cores=os.cpu_count(), loadavg_start=list(load),
        loadavg_end=list(os.getloadavg()), params_ours=n_params["ours"], params_hf=n_params["hf"],
        padded_vocab=ours.vocab_size, **sanity, **summary,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"# wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
