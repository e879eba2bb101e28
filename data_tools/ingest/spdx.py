"""SPDX license expressions ("MIT OR Apache-2.0", "(A AND B) OR C", "Apache-2.0 WITH LLVM-exception")
and the keep/drop decision over all licenses detected for a file.

An expression becomes its alternatives: a list of license-id sets, any one of which the
user may choose to comply with ("A OR B" -> [{A}, {B}]; "A AND B" -> [{A, B}]). An exception
(``WITH``) only adds permissions, so ``X WITH e`` counts as ``X``.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

from data_tools._common import DataToolError

_TOKEN = re.compile(r"\(|\)|[A-Za-z0-9.+:-]+")
# Deprecated SPDX spellings still common in headers.
_ALIASES = {"gpl-2.0+": "GPL-2.0-or-later", "gpl-3.0+": "GPL-3.0-or-later", "lgpl-2.1+": "LGPL-2.1-or-later"}


def canonical_id(spdx: str, known: Iterable[str]) -> str:
    """``known``'s spelling of ``spdx`` (ids compare case-insensitively), else ``spdx`` unchanged."""
    lowered = spdx.strip().lower()
    if lowered in _ALIASES:
        return _ALIASES[lowered]
    for candidate in known:
        if candidate.lower() == lowered:
            return candidate
    return spdx.strip()


class _Parser:
    def __init__(self, expression: str, known: Sequence[str]):
        self.tokens, self.pos, self.expression, self.known = _TOKEN.findall(expression), 0, expression, known

    def error(self, what: str) -> DataToolError:
        return DataToolError(f"SPDX expression {self.expression!r}: {what}")

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise self.error("ends early; expected a license id")
        self.pos += 1
        return token

    def expression_(self) -> list[frozenset[str]]:
        alternatives = self.term()
        while (self.peek() or "").upper() == "OR":
            self.take()
            alternatives = alternatives + self.term()
        return alternatives

    def term(self) -> list[frozenset[str]]:
        alternatives = self.factor()
        while (self.peek() or "").upper() == "AND":
            self.take()
            right = self.factor()
            alternatives = [a | b for a in alternatives for b in right]
        return alternatives

    def factor(self) -> list[frozenset[str]]:
        token = self.take()
        if token == "(":
            inner = self.expression_()
            if self.take() != ")":
                raise self.error("unbalanced parentheses")
            return inner
        if token.upper() in ("AND", "OR", "WITH") or token == ")":
            raise self.error(f"expected a license id, got {token!r}")
        if (self.peek() or "").upper() == "WITH":
            self.take()
            self.take()  # the exception id
        return [frozenset({canonical_id(token, self.known)})]


def parse_expression(expression: str, known: Sequence[str] = ()) -> list[frozenset[str]]:
    """The alternatives of an SPDX expression (see module doc); raises DataToolError if malformed."""
    parser = _Parser(expression, known)
    alternatives = parser.expression_()
    if parser.peek() is not None:
        raise parser.error(f"unexpected {parser.peek()!r} after a complete expression")
    return alternatives


def choose_permissive(detections: Sequence[list[frozenset[str]]], permissive: Sequence[str]) -> tuple[list[str], list[str]]:
    """Pick, for every detection, an all-permissive alternative.

    Returns ``(licenses used, rejected ids)``: the file is usable only when ``rejected`` is
    empty. Every detection must be satisfiable because each is a separate grant covering the
    file (a directory LICENSE and a header, say), and the file is bound by all of them.
    """
    allowed = {p.lower() for p in permissive}
    used: set[str] = set()
    rejected: set[str] = set()
    for alternatives in detections:
        ok = [alt for alt in alternatives if all(spdx.lower() in allowed for spdx in alt)]
        if ok:
            used |= min(ok, key=lambda alt: (len(alt), sorted(alt)))
        else:
            rejected |= {spdx for alt in alternatives for spdx in alt if spdx.lower() not in allowed}
    return sorted(used), sorted(rejected)
