"""Pieces shared by the data_tools commands: user-facing errors, atomic outputs, jsonl reading."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Callable, Iterator, Sequence


class DataToolError(Exception):
    """A problem with the user's input or options.

    The message alone must let the user fix it: it names the file/flag/field, says what was
    expected and what was found, and suggests the fix. The CLIs print it as one line (no
    traceback) because a traceback for a typo'd path only hides the useful sentence.
    """


def run_cli(prog: str, func: Callable[[], object]) -> None:
    """Run ``func``; turn a :class:`DataToolError` into ``SystemExit`` with a one-line message."""
    try:
        func()
    except DataToolError as exc:
        raise SystemExit(f"{prog}: error: {exc}") from None


def check_outputs_free(paths: Sequence[str], overwrite: bool, flag: str) -> None:
    """Refuse to clobber existing outputs, before any work is done.

    Re-running a command by accident (or with a typo'd prefix) should never destroy hours of
    earlier work, so replacing files needs an explicit ``--overwrite``.
    """
    if overwrite:
        return
    existing = [p for p in paths if os.path.lexists(p)]
    if existing:
        raise DataToolError(
            f"output {existing[0]!r} already exists; pass --overwrite to replace it "
            f"or choose another {flag}"
        )


@contextlib.contextmanager
def output_directory(directory: str) -> Iterator[str]:
    """Create ``directory`` (and missing parents) for outputs; remove what was created on failure.

    Only directories this call created are removed, deepest first, and only if still empty, so
    a failed run leaves the filesystem as it found it.
    """
    directory = os.path.abspath(directory)
    missing, probe = [], directory
    while not os.path.exists(probe):
        missing.append(probe)
        probe = os.path.dirname(probe)
    os.makedirs(directory, exist_ok=True)
    try:
        yield directory
    except BaseException:
        for path in missing:  # deepest first
            with contextlib.suppress(OSError):
                os.rmdir(path)
        raise


@contextlib.contextmanager
def atomic_outputs(final_paths: Sequence[str]) -> Iterator[list[str]]:
    """Yield temporary paths, one per final path; rename them into place only on success.

    The temporaries live in the destination directory so that ``os.replace`` is an atomic
    rename on the same filesystem. On any exception (including Ctrl-C) they are deleted, so a
    failed run leaves neither partial files nor a damaged earlier output behind.
    """
    temps: list[str] = []
    with contextlib.ExitStack() as stack:
        try:
            for final in final_paths:
                directory = stack.enter_context(output_directory(os.path.dirname(os.path.abspath(final))))
                fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(final)}.", suffix=".tmp", dir=directory)
                os.close(fd)
                temps.append(tmp)
                # mkstemp creates 0600 files; give the output the permissions a plain open() would.
                os.chmod(tmp, 0o666 & ~_current_umask())
            yield temps
            for tmp, final in zip(temps, final_paths):
                os.replace(tmp, final)
        finally:
            for tmp in temps:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)


def _current_umask() -> int:
    mask = os.umask(0)  # the only portable way to read the umask is to set it and restore it
    os.umask(mask)
    return mask


def require_file(path: str, flag: str, hint: str) -> None:
    """Fail early, naming the flag, when an input file is missing."""
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "does not exist"
        raise DataToolError(f"{flag} {path!r} {what}; {hint}")


def parse_json_object(raw: bytes, path: str, lineno: int) -> dict | None:
    """Parse one jsonl line into a dict; ``None`` for a blank line; errors name ``file:line``."""
    if not raw.strip():
        return None
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(raw.rstrip(b"\r\n").decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataToolError(f"{where}: line is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        # Same shape as Python's own message ("Expecting ',' delimiter: column 14").
        raise DataToolError(f"{where}: invalid JSON: {exc.msg}: column {exc.colno}; "
                            "each line must be one JSON object") from None
    if not isinstance(obj, dict):
        raise DataToolError(f"{where}: expected a JSON object, got {_json_type(obj)}")
    return obj


def iter_jsonl_objects(path: str) -> Iterator[dict]:
    """Yield every JSON object of a jsonl file in order (blank lines skipped)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            obj = parse_json_object(raw, path, lineno)
            if obj is not None:
                yield obj


def parse_json_line(raw: bytes, path: str, lineno: int, keys: Sequence[str],
                    key_flag: str = "--json-keys") -> dict[str, str] | None:
    """Parse one jsonl line into ``{key: text}``; ``None`` for a blank line.

    Errors name ``file:line`` and the key, because with millions of lines "invalid JSON"
    without a location is useless.
    """
    obj = parse_json_object(raw, path, lineno)
    if obj is None:
        return None
    where = f"{path}:{lineno}"
    texts = {}
    for key in keys:
        if key not in obj:
            raise DataToolError(f"{where}: missing key {key!r} (keys present: {sorted(obj)[:10]}); "
                                f"set {key_flag} to the field that holds the text")
        if not isinstance(obj[key], str):
            raise DataToolError(f"{where}: key {key!r} must be a string, got {_json_type(obj[key])}")
        texts[key] = obj[key]
    return texts


def _json_type(value: object) -> str:
    """Name a parsed value by its JSON type (the user wrote JSON, not Python)."""
    names = {dict: "an object", list: "an array", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def check_jsonl_head(path: str, keys: Sequence[str], key_flag: str, flag: str = "--input",
                     max_lines: int = 10) -> None:
    """Validate that ``path`` exists and its first lines are JSON objects holding ``keys``.

    This catches the common mistakes (wrong file, wrong key, not jsonl) in milliseconds,
    before a tokenizer is loaded or worker processes are started.
    """
    require_file(path, flag, "pass the path of a .jsonl file (one JSON object per line)")
    seen = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if parse_json_line(raw, path, lineno, keys, key_flag) is not None:
                seen += 1
                if seen >= max_lines:
                    break
    if seen == 0:
        raise DataToolError(f"{flag} {path!r} holds no JSON lines; expected one JSON object per line")


def iter_jsonl_texts(path: str, key: str) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` for each non-blank line of a jsonl file."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            parsed = parse_json_line(raw, path, lineno, (key,), "--json-key")
            if parsed is not None:
                yield lineno, parsed[key]


def count_lines(path: str, chunk_bytes: int = 1 << 20) -> int:
    """Count newline-terminated lines quickly (GB/s), to give progress bars a total and an ETA."""
    count = 0
    last = b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


def read_yaml_file(path: str, what: str) -> object:
    """Parse a YAML (or JSON) file; errors name ``what`` (e.g. "recipe" or "--config") and the path."""
    import yaml

    if not os.path.isfile(path):
        raise DataToolError(f"{what} {path!r} does not exist; pass the path of a YAML file")
    with open(path, encoding="utf-8") as f:
        try:
            return yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise DataToolError(f"{what} {path!r} is not valid YAML: {exc}") from None


def require_tokenizer(path: str, where: str) -> None:
    """Fail early unless ``path`` loads as a sentencepiece model (a stage using it may run hours later)."""
    from megatron_code.tokenizer import SentencePieceTokenizer

    try:
        SentencePieceTokenizer(path)
    except (OSError, RuntimeError, ValueError) as exc:
        raise DataToolError(f"{where} {path!r} is not a usable sentencepiece model ({exc}); "
                            "train one with `python -m data_tools train-tokenizer`") from None
