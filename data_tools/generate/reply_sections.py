"""Reading a teacher's Markdown reply: sections under headings, code inside fences.

Teachers format the same answer in many ways: ``## Solution``, ``**Solution:**``,
``Solution:``; code with or without fences, with or without a language tag; sometimes the
whole reply wrapped in a ```` ```markdown ```` fence. These helpers accept all of that and
refuse, with a reason, only what cannot be read. Lines inside code fences never count as
headings, because ``# Tests`` is also a Python comment.
"""
from __future__ import annotations

import ast
import re

from data_tools.teacher.errors import ReplyRejected

FENCE_OPEN = re.compile(r"^\s{0,3}(`{3,}|~{3,})\s*([\w+#.-]*)")
# "## Solution", "**Solution:**", "[Solution]", "Solution:" (alone on its line).
HEADING = re.compile(r"^\s{0,3}(?:#{1,6}\s*)?(?:\*\*|__)?\[?\s*([A-Za-z][\w ]*?)\s*\]?\s*:?\s*(?:\*\*|__)?\s*:?\s*$")
# The same, with a value on the heading's line ("## Entry Point: `add`", "**Difficulty:** easy").
INLINE_HEADING = re.compile(r"^\s{0,3}(?:#{1,6}\s*)?(?:\*\*|__)?([A-Za-z][\w ]*?)\s*:\s*(?:\*\*|__)?\s*:?\s*(\S.*)$")


def unwrap_reply(text: str) -> str:
    """Strip one fence that wraps the whole reply (```` ```markdown ... ``` ````), if there is one."""
    lines = text.strip().splitlines()
    if len(lines) >= 2 and FENCE_OPEN.match(lines[0]) and lines[-1].strip() in ("```", "~~~"):
        tag = FENCE_OPEN.match(lines[0]).group(2).lower()
        if tag in ("", "markdown", "md", "text"):
            return "\n".join(lines[1:-1])
    return text


def split_sections(text: str, names: tuple[str, ...], inline: tuple[str, ...] = ()) -> dict[str, str]:
    """Map each section name found to its body (text up to the next known heading).

    ``names`` are matched case-insensitively; sections in ``inline`` may carry their value on
    the heading line. Markdown headings (``## Name``) are preferred; looser headings
    (``**Name:**``, ``Name:``) are used only when reading by them finds more sections, so that
    a word like "Examples" on its own line inside a problem statement does not end the
    statement of a reply that uses Markdown headings. When a name appears twice the first
    non-empty body wins.
    """
    body = unwrap_reply(text)
    strict = _sections(body, names, inline, strict=True)
    loose = _sections(body, names, inline, strict=False)
    return strict if len(strict) >= len(loose) else loose


def _sections(text: str, names: tuple[str, ...], inline: tuple[str, ...], strict: bool) -> dict[str, str]:
    wanted = {name.lower(): name for name in names}
    inline_ok = {name.lower() for name in inline}
    bodies: dict[str, list[str]] = {}
    current, fence = None, None
    for line in text.splitlines():
        if fence is None and (not strict or line.lstrip().startswith("#")):
            name, rest = _heading(line, wanted, inline_ok)
            if name is not None:
                current = name if not "".join(bodies.get(name, [])).strip() else None
                bodies.setdefault(name, [])
                if current is not None and rest:
                    bodies[name].append(rest)
                continue
        fence = _track_fence(line, fence)
        if current is not None:
            bodies[current].append(line)
    return {name: "\n".join(lines).strip() for name, lines in bodies.items() if "\n".join(lines).strip()}


def _heading(line: str, wanted: dict[str, str], inline_ok: set[str]) -> tuple[str | None, str]:
    match = HEADING.match(line)
    if match and match.group(1).strip().lower() in wanted:
        return wanted[match.group(1).strip().lower()], ""
    match = INLINE_HEADING.match(line)
    if match and match.group(1).strip().lower() in inline_ok:
        return wanted[match.group(1).strip().lower()], match.group(2).strip()
    return None, ""


def _track_fence(line: str, fence: str | None) -> str | None:
    """Return the open fence marker after ``line`` (None when outside a code block)."""
    match = FENCE_OPEN.match(line)
    if fence is None:
        return match.group(1) if match else None
    closes = match is not None and line.strip() == match.group(1) and match.group(1).startswith(fence)
    return None if closes else fence


def require_sections(text: str, names: tuple[str, ...], required: tuple[str, ...],
                     inline: tuple[str, ...] = ()) -> dict[str, str]:
    """:func:`split_sections`, refusing the reply when a required section is missing or empty."""
    sections = split_sections(text, names, inline)
    missing = [name for name in required if name not in sections]
    if missing:
        found = ", ".join(sections) or "none"
        raise ReplyRejected(f"reply lacks the section(s) {', '.join(missing)} (found: {found})")
    return sections


def code_block(body: str, what: str) -> str:
    """The contents of the first fenced block in ``body``, or ``body`` itself when it has no fence."""
    lines = body.splitlines()
    for start, line in enumerate(lines):
        match = FENCE_OPEN.match(line)
        if match:
            fence = match.group(1)
            for end in range(start + 1, len(lines)):
                if _track_fence(lines[end], fence) is None:
                    code = "\n".join(lines[start + 1:end])
                    break
            else:
                raise ReplyRejected(f"{what}: code block is not closed (was the reply cut off? raise max_tokens)")
            break
    else:
        code = body
    if not code.strip():
        raise ReplyRejected(f"{what} is empty")
    return code.strip("\n") + "\n"


def check_python(code: str, what: str) -> ast.Module:
    """Parse Python code; a syntax error rejects the reply (running it would only say the same)."""
    try:
        return ast.parse(code)
    except SyntaxError as exc:
        raise ReplyRejected(f"{what} is not valid Python: {exc.msg} (line {exc.lineno})") from None


def defines_function(tree: ast.Module, name: str) -> bool:
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name for node in tree.body)


def has_assertion(tree: ast.Module) -> bool:
    """True when the code checks something: an ``assert``, a ``raise`` or an ``assert*`` call."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assert, ast.Raise)):
            return True
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name.startswith("assert"):
                return True
    return False


def difficulty_of(body: str | None) -> str | None:
    """``easy``/``medium``/``hard`` from the start of a Difficulty section, else None."""
    match = re.match(r"\W*(easy|medium|hard)\b", body or "", re.IGNORECASE)
    return match.group(1).lower() if match else None


def concepts_of(body: str | None, limit: int = 10) -> list[str]:
    """Tags from a comma- or line-separated Concepts section (bullets and backticks stripped)."""
    tags = []
    for part in re.split(r"[,\n;]", body or ""):
        tag = part.strip().lstrip("-*• ").strip("`'\" .").lower()
        if tag and len(tag) <= 60 and tag not in tags:
            tags.append(tag)
    return tags[:limit]


def fenced_blocks(text: str) -> int:
    """Number of complete fenced code blocks; :class:`ReplyRejected` when one is left open (a cut-off reply)."""
    blocks, fence = 0, None
    for line in text.splitlines():
        after = _track_fence(line, fence)
        blocks += fence is not None and after is None
        fence = after
    if fence is not None:
        raise ReplyRejected("a code block is not closed (was the reply cut off? raise max_tokens)")
    return blocks
