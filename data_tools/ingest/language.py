"""Programming language of a source file: by extension first, then by content.

Content decides where the extension cannot: files without one (scripts: the shebang line),
``.h`` headers (C or C++), and jsonl documents that carry no path. Names follow the sample
schema ("python", "c", "cpp", "java", "javascript", "go", "rust", "bash"); a few more are
recognized so that they can be counted and dropped by name rather than as "unknown".
"""
from __future__ import annotations

import os
import re

EXTENSIONS = {
    ".py": "python", ".pyw": "python", ".pyi": "python",
    ".c": "c",
    ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp", ".c++": "cpp", ".hpp": "cpp", ".hh": "cpp", ".hxx": "cpp",
    ".java": "java",
    ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript", ".jsx": "javascript",
    ".go": "go",
    ".rs": "rust",
    ".sh": "bash", ".bash": "bash",
    ".ts": "typescript", ".tsx": "typescript", ".rb": "ruby", ".php": "php", ".kt": "kotlin",
    ".swift": "swift", ".scala": "scala", ".cs": "csharp", ".lua": "lua", ".pl": "perl",
}
# Interpreter names in a shebang ("#!/usr/bin/env python3", "#!/bin/bash").
SHEBANG_INTERPRETERS = {"python": "python", "bash": "bash", "sh": "bash", "zsh": "bash", "dash": "bash",
                        "node": "javascript", "ruby": "ruby", "perl": "perl", "php": "php"}
_SHEBANG = re.compile(r"^#!\s*(?:\S*/)?(?:env\s+(?:-\S+\s+)*)?([A-Za-z]+)")
_CPP_IN_HEADER = re.compile(r"^\s*(?:class\s+\w+\s*[:{]|namespace\s+\w*\s*\{|template\s*<|#include\s*<(?:iostream|vector|string|memory|map)>)"
                            r"|std::", re.M)
# Signals for text without a usable name: (language, pattern); the language with most hits wins.
_CONTENT_SIGNALS = (
    ("python", re.compile(r"^\s*(?:def \w+\(.*\)\s*(?:->.*)?:|from [\w.]+ import |import \w+$|class \w+(?:\(.*\))?:)", re.M)),
    ("cpp", re.compile(r"^\s*#include\s*<(?:iostream|vector|string|algorithm|map)>|std::|^\s*template\s*<", re.M)),
    ("c", re.compile(r"^\s*#include\s*<(?:stdio|stdlib|string|stdint)\.h>|\bprintf\s*\(|\bmalloc\s*\(", re.M)),
    ("java", re.compile(r"^\s*(?:public\s+)?(?:final\s+)?class\s+\w+|System\.out\.print|^\s*import java\.", re.M)),
    ("javascript", re.compile(r"\bconsole\.log\(|\brequire\(['\"]|^\s*(?:const|let)\s+\w+\s*=|=>\s*\{|\bfunction\s+\w+\s*\(", re.M)),
    ("go", re.compile(r"^package \w+$|^func (?:\(\w+ \*?\w+\) )?\w+\(|:= ", re.M)),
    ("rust", re.compile(r"^\s*(?:pub\s+)?fn \w+|\blet mut\b|^use \w+(?:::\w+)+;|println!\(", re.M)),
    ("bash", re.compile(r"^\s*(?:echo|export|fi|done|esac)\b|\$\{\w+\}|^\s*if \[\[? ", re.M)),
)


def language_from_shebang(text: str) -> str | None:
    match = _SHEBANG.match(text)
    if not match:
        return None
    interpreter = re.sub(r"[\d.]+$", "", match.group(1))  # python3.11 -> python
    return SHEBANG_INTERPRETERS.get(interpreter)


def language_from_content(text: str, sample_chars: int = 20_000) -> str | None:
    """Best guess from the shebang, else from keyword patterns; None when nothing matches."""
    from_shebang = language_from_shebang(text)
    if from_shebang:
        return from_shebang
    sample = text[:sample_chars]
    scores = {language: len(pattern.findall(sample)) for language, pattern in _CONTENT_SIGNALS}
    best = max(scores, key=scores.get)
    return best if scores[best] > 0 else None


def detect_language(path: str | None, text: str) -> str | None:
    """The language of a file (see module doc); None when neither name nor content tells.

    ``path`` None or empty means a document without a name (e.g. a jsonl record).
    """
    extension = os.path.splitext(path or "")[1].lower()
    if extension == ".h":
        return "cpp" if _CPP_IN_HEADER.search(text[:20_000]) else "c"
    if extension in EXTENSIONS:
        return EXTENSIONS[extension]
    # A named file without a known extension (Makefile, README, LICENSE) is code only if its
    # shebang says so; keyword guessing is kept for jsonl documents that have no name at all.
    return language_from_shebang(text) if path else language_from_content(text)
