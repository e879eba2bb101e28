"""Execution validation of generated samples from async code, in batches.

The validator is a plain function ``validator(samples) -> results`` (one result per sample,
order preserved), by default the sandbox's ``validate_samples``. It is synchronous and runs
its own worker pool, so it is called from a thread, one batch at a time: while a batch runs,
newly generated samples queue up and form the next batch. That keeps the sandbox's workers
busy without ever running two pools at once.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
from typing import Callable, Sequence

from data_tools._common import DataToolError

Validator = Callable[[list], Sequence[object]]


def sandbox_validator(options: dict, languages: Sequence[str]) -> Validator:
    """``validate_samples`` with a ``SandboxConfig`` built from the recipe's ``sandbox`` mapping.

    Checked before any work: the options must be SandboxConfig fields, and every language of
    the run must have a toolchain on this machine.
    """
    from data_tools.sandbox import detect_toolchains, validate_samples  # heavy: only when validating

    config = sandbox_config(options)
    toolchains = detect_toolchains()
    missing = [lang for lang in languages if toolchains.get(lang) is None]
    if missing:
        raise DataToolError(f"languages {missing} have no toolchain on this machine, so their samples cannot be "
                            "validated; install the compiler/interpreter or remove them from languages")
    return functools.partial(validate_samples, config=config)


def sandbox_config(options: dict, where: str = "recipe field sandbox"):
    """A ``SandboxConfig`` from a recipe's ``sandbox`` mapping; an unknown field is an error naming ``where``."""
    from data_tools.pipeline.config_loader import did_you_mean
    from data_tools.sandbox import SandboxConfig

    known = [f.name for f in dataclasses.fields(SandboxConfig) if f.init]
    for key in options:
        if key not in known:
            raise DataToolError(f"{where}: unknown field {key!r}{did_you_mean(str(key), known)} "
                                f"(SandboxConfig fields: {', '.join(known)}; docs/sandbox.md)")
    return SandboxConfig(**options)


def execution_record(result: object) -> dict:
    """A sandbox result as the sample's ``execution`` field (dataclass, mapping or object)."""
    if dataclasses.is_dataclass(result):
        return dataclasses.asdict(result)
    if isinstance(result, dict):
        return dict(result)
    return {k: v for k, v in vars(result).items() if not k.startswith("_")}


class BatchValidator:
    """``await validate(sample)`` -> execution record; batches concurrent calls."""

    def __init__(self, validator: Validator, max_batch: int):
        self.validator = validator
        self.max_batch = max_batch
        self.batches = 0
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None

    async def validate(self, sample: dict) -> dict:
        if self._worker is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((sample, future))
        return await future

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            live = [(s, f) for s, f in batch if not f.cancelled()]
            if not live:
                continue
            try:
                results = await asyncio.to_thread(self.validator, [s for s, _ in live])
                if len(results) != len(live):
                    raise RuntimeError(f"validator returned {len(results)} results for {len(live)} samples")
                for (_, future), result in zip(live, results):
                    if not future.done():
                        future.set_result(execution_record(result))
            except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
                for _, future in live:
                    if not future.done():
                        future.set_exception(exc)
            self.batches += 1

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
