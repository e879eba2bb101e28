#!/usr/bin/env bash
# The README's main job, on CPU, from nothing but this repo and the Python standard library:
#   1. seed corpus: the standard library's own .py sources (PSF-2.0, a permissive license)
#   2. a sentencepiece BPE tokenizer for code trained on it
#   3. the corpus tokenized into Megatron .bin/.idx
#   4. the `tiny` GQA + RoPE model trained on it for a few hundred steps, with a checkpoint
# Re-running skips finished steps and resumes training from the last checkpoint.
# Knobs: OUT (output dir), TRAIN_ITERS, VOCAB_SIZE, EXTRA_TRAIN_ARGS.
set -euo pipefail

OUT=${OUT:-runs/quickstart}
TRAIN_ITERS=${TRAIN_ITERS:-300}
VOCAB_SIZE=${VOCAB_SIZE:-8192}
PY=${PYTHON:-python}
mkdir -p "$OUT/data" "$OUT/tokenizer"

corpus="$OUT/data/stdlib.jsonl"
tokenizer="$OUT/tokenizer/code_bpe_${VOCAB_SIZE}"
prefix="$OUT/data/stdlib"

echo "== 1/4 seed corpus -> $corpus"
[ -f "$corpus" ] || "$PY" -m data_tools.seed_corpus --output "$corpus"

echo "== 2/4 tokenizer -> $tokenizer.model"
[ -f "$tokenizer.model" ] || "$PY" -m data_tools.train_tokenizer --input "$corpus" \
    --vocab-size "$VOCAB_SIZE" --output-prefix "$tokenizer"

echo "== 3/4 .bin/.idx -> ${prefix}_text_document.{bin,idx}"
[ -f "${prefix}_text_document.idx" ] || "$PY" -m data_tools.preprocess_data --input "$corpus" \
    --tokenizer-model "$tokenizer.model" --output-prefix "$prefix" --workers 2

echo "== 4/4 train tiny for $TRAIN_ITERS steps -> $OUT/checkpoints"
# shellcheck disable=SC2086
"$PY" -m megatron_code.train --preset tiny \
    --data-path "${prefix}_text_document" --tokenizer-model "$tokenizer.model" \
    --train-iters "$TRAIN_ITERS" --eval-interval 100 --eval-iters 4 --log-interval 10 \
    --save "$OUT/checkpoints" --load "$OUT/checkpoints" --save-interval 100 \
    --metrics-file "$OUT/metrics.jsonl" --tensorboard-dir "$OUT/tensorboard" \
    ${EXTRA_TRAIN_ARGS:-}

cat <<DONE

Done. Everything is under $OUT:
  corpus          $corpus
  tokenizer       $tokenizer.model
  token data      ${prefix}_text_document.bin / .idx
  checkpoints     $OUT/checkpoints (latest: $(cat "$OUT/checkpoints/latest_checkpointed_iteration.txt" 2>/dev/null || echo none))
  metrics         $OUT/metrics.jsonl (one JSON object per step)
  tensorboard     tensorboard --logdir $OUT/tensorboard
DONE
