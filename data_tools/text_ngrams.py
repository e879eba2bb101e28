"""Word n-grams of code as dedup and decontamination see it, built on datatrove's text utilities.

Text is simplified with datatrove's ``simplify_text`` (lower case, punctuation -> space,
digits -> 0, whitespace collapsed), so ``has_close_elements(numbers: List[float])`` reads
``has close elements numbers list float``. Words are then split on spaces: datatrove's
language word tokenizers (spaCy, NLTK, ...) are made for prose, need extra packages and
would only re-split what ``simplify_text`` has already separated.
"""
from __future__ import annotations

from datatrove.utils.hashing import HashConfig, create_hash_func
from datatrove.utils.text import TextNormConfig, ngrams, simplify_text
from datatrove.utils.word_tokenizers import WordTokenizer

NORM_CONFIG = TextNormConfig()
# sha1, not datatrove's default xxhash: datatrove passes str to xxhash.xxh64_intdigest, which
# xxhash >= 4 refuses ("Strings must be encoded before hashing").
HASH_CONFIG = HashConfig(precision=64, hash_fc="sha1")
_hash = create_hash_func(HASH_CONFIG)


class CodeWordTokenizer(WordTokenizer):
    """datatrove's word-tokenizer interface over simplified text: words are space-separated."""

    def __init__(self):
        super().__init__("code")

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [line for line in text.splitlines() if line.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans, start = [], 0
        for line in text.splitlines(keepends=True):
            spans.append((start, start + len(line.rstrip("\n"))))
            start += len(line)
        return spans


def simplified_words(text: str) -> list[str]:
    return simplify_text(text, NORM_CONFIG).split()


def simplified(text: str) -> str:
    return simplify_text(text, NORM_CONFIG)


def ngram_strings(words: list[str], n: int) -> list[str]:
    return [" ".join(gram) for gram in ngrams(words, n)]


def hash_ngram(ngram: str) -> int:
    return _hash(ngram)


def shingle_set(text: str, n: int) -> set[int]:
    """Hashes of the word n-grams of ``text`` (what MinHash approximates the Jaccard of)."""
    return {_hash(gram) for gram in ngram_strings(simplified_words(text), n)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0
