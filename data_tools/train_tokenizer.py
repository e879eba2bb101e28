r"""Train a sentencepiece BPE tokenizer for source code from jsonl files.

Layout of the vocabulary (``megatron_code.tokenizer.SentencePieceTokenizer`` reads it back):

- 0 ``<unk>``: never produced, byte fallback covers every input;
- 1 ``<s>``: BOS (the data pipeline does not add it);
- 2 ``</s>``: EOS = end-of-document (EOD), appended after every document;
- 3 ``<pad>``: padding;
- 4-8 ``<|fim_prefix|> <|fim_middle|> <|fim_suffix|> <|im_start|> <|im_end|>``: control symbols
  reserved for fill-in-the-middle and chat. ``encode`` never produces control pieces (a literal
  "<|im_start|>" in data stays ordinary text, so data cannot inject them): insert their ids;
- 9 ``"\n"``: user-defined, so every newline is exactly one token;
- 10-265 ``<0x00>``..``<0xFF>``: byte-fallback pieces; then the learned BPE merges, then the
  single characters (printable ASCII, tab, and whatever else ``character_coverage`` keeps).

Choices that make ``decode(encode(code)) == code`` exact for any text: identity normalization
(no NFKC), no whitespace collapsing, no dummy prefix space, byte fallback for characters
outside the vocabulary (CJK, emoji). Digits are split one per token (arithmetic
generalizes better). Runs of spaces are learned as whitespace-only pieces (on the stdlib the 2-,
4- and 8-space pieces are the first three merges, 12 and 16 spaces come within 25); "\t" and printable ASCII are
``required_chars`` so they are always real pieces, and tab runs ("\t\t\t") can be learned.
Making "    " or "\t" user-defined was measured and rejected: sentencepiece escapes spaces
to "▁" before matching user symbols, so a "    " symbol is never used, and a user-defined
"\t" blocks "\t\t" merges that tab-indented languages need.

Known sentencepiece limitation: the character U+2581 ("▁") is sentencepiece's internal space
marker, so a literal "▁" in text decodes as " ". The BPE trainer requires that escaping
(``escape_whitespaces=False`` is rejected). An encoder that emits the three byte-fallback ids
of U+2581 in its place round-trips exactly; see docs/data_tools.md.

Documents are fed whole through ``sentence_iterator`` (a file input would split them at
newlines and lose them); documents longer than ``--max-sentence-length`` bytes are split at
line boundaries.

Example::

    mcode-train-tokenizer --input data/seed.jsonl --vocab-size 8192 --output-prefix data/tokenizer
"""
from __future__ import annotations

import argparse
import os
import re
import string
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import sentencepiece as spm
from tqdm import tqdm

from data_tools._common import (DataToolError, check_jsonl_head, check_outputs_free, count_lines,
                                iter_jsonl_texts, output_directory, run_cli)

PROG = "mcode-train-tokenizer"

SPECIAL_PIECES = {"unk": (0, "<unk>"), "bos": (1, "<s>"), "eos": (2, "</s>"), "pad": (3, "<pad>")}
CONTROL_SYMBOLS = ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|im_start|>", "<|im_end|>")
USER_DEFINED_SYMBOLS = ("\n",)
# Printable ASCII without whitespace (" " becomes "▁", "\n" is user-defined) plus tab.
REQUIRED_CHARS = "\t" + "".join(c for c in string.printable if not c.isspace())
# Smallest vocabulary sentencepiece accepts: special + control + user pieces, 256 byte pieces,
# required characters, and room for at least a few merges.
MIN_VOCAB_SIZE = (len(SPECIAL_PIECES) + len(CONTROL_SYMBOLS) + len(USER_DEFINED_SYMBOLS) + 256
                  + len(REQUIRED_CHARS) + 16)
# Every 20th document is held out of training to measure chars/token, until HELDOUT_MAX_CHARS
# are held out: 5% gives small corpora a usable sample; the cap makes it negligible on big ones
# and keeps the evaluation to about a second.
HELDOUT_EVERY = 20
HELDOUT_MAX_CHARS = 2_000_000
TRAIN_SAMPLE_MAX_CHARS = 200_000  # fallback evaluation sample when too few docs to hold out


@dataclass
class TokenizerSummary:
    """What :func:`train_tokenizer` produced and measured."""

    model_path: str
    vocab_path: str
    vocab_size: int = 0
    special_ids: dict = field(default_factory=dict)
    documents: int = 0
    chunks: int = 0
    train_bytes: int = 0
    eval_documents: int = 0
    eval_is_heldout: bool = True
    chars_per_token: float = 0.0
    roundtrip_failures: int = 0
    elapsed_s: float = 0.0

    def lines(self) -> list[str]:
        ids = " ".join(f"{piece!r}={i}" if piece.isspace() else f"{piece}={i}"
                       for piece, i in self.special_ids.items())
        sample = ("held-out" if self.eval_is_heldout
                  else f"training (fewer than {HELDOUT_EVERY} documents, none held out)")
        return [
            f"wrote {self.model_path} and {self.vocab_path} in {self.elapsed_s:.1f} s",
            f"vocab {self.vocab_size} (BPE, byte fallback); special ids: {ids}; EOD = </s>",
            f"trained on {self.documents} documents ({self.chunks} chunks, {self.train_bytes:,} bytes)",
            f"{sample} sample of {self.eval_documents} documents: {self.chars_per_token:.2f} chars/token, "
            f"exact round trip {self.eval_documents - self.roundtrip_failures}/{self.eval_documents}",
        ]


def split_document(text: str, max_bytes: int) -> Iterator[str]:
    """Yield pieces of ``text`` of at most ``max_bytes`` UTF-8 bytes, cut at line ends.

    sentencepiece silently drops sentences longer than ``max_sentence_length``, which would
    bias the vocabulary against long files. Concatenating the pieces gives back ``text``.
    A single line longer than the limit is cut at a character boundary.
    """
    if len(text) * 4 <= max_bytes or len(text.encode("utf-8")) <= max_bytes:
        yield text
        return
    chunk, size = [], 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if size + n > max_bytes and chunk:
            yield "".join(chunk)
            chunk, size = [], 0
        if n > max_bytes:
            yield from _split_long_line(line, max_bytes)
            continue
        chunk.append(line)
        size += n
    if chunk:
        yield "".join(chunk)


def _split_long_line(line: str, max_bytes: int) -> Iterator[str]:
    """Cut one over-long line into pieces of at most ``max_bytes`` bytes, never inside a character."""
    data = line.encode("utf-8")
    while data:
        cut = min(max_bytes, len(data))
        while cut < len(data) and (data[cut] & 0xC0) == 0x80:  # back off to a UTF-8 char start
            cut -= 1
        yield data[:cut].decode("utf-8")
        data = data[cut:]


class CorpusFeed:
    """The ``sentence_iterator`` handed to sentencepiece: jsonl documents -> training chunks.

    Every :data:`HELDOUT_EVERY`-th non-empty document goes to ``heldout`` instead of training.
    An input error raised inside the iterator reaches Python only as sentencepiece's generic
    RuntimeError, so the original error is kept in ``error`` and re-raised by the caller.
    """

    def __init__(self, inputs: Sequence[str], json_key: str, max_sentence_length: int, progress: bool | None):
        self.inputs, self.json_key, self.max_sentence_length = inputs, json_key, max_sentence_length
        self.progress = progress
        self.heldout: list[str] = []
        self.train_sample: list[str] = []
        self.documents = self.chunks = self.train_bytes = 0
        self._heldout_chars = self._sample_chars = 0  # running totals: no re-summing per document
        self.error: DataToolError | None = None

    def __iter__(self) -> Iterator[str]:
        total = sum(count_lines(p) for p in self.inputs)
        disable = None if self.progress is None else not self.progress
        with tqdm(total=total, desc="reading documents", unit="doc", disable=disable) as bar:
            try:
                for path in self.inputs:
                    for _, text in iter_jsonl_texts(path, self.json_key):
                        bar.update(1)
                        yield from self._route(text)
            except DataToolError as exc:
                self.error = exc
                raise

    def _route(self, text: str) -> Iterator[str]:
        if not text:
            return
        index = self.documents + len(self.heldout)
        if index % HELDOUT_EVERY == HELDOUT_EVERY - 1 and self._heldout_chars < HELDOUT_MAX_CHARS:
            self.heldout.append(text)
            self._heldout_chars += len(text)
            return
        self.documents += 1
        self.train_bytes += len(text.encode("utf-8"))
        if self._sample_chars < TRAIN_SAMPLE_MAX_CHARS:
            self.train_sample.append(text)
            self._sample_chars += len(text)
        for chunk in split_document(text, self.max_sentence_length):
            self.chunks += 1
            yield chunk


def trainer_options(vocab_size: int, max_sentence_length: int, input_sentence_size: int,
                    num_threads: int, verbose: bool) -> dict:
    """The sentencepiece trainer settings; see the module docstring for why each is chosen."""
    ids = {f"{name}_id": i for name, (i, _) in SPECIAL_PIECES.items()}
    pieces = {f"{name}_piece": p for name, (_, p) in SPECIAL_PIECES.items()}
    return dict(
        model_type="bpe", vocab_size=vocab_size, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, control_symbols=list(CONTROL_SYMBOLS),
        user_defined_symbols=list(USER_DEFINED_SYMBOLS), required_chars=REQUIRED_CHARS,
        max_sentence_length=max_sentence_length, input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True, num_threads=num_threads,
        # The "\n" piece makes sentencepiece warn that the human-readable .vocab file has a raw
        # newline in it; harmless (the .model is protobuf), so only show logs with --verbose.
        minloglevel=0 if verbose else 2, **ids, **pieces,
    )


def _explain_training_error(exc: RuntimeError, vocab_size: int, feed: CorpusFeed) -> DataToolError:
    """Turn sentencepiece's terse C++ check failures into actionable messages."""
    msg = str(exc)
    too_high = re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", msg)
    if too_high:
        return DataToolError(
            f"--vocab-size {vocab_size} is too large for this data: {feed.documents} documents "
            f"({feed.train_bytes:,} bytes) only support up to {too_high.group(2)} pieces; "
            f"lower --vocab-size to at most {too_high.group(2)} or give more data with --input")
    if "sentences_.empty()" in msg:
        return DataToolError(f"no non-empty documents to train on in {list(feed.inputs)} "
                             f"(key {feed.json_key!r}); check --input and --json-key")
    if "smaller than required_chars" in msg:
        return DataToolError(f"--vocab-size {vocab_size} cannot hold this data's alphabet plus the "
                             f"256 byte pieces; raise --vocab-size ({msg.split('] ')[-1]})")
    return DataToolError(f"sentencepiece training failed: {msg}")


def evaluate_tokenizer(model_path: str, documents: Sequence[str]) -> tuple[float, int]:
    """Return (characters per token, number of documents that do not round-trip exactly)."""
    from megatron_code.tokenizer import SentencePieceTokenizer  # the wrapper training will use

    tokenizer = SentencePieceTokenizer(model_path)
    chars = tokens = failures = 0
    for text in documents:
        ids = tokenizer.encode(text)
        chars, tokens = chars + len(text), tokens + len(ids)
        failures += tokenizer.decode(ids) != text
    return (chars / tokens if tokens else 0.0), failures


def _validate(inputs: Sequence[str], json_key: str, vocab_size: int, max_sentence_length: int,
              input_sentence_size: int, num_threads: int) -> None:
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataToolError(f"--vocab-size {vocab_size} is too small: the special, control, byte-fallback and "
                            f"required ASCII pieces alone take {MIN_VOCAB_SIZE - 16}; use at least {MIN_VOCAB_SIZE}")
    if max_sentence_length < 256:
        raise DataToolError(f"--max-sentence-length {max_sentence_length} is too small; use at least 256 (bytes)")
    if input_sentence_size < 0:
        raise DataToolError(f"--input-sentence-size must be >= 0 (0: every sentence), got {input_sentence_size}")
    if num_threads < 1:
        raise DataToolError(f"--num-threads must be >= 1, got {num_threads}")
    for path in inputs:
        check_jsonl_head(path, (json_key,), "--json-key")


def train_tokenizer(inputs: Sequence[str], output_prefix: str, *, json_key: str = "text",
                    vocab_size: int = 8192, input_sentence_size: int = 1_000_000,
                    max_sentence_length: int = 16384, num_threads: int | None = None, seed: int = 0,
                    overwrite: bool = False, verbose: bool = False,
                    progress: bool | None = None) -> TokenizerSummary:
    """Train ``{output_prefix}.model`` / ``.vocab`` from jsonl ``inputs``; return a summary.

    Inputs are validated (existence, first lines, the key) before training. sentencepiece
    writes into a temporary directory beside the outputs; files are moved into place only
    after training and evaluation succeed. Raises :class:`DataToolError` on bad input.
    """
    start = time.perf_counter()
    num_threads = (os.cpu_count() or 1) if num_threads is None else num_threads  # an explicit 0 is refused
    _validate(inputs, json_key, vocab_size, max_sentence_length, input_sentence_size, num_threads)
    summary = TokenizerSummary(model_path=output_prefix + ".model", vocab_path=output_prefix + ".vocab")
    check_outputs_free([summary.model_path, summary.vocab_path], overwrite, "--output-prefix")
    feed = CorpusFeed(inputs, json_key, max_sentence_length, progress)
    with output_directory(os.path.dirname(os.path.abspath(output_prefix))) as out_dir, \
            tempfile.TemporaryDirectory(prefix=f".{os.path.basename(output_prefix)}.tmp-", dir=out_dir) as tmp:
        tmp_prefix = os.path.join(tmp, "tokenizer")
        spm.set_random_generator_seed(seed)  # fixes sentence sampling/shuffling
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(feed), model_prefix=tmp_prefix,
                **trainer_options(vocab_size, max_sentence_length, input_sentence_size, num_threads, verbose))
        except RuntimeError as exc:
            raise (feed.error or _explain_training_error(exc, vocab_size, feed)) from None
        _record_model_prefix(tmp_prefix + ".model", os.path.basename(output_prefix))
        _fill_summary(summary, tmp_prefix + ".model", feed)
        os.replace(tmp_prefix + ".model", summary.model_path)
        os.replace(tmp_prefix + ".vocab", summary.vocab_path)
    summary.elapsed_s = time.perf_counter() - start
    return summary


def _record_model_prefix(model_path: str, name: str) -> None:
    """Replace the temporary training path that sentencepiece stores in the model with ``name``.

    Without this every .model embeds a random temp-dir path, so identical runs give different
    bytes. Needs protobuf (installed with tensorboard); without it the model is left as is.
    """
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        return
    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    proto.trainer_spec.model_prefix = name
    with open(model_path, "wb") as f:
        f.write(proto.SerializeToString())


def _fill_summary(summary: TokenizerSummary, model_path: str, feed: CorpusFeed) -> None:
    """Record vocabulary facts and the held-out compression/round-trip measurement."""
    sp = spm.SentencePieceProcessor(model_file=model_path)
    summary.vocab_size = sp.get_piece_size()
    names = [p for _, p in SPECIAL_PIECES.values()] + list(CONTROL_SYMBOLS) + list(USER_DEFINED_SYMBOLS)
    summary.special_ids = {p: sp.piece_to_id(p) for p in names}
    summary.documents, summary.chunks, summary.train_bytes = feed.documents, feed.chunks, feed.train_bytes
    sample = feed.heldout or feed.train_sample
    summary.eval_is_heldout = bool(feed.heldout)
    summary.eval_documents = len(sample)
    summary.chars_per_token, summary.roundtrip_failures = evaluate_tokenizer(model_path, sample)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="jsonl file(s), one document per line")
    parser.add_argument("--json-key", default="text", help="field of each JSON object that holds the text")
    parser.add_argument("--vocab-size", type=int, default=8192, help="number of pieces, specials included")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--input-sentence-size", type=int, default=1_000_000,
                        help="sample at most this many documents/chunks (bounds memory); 0 = use all")
    parser.add_argument("--max-sentence-length", type=int, default=16384,
                        help="documents longer than this many bytes are split at line boundaries")
    parser.add_argument("--num-threads", type=int, default=None, help="trainer threads (default: all CPUs)")
    parser.add_argument("--seed", type=int, default=0, help="seed for sentencepiece's sampling")
    parser.add_argument("--overwrite", action="store_true", help="replace existing PREFIX.model/.vocab")
    parser.add_argument("--verbose", action="store_true", help="show sentencepiece's own training log")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``mcode-train-tokenizer``."""
    args = build_parser().parse_args(argv)

    def run() -> None:
        summary = train_tokenizer(
            args.input, args.output_prefix, json_key=args.json_key, vocab_size=args.vocab_size,
            input_sentence_size=args.input_sentence_size, max_sentence_length=args.max_sentence_length,
            num_threads=args.num_threads, seed=args.seed, overwrite=args.overwrite, verbose=args.verbose)
        print("\n".join(summary.lines()))
        if summary.roundtrip_failures:
            print(f"WARNING: {summary.roundtrip_failures} sample documents did not round-trip exactly; "
                  "this tokenizer would corrupt code. Please report it with the input.")

    run_cli(PROG, run)


if __name__ == "__main__":
    main()
