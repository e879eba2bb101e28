"""mcode-convert: checkpoint conversion to and from Hugging Face (see docs/convert.md).

Exit codes: 0 success, 1 --verify / verify found logits differing beyond the tolerance,
2 bad input (the message names the file or tensor and the fix; nothing is left behind).
"""
from __future__ import annotations

import argparse
import sys

from checkpoints_convert.errors import ConvertError, VerifyError

PROG = "mcode-convert"
DTYPE_CHOICES = ("bfloat16", "float16", "float32")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Convert checkpoints to and from Hugging Face format.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("to-hf", help="our checkpoint -> Hugging Face LlamaForCausalLM directory")
    p.add_argument("checkpoint", help="a --save directory (its latest iteration) or one iter_XXXXXXX directory")
    p.add_argument("output", help="Hugging Face directory to create")
    p.add_argument("--iteration", type=int, default=None, help="iteration to convert from a --save directory (default: latest)")
    p.add_argument("--tokenizer-model", default=None,
                   help="sentencepiece .model (default: the one recorded in the checkpoint's train_state.json)")
    p.add_argument("--no-tokenizer", action="store_true",
                   help="write weights and config only (e.g. the model came from-hf with a non-sentencepiece tokenizer)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="cast the weights (default: keep the checkpoint's)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB (default: 5GB)")
    _common(p)

    p = sub.add_parser("from-hf", help="Hugging Face directory (Llama, Qwen2) -> our checkpoint")
    p.add_argument("hf_dir", help="Hugging Face model directory (config.json + safetensors)")
    p.add_argument("output", help="checkpoint directory to create (use it as mcode-train --load ... --finetune)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="cast the weights (default: keep the HF dtype)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="TP size the checkpoint will be trained with (pads the vocabulary for it; default: 1)")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="PP size the checkpoint will be trained with (recorded; default: 1)")
    _common(p)

    p = sub.add_parser("reshard", help="our checkpoint -> our checkpoint for another (TP, PP) layout")
    p.add_argument("checkpoint", help="a --save directory (its latest iteration) or one iter_XXXXXXX directory")
    p.add_argument("output", help="checkpoint directory to create")
    p.add_argument("--iteration", type=int, default=None, help="iteration to take from a --save directory (default: latest)")
    p.add_argument("--tensor-model-parallel-size", type=int, required=True, help="target TP size")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="target PP size (default: 1)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")

    p = sub.add_parser("verify", help="compare our checkpoint's logits with transformers' on a HF directory")
    p.add_argument("checkpoint", help="our checkpoint (--save directory or iter_XXXXXXX directory)")
    p.add_argument("hf_dir", help="Hugging Face model directory")
    p.add_argument("--atol", type=float, default=1e-4, help="largest allowed |logit difference| (default: 1e-4)")
    p.add_argument("--num-sequences", type=int, default=2, help="random sequences to compare (default: 2)")
    p.add_argument("--seq-length", type=int, default=32, help="tokens per sequence (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random tokens (default: 0)")
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--verify", action="store_true",
                   help="load the result with transformers and compare logits with ours before publishing it")
    p.add_argument("--atol", type=float, default=1e-4, help="--verify tolerance on |logit difference| (default: 1e-4)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> None:
    from checkpoints_convert.from_hf import from_hf
    from checkpoints_convert.to_hf import to_hf
    from checkpoints_convert.verify import verify_logits

    if args.command == "to-hf":
        to_hf(args.checkpoint, args.output, iteration=args.iteration, tokenizer_model=args.tokenizer_model,
              no_tokenizer=args.no_tokenizer, dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
              verify=args.verify, atol=args.atol, progress=not args.quiet)
    elif args.command == "from-hf":
        from_hf(args.hf_dir, args.output, dtype=args.dtype,
                tensor_model_parallel_size=args.tensor_model_parallel_size,
                pipeline_model_parallel_size=args.pipeline_model_parallel_size, overwrite=args.overwrite,
                verify=args.verify, atol=args.atol, progress=not args.quiet)
    elif args.command == "reshard":
        from checkpoints_convert.reshard import reshard

        reshard(args.checkpoint, args.output, tensor_model_parallel_size=args.tensor_model_parallel_size,
                pipeline_model_parallel_size=args.pipeline_model_parallel_size, iteration=args.iteration,
                overwrite=args.overwrite)
    else:
        verify_logits(args.checkpoint, args.hf_dir, atol=args.atol, num_sequences=args.num_sequences,
                      seq_length=args.seq_length, seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except ConvertError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except VerifyError as exc:
        print(f"{PROG}: verify failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
