"""Build a seed corpus of permissively licensed source code that is available offline.

By default the corpus is the Python standard library's own ``.py`` sources (PSF-2.0), found
via ``sysconfig.get_paths()["stdlib"]``: every machine with Python has it, so tokenizer and
pipeline tests need no network. ``--source-dir DIR --license SPDX`` takes any other local
tree whose license is in :data:`PERMISSIVE_LICENSES`.

Output is jsonl, one file per line: ``{"text", "path", "source", "license"}`` with ``path``
relative to the source root. Files are visited in sorted relative-path order, so the same
tree and options always give a byte-identical corpus.

Why this is hand-written rather than a datatrove reader: walking one local directory into
jsonl is a few dozen lines, and datatrove (the planned engine for dedup/decontamination at
scale) would be a heavy dependency for it.

Example::

    mcode-seed-corpus --output data/seed.jsonl
    mcode-seed-corpus --source-dir ~/src/requests --license Apache-2.0 --output data/req.jsonl
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sysconfig
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from tqdm import tqdm

from data_tools._common import DataToolError, atomic_outputs, check_outputs_free, run_cli
from data_tools.ingest.license import DEFAULT_PERMISSIVE

PROG = "mcode-seed-corpus"

# SPDX ids whose terms allow training on and redistributing derived data without copyleft;
# the same default whitelist as ingestion's license filter.
PERMISSIVE_LICENSES = DEFAULT_PERMISSIVE
STDLIB_LICENSE = "PSF-2.0"
# Test trees hold deliberately broken, odd-encoding or huge fixture files (idlelib's is named
# idle_test); site-packages holds third-party code under other licenses; __pycache__ bytecode.
EXCLUDED_DIR_NAMES = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
DEFAULT_MAX_FILE_BYTES = 200_000


@dataclass
class CorpusSummary:
    """What :func:`build_seed_corpus` wrote."""

    output: str
    files: int = 0
    bytes: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    excluded_dirs: int = 0
    stopped_early: str = ""  # which limit (--max-files/--max-bytes) ended the walk, if any

    def line(self) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        stop = f"; stopped at {self.stopped_early}" if self.stopped_early else ""
        return (f"wrote {self.files} files, {self.bytes:,} bytes of text to {self.output}; "
                f"skipped files: {skipped}; excluded dirs: {self.excluded_dirs}{stop}")


def normalize_license(spdx: str) -> str:
    """Return the canonical SPDX spelling of a permissive license id, or raise.

    SPDX ids compare case-insensitively, so ``mit`` is accepted as ``MIT``.
    """
    for known in PERMISSIVE_LICENSES:
        if spdx.strip().lower() == known.lower():
            return known
    raise DataToolError(
        f"--license {spdx!r} is not in the permissive allowlist {', '.join(PERMISSIVE_LICENSES)}; "
        "only permissively licensed code may enter the corpus (copyleft and unknown licenses are refused)"
    )


def parse_extensions(spec: str) -> tuple[str, ...]:
    """Turn ``".py,pyi"`` into ``(".py", ".pyi")`` (lower-case, leading dot)."""
    exts = []
    for part in spec.split(","):
        part = part.strip().lower()
        if not part:
            continue
        exts.append(part if part.startswith(".") else "." + part)
    if not exts:
        raise DataToolError(f"--extensions {spec!r} names no extension; expected e.g. '.py' or '.py,.pyi'")
    return tuple(dict.fromkeys(exts))


def list_source_files(root: str, extensions: Sequence[str]) -> tuple[list[str], int]:
    """Return (sorted relative posix paths of matching files, number of directories pruned).

    Hidden directories (``.git``, ``.venv``) are pruned along with :data:`EXCLUDED_DIR_NAMES`.
    Sorting the full list (not per directory) fixes the order independently of the filesystem.
    """
    found, pruned = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        keep = [d for d in dirnames if d not in EXCLUDED_DIR_NAMES and not d.startswith(".")]
        pruned += len(dirnames) - len(keep)
        dirnames[:] = keep
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.lower().endswith(tuple(extensions)):
                rel = os.path.normpath(os.path.join(rel_dir, name))
                found.append(rel.replace(os.sep, "/"))
    return sorted(found), pruned


def read_source_file(path: str, max_file_bytes: int) -> tuple[str | None, str]:
    """Return ``(text, "")`` for a usable file, else ``(None, reason)``.

    Size is checked with ``lstat`` before reading so huge generated files cost nothing.
    Symlinks are skipped: they can point outside the licensed tree or duplicate files.
    """
    st = os.lstat(path)
    if os.path.islink(path):
        return None, "symlink"
    if st.st_size > max_file_bytes:
        return None, "too_large"
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, "non_utf8"
    if not text.strip():
        return None, "empty"
    return text, ""


def stdlib_source() -> tuple[str, str]:
    """Return (root directory, source name) of this interpreter's standard library."""
    root = sysconfig.get_paths()["stdlib"]
    return root, f"python-stdlib-{platform.python_version()}"


def resolve_source(source_dir: str | None, license: str | None, source_name: str | None) -> tuple[str, str, str]:
    """Validate the source options; return (root, source name, canonical license)."""
    if source_dir is None:
        if license is not None and normalize_license(license) != STDLIB_LICENSE:
            raise DataToolError(f"--license {license!r} given without --source-dir; the default source, "
                                f"the Python standard library, is {STDLIB_LICENSE}. Add --source-dir DIR")
        root, default_name = stdlib_source()
        return root, source_name or default_name, STDLIB_LICENSE
    if license is None:
        raise DataToolError(f"--source-dir {source_dir!r} needs --license SPDX-ID (one of "
                            f"{', '.join(PERMISSIVE_LICENSES)}) so that every record carries its license")
    if not os.path.isdir(source_dir):
        raise DataToolError(f"--source-dir {source_dir!r} is not a directory")
    name = source_name or os.path.basename(os.path.normpath(os.path.abspath(source_dir)))
    return source_dir, name, normalize_license(license)


def iter_records(root: str, rel_paths: Sequence[str], source: str, license: str,
                 max_file_bytes: int, summary: CorpusSummary) -> Iterator[dict]:
    """Yield one record per usable file, counting skipped files by reason in ``summary``."""
    for rel in rel_paths:
        text, reason = read_source_file(os.path.join(root, rel), max_file_bytes)
        if text is None:
            summary.skipped[reason] += 1
            continue
        yield {"text": text, "path": rel, "source": source, "license": license}


def _check_limits(max_files: int | None, max_bytes: int | None, max_file_bytes: int) -> None:
    for flag, value in (("--max-files", max_files), ("--max-bytes", max_bytes), ("--max-file-bytes", max_file_bytes)):
        if value is not None and value <= 0:
            raise DataToolError(f"{flag} must be a positive integer, got {value}")



def build_seed_corpus(output: str, *, source_dir: str | None = None, license: str | None = None,
                      source_name: str | None = None, extensions: Sequence[str] = (".py",),
                      max_files: int | None = None, max_bytes: int | None = None,
                      max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, overwrite: bool = False,
                      progress: bool | None = None) -> CorpusSummary:
    """Write the seed corpus jsonl to ``output`` and return what was written.

    ``source_dir=None`` means the Python standard library (PSF-2.0). ``max_bytes`` stops the
    walk once the UTF-8 text written reaches it (the last file may cross it). ``progress=None``
    shows a bar only on a terminal. Raises :class:`DataToolError` on bad options, before any
    file is read; the output appears only if the whole run succeeds.
    """
    _check_limits(max_files, max_bytes, max_file_bytes)
    root, source, license = resolve_source(source_dir, license, source_name)
    check_outputs_free([output], overwrite, "--output")
    rel_paths, pruned = list_source_files(root, extensions)
    if not rel_paths:
        raise DataToolError(f"no files ending in {', '.join(extensions)} under {root!r}; "
                            "check --source-dir/--extensions")
    summary = CorpusSummary(output=output, excluded_dirs=pruned)
    with atomic_outputs([output]) as (tmp,), open(tmp, "w", encoding="utf-8") as out:
        bar = tqdm(rel_paths, desc="seed corpus", unit="file", disable=None if progress is None else not progress)
        for record in iter_records(root, bar, source, license, max_file_bytes, summary):
            # ensure_ascii=False keeps non-ASCII text readable and ~2x smaller than \\u escapes.
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            summary.files += 1
            summary.bytes += len(record["text"].encode("utf-8"))
            if max_files is not None and summary.files >= max_files:
                summary.stopped_early = f"--max-files {max_files}"
            elif max_bytes is not None and summary.bytes >= max_bytes:
                summary.stopped_early = f"--max-bytes {max_bytes}"
            if summary.stopped_early:
                break
        bar.close()
        if summary.files == 0:
            raise DataToolError(f"every candidate file under {root!r} was skipped ({dict(summary.skipped)}); "
                                "raise --max-file-bytes or check the source directory")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output", required=True, help="jsonl file to write")
    parser.add_argument("--source-dir", default=None,
                        help="local directory to read instead of the Python standard library")
    parser.add_argument("--license", default=None,
                        help=f"SPDX id of --source-dir's license; one of {', '.join(PERMISSIVE_LICENSES)}")
    parser.add_argument("--source-name", default=None,
                        help="value of the 'source' field (default: python-stdlib-X.Y.Z or the directory name)")
    parser.add_argument("--extensions", default=".py", help="comma-separated file extensions to take")
    parser.add_argument("--max-files", type=int, default=None, help="stop after this many files")
    parser.add_argument("--max-bytes", type=int, default=None, help="stop once this many bytes of text are written")
    parser.add_argument("--max-file-bytes", type=int, default=DEFAULT_MAX_FILE_BYTES,
                        help="skip files larger than this (usually generated data, not code)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``mcode-seed-corpus``."""
    args = build_parser().parse_args(argv)

    def run() -> None:
        summary = build_seed_corpus(
            args.output, source_dir=args.source_dir, license=args.license, source_name=args.source_name,
            extensions=parse_extensions(args.extensions), max_files=args.max_files, max_bytes=args.max_bytes,
            max_file_bytes=args.max_file_bytes, overwrite=args.overwrite)
        print(summary.line())

    run_cli(PROG, run)


if __name__ == "__main__":
    main()
