"""SPDX license detection: license files (LICENSE/COPYING/NOTICE) and file headers.

Why hand-written: the maintained detectors (scancode-toolkit, licensee) are heavy (scancode
pulls hundreds of MB of rules and native deps) or not Python. Seed code only has to be sorted
into "permissive, keep" and "anything else, drop", which distinctive phrases of each license's
text do reliably; an unrecognized license file is reported as such and the file dropped.

Texts are compared after :func:`normalize_text`: lower case, comment markers removed, every
run of non-alphanumeric characters made one space. So "Version 2.0," in a ``#`` comment and
"VERSION 2.0" in a LICENSE file both read ``version 2 0``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from data_tools._common import DataToolError
from data_tools.ingest.spdx import choose_permissive, parse_expression

UNRECOGNIZED = "LicenseRef-unrecognized"

DEFAULT_PERMISSIVE = (
    "MIT", "MIT-0", "Apache-2.0", "BSD-2-Clause", "BSD-3-Clause", "0BSD", "ISC", "Unlicense", "CC0-1.0",
    "Python-2.0", "PSF-2.0", "Zlib", "BSL-1.0",
)

# File names (case-insensitive, any extension) whose text states the license of their directory tree.
LICENSE_FILE_PATTERN = re.compile(r"^(un)?licen[cs]e([-._].*)?$|^copying([-._].*)?$|^notice([-._].*)?$", re.I)


@dataclass(frozen=True)
class LicenseRule:
    """A license is present when every phrase of any one group occurs and no ``none_of`` phrase does."""

    spdx: str
    any_of: tuple[tuple[str, ...], ...]
    none_of: tuple[str, ...] = ()


_MIT_GRANT = "permission is hereby granted free of charge to any person obtaining a copy"
_MIT_CONDITION = "the above copyright notice and this permission notice shall be included"
_BSD_REDIST = "redistribution and use in source and binary forms"
_BSD_ADVERTISING = "all advertising materials mentioning features"
_BSD_NO_ENDORSE = ("neither the name of", "may not be used to endorse or promote")
_ISC_GRANT = "permission to use copy modify and or distribute this software for any purpose with or without fee is hereby granted"
_ISC_CONDITION = "provided that the above copyright notice and this permission notice appear in all copies"
_FSF = "as published by the free software foundation"

RULES: tuple[LicenseRule, ...] = (
    LicenseRule("MIT", ((_MIT_GRANT, _MIT_CONDITION),)),
    LicenseRule("MIT-0", ((_MIT_GRANT,),), none_of=(_MIT_CONDITION,)),
    LicenseRule("Apache-2.0", (("apache license version 2 0",), ("apache org licenses license 2 0",))),
    LicenseRule("BSD-4-Clause", ((_BSD_REDIST, _BSD_ADVERTISING),)),
    LicenseRule("BSD-3-Clause", tuple((_BSD_REDIST, p) for p in _BSD_NO_ENDORSE), none_of=(_BSD_ADVERTISING,)),
    LicenseRule("BSD-2-Clause", ((_BSD_REDIST,),), none_of=(_BSD_ADVERTISING, *_BSD_NO_ENDORSE)),
    LicenseRule("ISC", ((_ISC_GRANT + " " + _ISC_CONDITION,),)),
    LicenseRule("0BSD", ((_ISC_GRANT,),), none_of=(_ISC_CONDITION,)),
    LicenseRule("HPND", (("permission to use copy modify and distribute this software and its documentation for any purpose",),)),
    LicenseRule("Unlicense", (("this is free and unencumbered software released into the public domain",),)),
    LicenseRule("CC0-1.0", (("cc0 1 0 universal",),
                            ("to the extent possible under law", "waived all copyright and related or neighboring rights"))),
    LicenseRule("Zlib", (("this software is provided as is without any express or implied warranty",
                          "altered source versions must be plainly marked as such"),)),
    LicenseRule("BSL-1.0", (("boost software license version 1 0",), ("boost software license 1 0",))),
    LicenseRule("PSF-2.0", (("python software foundation license version 2",),)),
    LicenseRule("Python-2.0", (("beopen python open source license agreement",), ("cnri license agreement for python",))),
    LicenseRule("GPL-2.0", (("gnu general public license version 2 june 1991",),
                            (f"gnu general public license {_FSF} either version 2 ",),
                            (f"gnu general public license {_FSF} version 2 ",))),
    LicenseRule("GPL-3.0", (("gnu general public license version 3 29 june 2007",),
                            (f"gnu general public license {_FSF} either version 3 ",),
                            (f"gnu general public license {_FSF} version 3 ",))),
    LicenseRule("LicenseRef-GPL-unversioned", ((f"gnu general public license {_FSF}",),)),
    LicenseRule("LGPL-2.0", (("gnu library general public license",),)),
    LicenseRule("LGPL-2.1", (("gnu lesser general public license version 2 1",),
                             (f"gnu lesser general public license {_FSF} either version 2 1",))),
    LicenseRule("LGPL-3.0", (("gnu lesser general public license version 3",),
                             (f"gnu lesser general public license {_FSF} either version 3",))),
    LicenseRule("LicenseRef-LGPL-unversioned", (("gnu lesser general public license",),)),
    LicenseRule("AGPL-3.0", (("gnu affero general public license",),)),
    LicenseRule("MPL-2.0", (("mozilla public license version 2 0",), ("mozilla public license v 2 0",))),
    LicenseRule("EPL-1.0", (("eclipse public license v 1 0",), ("eclipse public license version 1 0",))),
    LicenseRule("EPL-2.0", (("eclipse public license v 2 0",), ("eclipse public license version 2 0",))),
)

# A composite license text mentions the licenses it is made of; report only the composite.
# Python's LICENSE (SPDX Python-2.0) contains the PSF, CNRI and CWI (HPND-style) agreements.
SUBSUMES = {
    "Python-2.0": {"PSF-2.0", "HPND"},
    "GPL-2.0": {"LicenseRef-GPL-unversioned"},
    "GPL-3.0": {"LicenseRef-GPL-unversioned"},
    "LGPL-2.1": {"LicenseRef-LGPL-unversioned"},
    "LGPL-3.0": {"LicenseRef-LGPL-unversioned", "GPL-3.0", "LicenseRef-GPL-unversioned"},
    "AGPL-3.0": {"GPL-3.0", "LicenseRef-GPL-unversioned"},
}

_COMMENT_PREFIX = re.compile(r"^[ \t]*(?:#+|//+|/\*+|\*+/?|--|;+|%+|!|rem\b)?", re.I | re.M)
_NON_ALNUM = re.compile(r"[^0-9a-z]+")
_SPDX_LINE = re.compile(r"SPDX-License-Identifier:\s*(.+?)\s*(?:\*/|-->|\"\"\"|'''|$)", re.M)


def normalize_text(text: str) -> str:
    """Lower-case words separated by single spaces, comment markers removed (see module doc)."""
    stripped = _COMMENT_PREFIX.sub("", text)
    return " " + _NON_ALNUM.sub(" ", stripped.lower()).strip() + " "


def detect_in_text(text: str) -> set[str]:
    """SPDX ids whose distinctive phrases occur in ``text`` (a license file or a file header)."""
    norm = normalize_text(text)
    found = set()
    for rule in RULES:
        if any(all(phrase in norm for phrase in group) for group in rule.any_of) and \
                not any(phrase in norm for phrase in rule.none_of):
            found.add(rule.spdx)
    for composite, parts in SUBSUMES.items():
        if composite in found:
            found -= parts
    return found


def spdx_expressions(header: str) -> list[str]:
    """The expressions of every ``SPDX-License-Identifier:`` line in a file header."""
    return [m.group(1).strip() for m in _SPDX_LINE.finditer(header)]


@dataclass
class LicenseDecision:
    """What was detected for one file and whether it may enter the corpus."""

    licenses: list[str] = field(default_factory=list)  # the permissive ids the file is used under
    rejected: list[str] = field(default_factory=list)  # ids that made it unusable
    reason: str = ""  # "" when usable, else "license_none" or "license_not_permissive"

    @property
    def keep(self) -> bool:
        return not self.reason


@dataclass
class LicenseConfig:
    """Which licenses let a file into the corpus, and where they are looked for."""

    permissive: list[str] = field(default_factory=lambda: list(DEFAULT_PERMISSIVE))
    """SPDX ids a file may be used under; a file is kept only if every license detected for it
    (directory LICENSE/COPYING/NOTICE files, its own header, the source's declared license) is
    in this list (for "A OR B" expressions, one side suffices)."""
    header_chars: int = 4000
    """How many leading characters of each file are searched for SPDX-License-Identifier lines
    and license header text. The whole file is not searched: code that merely talks about
    licenses (a license checker, a docstring) must not count as a grant."""

    def check(self) -> None:
        if not self.permissive:
            raise DataToolError("license.permissive is empty; list the SPDX ids to keep, e.g. [MIT, Apache-2.0]")
        if self.header_chars < 0:
            raise DataToolError(f"license.header_chars must be >= 0, got {self.header_chars}")


def license_file_ids(text: str) -> set[str]:
    """The licenses a LICENSE-like file grants; :data:`UNRECOGNIZED` when no rule matches."""
    return detect_in_text(text) or {UNRECOGNIZED}


def header_detections(text: str, config: LicenseConfig) -> list[list[frozenset[str]]]:
    """Alternatives (see spdx.parse_expression) for each license stated in the file header."""
    header = text[:config.header_chars]
    detections = []
    for expression in spdx_expressions(header):
        try:
            detections.append(parse_expression(expression, config.permissive))
        except DataToolError:
            detections.append([frozenset({UNRECOGNIZED})])  # a garbled header is no grant
    detections.extend([frozenset({spdx})] for spdx in sorted(detect_in_text(header)))
    return detections


def decide_license(directory_ids: Sequence[str], declared: Sequence[str], text: str,
                   config: LicenseConfig) -> LicenseDecision:
    """Keep/drop one file given its directory's license ids, declared expressions and contents."""
    detections = [[frozenset({spdx})] for spdx in directory_ids]
    for expression in declared:
        detections.append(parse_expression(expression, config.permissive))
    detections.extend(header_detections(text, config))
    if not detections:
        return LicenseDecision(reason="license_none")
    used, rejected = choose_permissive(detections, config.permissive)
    return LicenseDecision(licenses=used, rejected=rejected, reason="license_not_permissive" if rejected else "")
