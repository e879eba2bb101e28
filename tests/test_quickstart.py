"""The README's main job, end to end, shortened: corpus -> tokenizer -> .bin/.idx -> training ->
checkpoint, then a second invocation that skips the finished steps and resumes training."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_quickstart(out, train_iters):
    env = {**os.environ, "OUT": str(out), "TRAIN_ITERS": str(train_iters), "VOCAB_SIZE": "1024",
           "PYTHON": sys.executable, "EXTRA_TRAIN_ARGS": "--num-workers 0 --micro-batch-size 4 --global-batch-size 4 --lr-warmup-iters 2"}
    result = subprocess.run(["bash", os.path.join(REPO, "launch", "quickstart.sh")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_quickstart_builds_data_trains_and_resumes(tmp_path):
    out = tmp_path / "qs"
    first = run_quickstart(out, train_iters=10)
    for path in ("data/stdlib.jsonl", "tokenizer/code_bpe_1024.model", "data/stdlib_text_document.bin",
                 "data/stdlib_text_document.idx", "metrics.jsonl", "checkpoints/iter_0000010/.metadata"):
        assert (out / path).exists(), path
    assert "step     10/10 | loss" in first and "Everything is under" in first
    second = run_quickstart(out, train_iters=12)
    assert "resumed from" in second and "at iteration 10" in second
    assert "step     12/12" in second and "step     10/" not in second
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 13))  # appended across the two invocations, no step repeated
    assert (out / "checkpoints" / "iter_0000012").is_dir()
