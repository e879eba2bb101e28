"""Validate generated samples (docs/data_tools.md schema) by running them: one sample, or many in
parallel with results in input order."""
from __future__ import annotations

import collections
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable, Iterator

from data_tools._common import DataToolError
from data_tools.sandbox.config import LANGUAGES, ExecutionResult, SandboxConfig
from data_tools.sandbox.runner import execute
from data_tools.sandbox.toolchains import detect_toolchains, missing_toolchain_message

log = logging.getLogger(__name__)
TEST_FORMATS = ("script", "stdin_stdout")
# Batches this large get a progress bar by default (a bar for three samples is noise).
PROGRESS_MIN_SAMPLES = 32


def check_sample(sample: object, where: str) -> None:
    """Raise a :class:`DataToolError` naming ``where`` and the field unless ``sample`` can be run."""
    if not isinstance(sample, dict):
        raise DataToolError(f"{where}: expected a sample object, got {type(sample).__name__}")
    language = sample.get("language")
    if language not in LANGUAGES:
        raise DataToolError(f"{where}: field 'language' must be one of {', '.join(LANGUAGES)}, got {language!r}")
    for key in ("solution", "tests"):
        if not isinstance(sample.get(key) or "", str):  # tests may be null for stdin/stdout samples
            raise DataToolError(f"{where}: field {key!r} must be a string, got {type(sample[key]).__name__}")
    if not sample.get("solution"):
        raise DataToolError(f"{where}: field 'solution' is missing or empty; only samples with code can be run "
                            "(textbook documents have nothing to execute: filter them out first)")
    test_format = sample.get("test_format", "script")
    if test_format not in TEST_FORMATS:
        raise DataToolError(f"{where}: field 'test_format' must be 'script' or 'stdin_stdout', got {test_format!r}")
    entry_point = sample.get("entry_point")
    if entry_point is not None and not (isinstance(entry_point, str) and entry_point.isidentifier()):
        raise DataToolError(f"{where}: field 'entry_point' must be a function name or null, got {entry_point!r}")
    if test_format == "stdin_stdout":
        _check_io_examples(sample.get("io_examples"), where)


def _check_io_examples(examples: object, where: str) -> None:
    if not isinstance(examples, list) or not examples:
        raise DataToolError(f"{where}: test_format 'stdin_stdout' needs a non-empty list 'io_examples' of "
                            f"{{\"input\", \"output\"}} objects, got {examples!r}"[:300])
    for index, example in enumerate(examples):
        if not (isinstance(example, dict) and isinstance(example.get("input"), str)
                and isinstance(example.get("output"), str)):
            raise DataToolError(f"{where}: io_examples[{index}] must be an object with string fields "
                                f"'input' and 'output', got {example!r}"[:300])


def _run_checked(sample: dict, config: SandboxConfig) -> ExecutionResult:
    solution, tests = sample["solution"], sample.get("tests") or ""
    if sample.get("test_format", "script") == "stdin_stdout":
        examples = sample["io_examples"]
        return execute(sample["language"], solution, "", None, [e["input"] for e in examples],
                       [e["output"] for e in examples], config)
    return execute(sample["language"], solution, tests, sample.get("entry_point"), [""], None, config)


def validate_sample(sample: dict, config: SandboxConfig | None = None) -> ExecutionResult:
    """Run a sample: solution + tests (``test_format`` "script"), or the solution once per io example
    with its input on stdin and its output compared (``"stdin_stdout"``)."""
    check_sample(sample, "sample")
    return _run_checked(sample, config or SandboxConfig())


def missing_toolchains(languages: Iterable[str]) -> dict[str, int]:
    """{language: sample count} for the languages given whose toolchain is missing here."""
    toolchains = detect_toolchains()
    return dict(collections.Counter(language for language in languages if toolchains.get(language) is None))


def warn_missing_toolchains(languages: Iterable[str]) -> None:
    """Log one warning per language whose toolchain is missing: their samples cannot pass."""
    for language, count in sorted(missing_toolchains(languages).items()):
        log.warning("%d sample(s) will get verdict sandbox_error: %s", count, missing_toolchain_message(language))


def iter_validated(samples: Iterable[dict], config: SandboxConfig, progress=None) -> Iterator[ExecutionResult]:
    """Yield one result per sample, in input order, running up to ``config.workers`` at once.

    Streams: at most a few samples per worker are held at a time, so any number of samples fits in
    memory. ``progress`` (a tqdm bar or None) is advanced as samples finish. Samples are not checked
    here; callers check them all first so that bad input fails before any work.
    """
    window = collections.deque()
    with ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="sandbox") as pool:
        try:
            for sample in samples:
                future = pool.submit(_run_checked, sample, config)
                if progress is not None:
                    future.add_done_callback(lambda _f: progress.update(1))
                window.append(future)
                if len(window) >= 4 * config.workers:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            _cancel(window)


def _cancel(window: collections.deque[Future]) -> None:
    for future in window:  # on error or Ctrl-C: do not start what is still queued
        future.cancel()


def tqdm_disable(progress: bool | None) -> bool | None:
    """tqdm's ``disable`` for a ``progress`` setting: None lets tqdm hide the bar when stderr is not a terminal."""
    return None if progress is None else not progress


def validate_samples(samples: list[dict], config: SandboxConfig | None = None) -> list[ExecutionResult]:
    """Validate many samples in parallel (``config.workers`` at once); results in input order.

    Every sample is checked before any is run, so a malformed one fails the batch in milliseconds.
    """
    config = config or SandboxConfig()
    for index, sample in enumerate(samples):
        check_sample(sample, f"samples[{index}]")
    warn_missing_toolchains(sample["language"] for sample in samples)
    show = config.progress if config.progress is not None else len(samples) >= PROGRESS_MIN_SAMPLES
    if not show:
        return list(iter_validated(samples, config))
    from tqdm import tqdm  # only here: run_program and friends work without it (e.g. under another python)

    with tqdm(total=len(samples), desc="sandbox", unit="sample", disable=tqdm_disable(config.progress)) as bar:
        return list(iter_validated(samples, config, bar))
