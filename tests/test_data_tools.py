"""Tests for data_tools: seed corpus -> tokenizer -> Megatron .bin/.idx.

A small corpus (~300 KB of the stdlib) and a 1000-piece tokenizer are built once per module
so the whole file runs in well under a minute on 2 CPU cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from data_tools import preprocess_data, seed_corpus, train_tokenizer
from data_tools.train_tokenizer import CONTROL_SYMBOLS, split_document

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRICKY_CODE = [
    "def f(x):\n\treturn x\n",
    "class A:\n    def m(self):\n        pass\n\n\n\nx = 1\n",
    "   leading spaces and trailing spaces   ",
    "\n\n\nblank lines first\n\n",
    "a  =  b    +   c\t\t# mixed  \t whitespace \t\n",
    "s = '中文注释 and emoji 😀🚀' # ünïcödé\n",
    "x = 1234567890 + 3.14159e-10\n",
    "\t\t\tdeep\ttabs\n\t\n",
    "line with CRLF\r\nnext\r\n",
    "",
    " ",
    "\n",
    "<|im_start|>literal special text<|im_end|></s><s><pad><unk>",
    "if a:\n" + " " * 37 + "odd indent\n",
]


def _error_message(excinfo: pytest.ExceptionInfo) -> str:
    """The one-line message a CLI exits with (SystemExit(str))."""
    assert isinstance(excinfo.value.code, str), f"expected a message, got exit code {excinfo.value.code!r}"
    return excinfo.value.code


def _write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("data_tools")


@pytest.fixture(scope="module")
def corpus(workdir) -> str:
    path = str(workdir / "seed.jsonl")
    seed_corpus.main(["--output", path, "--max-bytes", "300000"])
    return path


@pytest.fixture(scope="module")
def tokenizer_model(workdir, corpus) -> str:
    prefix = str(workdir / "tok")
    train_tokenizer.main(["--input", corpus, "--vocab-size", "1000", "--output-prefix", prefix,
                          "--num-threads", "2"])
    return prefix + ".model"


@pytest.fixture(scope="module")
def tokenizer(tokenizer_model):
    from megatron_code.tokenizer import SentencePieceTokenizer

    return SentencePieceTokenizer(tokenizer_model)


# ---- seed corpus --------------------------------------------------------------------------


def test_seed_corpus_is_deterministic_and_well_formed(corpus, tmp_path):
    again = str(tmp_path / "again.jsonl")
    seed_corpus.main(["--output", again, "--max-bytes", "300000"])
    with open(corpus, "rb") as a, open(again, "rb") as b:
        assert a.read() == b.read()
    records = [json.loads(line) for line in open(corpus, encoding="utf-8")]
    assert records, "corpus is empty"
    paths = [r["path"] for r in records]
    assert paths == sorted(paths)
    assert sum(len(r["text"].encode()) for r in records[:-1]) < 300_000  # stopped once the limit was reached
    for r in records:
        assert set(r) == {"text", "path", "source", "license"}
        assert r["license"] == "PSF-2.0" and r["source"].startswith("python-stdlib-")
        assert r["text"].strip() and not r["path"].startswith("/")
        parts = r["path"].split("/")[:-1]
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts)


def test_seed_corpus_rejects_non_permissive_license(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("x = 1\n")
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as excinfo:
        seed_corpus.main(["--output", str(out), "--source-dir", str(src), "--license", "GPL-3.0"])
    msg = _error_message(excinfo)
    assert "GPL-3.0" in msg and "allowlist" in msg and "MIT" in msg
    assert not out.exists()
    with pytest.raises(SystemExit) as excinfo:
        seed_corpus.main(["--output", str(out), "--source-dir", str(src)])
    assert "--license" in _error_message(excinfo)


def test_seed_corpus_source_dir_filters_and_counts(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "pkg" / "tests").mkdir(parents=True)
    (src / ".git").mkdir()
    (src / "pkg" / "b.py").write_text("def b():\n    return 2\n")
    (src / "a.PY").write_text("a = 1\n")
    (src / "pkg" / "tests" / "test_b.py").write_text("assert True\n")
    (src / ".git" / "hook.py").write_text("x = 1\n")
    (src / "empty.py").write_text("  \n")
    (src / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    (src / "big.py").write_text("x = 1\n" * 100)
    (src / "notes.txt").write_text("not code\n")
    out = tmp_path / "out.jsonl"
    seed_corpus.main(["--output", str(out), "--source-dir", str(src), "--license", "mit",
                      "--max-file-bytes", "300", "--source-name", "demo"])
    records = [json.loads(line) for line in open(out, encoding="utf-8")]
    assert [r["path"] for r in records] == ["a.PY", "pkg/b.py"]
    assert {r["license"] for r in records} == {"MIT"} and {r["source"] for r in records} == {"demo"}
    summary = capsys.readouterr().out
    assert "empty=1" in summary and "non_utf8=1" in summary and "too_large=1" in summary
    with pytest.raises(SystemExit) as excinfo:
        seed_corpus.main(["--output", str(out), "--source-dir", str(src), "--license", "MIT"])
    assert "already exists" in _error_message(excinfo) and "--overwrite" in _error_message(excinfo)


# ---- tokenizer ----------------------------------------------------------------------------


def test_tokenizer_special_ids(tokenizer):
    sp = tokenizer.sp
    assert (sp.unk_id(), tokenizer.bos, tokenizer.eod, tokenizer.pad) == (0, 1, 2, 3)
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert [sp.id_to_piece(i) for i in range(4, 9)] == list(CONTROL_SYMBOLS)
    assert all(sp.is_control(i) for i in range(1, 9))
    assert sp.get_piece_size() == tokenizer.vocab_size == 1000
    assert sp.piece_to_id("<0x00>") > 0 and sp.piece_to_id("<0xFF>") > 0  # byte fallback pieces exist


@pytest.mark.parametrize("code", TRICKY_CODE)
def test_tokenizer_round_trips_code_exactly(tokenizer, code):
    ids = tokenizer.encode(code)
    assert tokenizer.decode(ids) == code
    assert 0 not in ids, "byte fallback should make <unk> impossible"
    assert not set(ids) & set(range(1, 9)), "literal text must never become a special/control id"


def test_tokenizer_round_trips_sentencepiece_space_marker(tokenizer):
    # sentencepiece's own space marker, written literally in source code, must survive too.
    code = 'bar = "\u2581\u2582\u2583"\n\u2581 x\u2581\u2581'
    assert tokenizer.decode(tokenizer.encode(code)) == code


def test_tokenizer_splits_digits_and_newline_is_one_token(tokenizer):
    sp = tokenizer.sp
    pieces = [sp.id_to_piece(i) for i in tokenizer.encode("x = 1234567890")]
    assert pieces[-10:] == list("1234567890")
    newline = sp.piece_to_id("\n")
    assert tokenizer.encode("\n") == [newline]
    assert tokenizer.encode("\n\n\n") == [newline] * 3
    assert tokenizer.encode("a\nb").count(newline) == 1
    assert not sp.is_byte(newline)
    assert not sp.is_byte(tokenizer.encode("\t")[0])  # tab is a real piece, not a byte


def test_tokenizer_training_is_deterministic(corpus, tokenizer_model, tmp_path):
    prefix = str(tmp_path / "tok")  # same name as the fixture's: the name is stored in the model
    train_tokenizer.main(["--input", corpus, "--vocab-size", "1000", "--output-prefix", prefix,
                          "--num-threads", "2"])
    with open(tokenizer_model, "rb") as a, open(prefix + ".model", "rb") as b:
        assert a.read() == b.read()


def test_tokenizer_vocab_too_large_is_explained(tmp_path):
    data = _write_jsonl(tmp_path / "tiny.jsonl", [{"text": "def f(x):\n    return x + 1\n"}] * 30)
    prefix = tmp_path / "out" / "tok"
    with pytest.raises(SystemExit) as excinfo:
        train_tokenizer.main(["--input", data, "--vocab-size", "4000", "--output-prefix", str(prefix)])
    msg = _error_message(excinfo)
    assert "--vocab-size 4000 is too large" in msg and "lower --vocab-size" in msg and "more data" in msg
    assert not (tmp_path / "out").exists(), "a failed run must not leave directories or files"


def test_tokenizer_input_errors(corpus, tokenizer_model, tmp_path):
    cases = [
        (["--input", str(tmp_path / "missing.jsonl")], "does not exist"),
        (["--input", corpus, "--json-key", "content"], "missing key 'content'"),
        (["--input", corpus, "--vocab-size", "100"], "too small"),
        # An explicit 0 used to mean "all CPUs" (`or`); now refused like any thread count below 1.
        (["--input", corpus, "--num-threads", "0"], "--num-threads must be >= 1, got 0"),
        (["--input", corpus, "--input-sentence-size", "-1"], "--input-sentence-size must be >= 0 (0: every"),
    ]
    for extra, expected in cases:
        with pytest.raises(SystemExit) as excinfo:
            train_tokenizer.main(extra + ["--output-prefix", str(tmp_path / "t")])
        assert expected in _error_message(excinfo)
    with pytest.raises(SystemExit) as excinfo:
        train_tokenizer.main(["--input", corpus, "--output-prefix", tokenizer_model[: -len(".model")]])
    assert "already exists" in _error_message(excinfo)
    assert os.listdir(tmp_path) == []


def test_tokenizer_bad_line_mid_file_names_the_line(corpus, tmp_path):
    lines = open(corpus, encoding="utf-8").read().splitlines()
    bad = _write_jsonl(tmp_path / "bad.jsonl", lines[:12] + ['{"text": 42}'] + lines[12:])
    with pytest.raises(SystemExit) as excinfo:
        train_tokenizer.main(["--input", bad, "--vocab-size", "1000", "--output-prefix", str(tmp_path / "t")])
    assert "bad.jsonl:13: key 'text' must be a string, got a number" in _error_message(excinfo)
    assert os.listdir(tmp_path) == ["bad.jsonl"]


def test_split_document_keeps_text_and_limit():
    text = "short line\n" * 50 + "x" * 700 + "\n" + "é" * 300 + "\nend"
    chunks = list(split_document(text, 256))
    assert "".join(chunks) == text
    assert all(0 < len(c.encode()) <= 256 for c in chunks)
    assert list(split_document("small\n", 256)) == ["small\n"]


# ---- preprocess ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def preprocess_input(workdir, corpus) -> str:
    records = [json.loads(line) for line in open(corpus, encoding="utf-8")]
    docs = [{"text": r["text"], "path": r["path"]} for r in records]
    docs += [{"text": ""}] + [{"text": code} for code in TRICKY_CODE if code]
    return _write_jsonl(workdir / "docs.jsonl", docs)


def _expected_documents(path, tokenizer, append_eod=True):
    texts = [json.loads(line)["text"] for line in open(path, encoding="utf-8")]
    return [tokenizer.encode(t) + ([tokenizer.eod] if append_eod else []) for t in texts if t]


def _read_dataset(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return dataset, [dataset[i].tolist() for i in range(len(dataset))]


def test_preprocess_round_trip(preprocess_input, tokenizer_model, tokenizer, tmp_path, capsys):
    prefix = str(tmp_path / "ds")
    preprocess_data.main(["--input", preprocess_input, "--tokenizer-model", tokenizer_model,
                          "--output-prefix", prefix, "--log-interval", "3"])
    dataset, documents = _read_dataset(prefix + "_text_document")
    assert documents == _expected_documents(preprocess_input, tokenizer)
    assert dataset.index.dtype.__name__ == "uint16"
    assert len(dataset.document_indices) == len(documents) + 1
    assert "1 empty skipped" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["ds_text_document.bin", "ds_text_document.idx"]


def test_preprocess_workers_are_byte_identical(preprocess_input, tokenizer_model, tokenizer, tmp_path):
    outputs = {}
    for workers in (1, 2):
        prefix = str(tmp_path / f"w{workers}")
        preprocess_data.main(["--input", preprocess_input, "--tokenizer-model", tokenizer_model,
                              "--output-prefix", prefix, "--workers", str(workers), "--no-append-eod"])
        outputs[workers] = [open(f"{prefix}_text_document{ext}", "rb").read() for ext in (".bin", ".idx")]
    assert outputs[1] == outputs[2]
    _, documents = _read_dataset(str(tmp_path / "w2_text_document"))
    assert documents == _expected_documents(preprocess_input, tokenizer, append_eod=False)


def test_preprocess_multiple_keys(tokenizer_model, tokenizer, tmp_path):
    data = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": "def f():", "answer": "\n    return 1\n"},
                                               {"prompt": "x = ", "answer": ""}])
    summary = preprocess_data.preprocess_data(data, tokenizer_model, str(tmp_path / "out"),
                                              json_keys=["prompt", "answer"], progress=False)
    assert summary.documents == {"prompt": 2, "answer": 1} and summary.skipped == {"prompt": 0, "answer": 1}
    _, answers = _read_dataset(str(tmp_path / "out_answer_document"))
    assert answers == [tokenizer.encode("\n    return 1\n") + [tokenizer.eod]]


def _run_preprocess_error(argv, tmp_path) -> str:
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SystemExit) as excinfo:
        preprocess_data.main(argv)
    assert sorted(os.listdir(tmp_path)) == before, "a failed run must leave no files behind"
    return _error_message(excinfo)


def test_preprocess_errors_are_clear_and_leave_nothing(preprocess_input, tokenizer_model, tmp_path):
    out = ["--output-prefix", str(tmp_path / "sub" / "ds")]
    model = ["--tokenizer-model", tokenizer_model]
    msg = _run_preprocess_error(["--input", str(tmp_path / "nope.jsonl")] + model + out, tmp_path)
    assert "--input" in msg and "nope.jsonl" in msg and "does not exist" in msg
    msg = _run_preprocess_error(["--input", preprocess_input, "--tokenizer-model", str(tmp_path / "x.model")] + out,
                                tmp_path)
    assert "--tokenizer-model" in msg and "mcode-train-tokenizer" in msg
    msg = _run_preprocess_error(["--input", preprocess_input, "--json-keys", "content"] + model + out, tmp_path)
    assert "docs.jsonl:1" in msg and "missing key 'content'" in msg and "--json-keys" in msg
    lines = open(preprocess_input, encoding="utf-8").read().splitlines()
    bad = _write_jsonl(tmp_path / "bad.jsonl", lines[:12] + ['{"text": "unterminated'] + lines[12:])
    for workers in ("1", "2"):
        msg = _run_preprocess_error(["--input", bad, "--workers", workers] + model + out, tmp_path)
        assert "bad.jsonl:13" in msg and "invalid JSON" in msg


def test_preprocess_refuses_to_overwrite(preprocess_input, tokenizer_model, tmp_path):
    prefix = str(tmp_path / "ds")
    argv = ["--input", preprocess_input, "--tokenizer-model", tokenizer_model, "--output-prefix", prefix]
    preprocess_data.main(argv)
    original = open(prefix + "_text_document.bin", "rb").read()
    msg = _run_preprocess_error(argv + ["--no-append-eod"], tmp_path)
    assert "already exists" in msg and "--overwrite" in msg
    assert open(prefix + "_text_document.bin", "rb").read() == original
    preprocess_data.main(argv + ["--no-append-eod", "--overwrite"])
    assert len(open(prefix + "_text_document.bin", "rb").read()) < len(original)


def test_modules_run_with_python_m():
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-m", "data_tools.preprocess_data", "--help"],
                            capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--tokenizer-model" in result.stdout and "--no-append-eod" in result.stdout
