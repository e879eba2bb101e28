"""Rewrite the committed golden loss curve of the `tiny` preset (run from the repo root):

    python -m tests.golden.regenerate

Do this only for an intended change of numerics (and say why in the commit): the golden test
exists so that refactors cannot change them silently.
"""
import json
import os
import tempfile

from data_tools.preprocess_data import preprocess_data
from tests.conftest import CORPUS, TOKENIZER, run_training
from tests.golden.spec import GOLDEN_FILE, golden_run_values

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        prefix = preprocess_data(CORPUS, TOKENIZER, os.path.join(tmp, "sample"), progress=False).outputs["text"]
        history = run_training(golden_run_values(prefix))
    record = {
        "what": "tiny preset, fixture corpus + tokenizer, seed 1234, CPU fp32, 50 steps",
        "loss": [h["loss"] for h in history],
        "grad_norm": [h["grad_norm"] for h in history],
    }
    with open(GOLDEN_FILE, "w") as fh:
        json.dump(record, fh, indent=1)
    print(f"wrote {GOLDEN_FILE}: loss {record['loss'][0]:.4f} -> {record['loss'][-1]:.4f}")
