"""Export our sentencepiece BPE tokenizer as a Hugging Face `tokenizer.json` that encodes exactly
like `megatron_code.tokenizer.SentencePieceTokenizer.encode`.

Our tokenizer (data_tools/train_tokenizer.py): BPE, identity normalization, no dummy prefix, no
whitespace collapsing, byte fallback, "\\n" as a user-defined piece, whitespace-only pieces. The
`tokenizers` pipeline that reproduces sentencepiece's encoder:

- normalizer: " " -> "\u2581" (sentencepiece's escaping; nothing else, no prefix space);
- "\\n" (and any other user-defined piece) as a non-special added token: matched on the raw text
  and emitted whole, as sentencepiece does;
- no pre-tokenizer: sentencepiece splits words before a whitespace run, and no learned piece
  spans a non-space followed by "\u2581", so merging over the whole chunk gives the same pieces;
- BPE with byte fallback, merges ranked by the score of the piece they make (sentencepiece
  merges the highest-scoring adjacent pair first; scores are unique), `ignore_merges` off;
- control symbols (<s>, </s>, <pad>, <|fim_*|>, <|im_*|>) as special added tokens, and
  `split_special_tokens: true` in tokenizer_config.json, so literal "<s>" or "</s>" in code (HTML!)
  is encoded as text, exactly as our data pipeline does; special ids are inserted by id.

Known, unfixable difference: a literal U+2581 ("\u2581") in the text. Our encode() emits its three
byte-fallback ids (so decode gives it back); sentencepiece itself, and any tokenizer.json, cannot
tell it from an escaped space and emits the space piece. HF's decode of our ids is still exact.

`tokenizer_class` is PreTrainedTokenizerFast (a name transformers 4.x and 5.x both know): loading uses
tokenizer.json as written; model-specific classes (LlamaTokenizer) would rebuild their own
pre-tokenizer (prefix space, Metaspace splitting) and no longer match.
"""
from __future__ import annotations

import json
import os
import shutil

from checkpoints_convert.errors import ConvertError

NORMAL, CONTROL, USER_DEFINED = 1, 3, 4  # sentencepiece piece types
BPE_MODEL = 2

# Code with tabs, newlines, unicode and long whitespace runs; checked on every export.
SELF_CHECK_SAMPLES = [
    "def f(x):\n\tif x > 10:\n\t\treturn x ** 2  # square\n\treturn None\n",
    "class A:\n    def __init__(self):\n        self.v = [1, 2, 3]\n\n\n" + " " * 40 + "pass\n",
    "fn main() {\n    println!(\"héllo wörld ✓ 日本語 😀\");\n}\n\t\t\t\t// tabs\r\n",
    "<div><s>old</s> <b>new</b></div> <|im_start|> <pad> <unk>\n",
    "x = 12345678901234567890;   \t  \t\n\u00a0\u200b\u3000 ﬁ ＡＢＣ e\u0301\n" + "\n" * 5 + "\t" * 12 + "end",
]


def _load_proto(sp_model_path: str):
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as exc:  # needs protobuf
        raise ConvertError(f"reading the sentencepiece model needs protobuf: pip install protobuf ({exc}).") from None
    proto = pb.ModelProto()
    with open(sp_model_path, "rb") as fh:
        proto.ParseFromString(fh.read())
    return proto


def _check_supported(proto, path: str) -> None:
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    problems = []
    if spec.model_type != BPE_MODEL:
        problems.append(f"model_type={spec.model_type} (only BPE=2)")
    if norm.add_dummy_prefix:
        problems.append("add_dummy_prefix=true")
    if norm.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces=true")
    if norm.precompiled_charsmap:
        problems.append(f"normalization {norm.name!r} (only identity)")
    if not norm.escape_whitespaces or spec.treat_whitespace_as_suffix:
        problems.append("non-default whitespace escaping")
    if problems:
        raise ConvertError(
            f"tokenizer {path}: {', '.join(problems)}. The exporter reproduces tokenizers made by "
            "mcode-train-tokenizer (BPE, identity normalization, no dummy prefix) exactly and refuses others."
        )


def build_tokenizer(sp_model_path: str):
    """A `tokenizers.Tokenizer` that encodes like our SentencePieceTokenizer (see module doc)."""
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, normalizers
        from tokenizers.models import BPE
    except ImportError:
        raise ConvertError("exporting the tokenizer needs the `tokenizers` package: pip install 'transformers>=4.46'.") from None
    proto = _load_proto(sp_model_path)
    _check_supported(proto, sp_model_path)
    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == NORMAL}
    ranked = []
    for piece, (score, i) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, left, right))
    merges = [(left, right) for _, _, left, right in sorted(ranked)]
    unk = pieces[proto.trainer_spec.unk_id].piece
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                              byte_fallback=proto.trainer_spec.byte_fallback, ignore_merges=False))
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    added = [AddedToken(p.piece, special=p.type == CONTROL, normalized=False)
             for p in pieces if p.type in (CONTROL, USER_DEFINED)]
    tokenizer.add_tokens(added)
    ids = [tokenizer.token_to_id(t.content) for t in added]
    if ids != [vocab[t.content] for t in added]:
        raise AssertionError("added tokens got ids other than their sentencepiece ids")
    return tokenizer


def special_ids(sp_model_path: str) -> dict:
    """bos/eos/pad ids for config.json and generation_config.json."""
    spec = _load_proto(sp_model_path).trainer_spec
    out = {"bos_token_id": spec.bos_id if spec.bos_id >= 0 else None,
           "eos_token_id": spec.eos_id if spec.eos_id >= 0 else None}
    if spec.pad_id >= 0:
        out["pad_token_id"] = spec.pad_id
    return out


def write_tokenizer(sp_model_path: str, out_dir: str, model_max_length: int) -> None:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json, and the sentencepiece
    model itself (tokenizer.model) for sentencepiece users; then check ids equal ours."""
    proto = _load_proto(sp_model_path)
    tokenizer = build_tokenizer(sp_model_path)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    shutil.copyfile(sp_model_path, os.path.join(out_dir, "tokenizer.model"))
    spec = proto.trainer_spec
    specials = {}
    for key, idx in (("unk_token", spec.unk_id), ("bos_token", spec.bos_id), ("eos_token", spec.eos_id),
                     ("pad_token", spec.pad_id)):
        if idx >= 0:
            specials[key] = proto.pieces[idx].piece
    extra = [p.piece for p in proto.pieces
             if p.type == CONTROL and p.piece not in specials.values()]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "additional_special_tokens": extra,
        "split_special_tokens": True,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as fh:
        json.dump(config, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as fh:
        json.dump({**specials, "additional_special_tokens": extra}, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
    check_same_ids(sp_model_path, os.path.join(out_dir, "tokenizer.json"))


def check_same_ids(sp_model_path: str, tokenizer_json: str, samples: list[str] | None = None) -> None:
    """Every vocabulary piece's text and the code samples encode to the same ids through
    tokenizer.json as through our encoder; otherwise the export is refused."""
    from tokenizers import Tokenizer

    from megatron_code.tokenizer import SentencePieceTokenizer

    ours = SentencePieceTokenizer(sp_model_path)
    hf = Tokenizer.from_file(tokenizer_json)
    hf.encode_special_tokens = True
    texts = list(samples or SELF_CHECK_SAMPLES)
    sp = ours.sp
    texts += [sp.id_to_piece(i).replace("\u2581", " ") for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))]
    got = hf.encode_batch(texts, add_special_tokens=False)
    for text, enc in zip(texts, got):
        expected = ours.encode(text)
        if enc.ids != expected:
            raise ConvertError(
                f"tokenizer {sp_model_path}: the exported tokenizer.json encodes {text[:60]!r} as "
                f"{enc.ids[:12]} but ours gives {expected[:12]}; refusing to write a tokenizer that "
                "differs from the one the model was trained with."
            )
