"""Run a list of independent tasks (one per shard): in this process, a local process pool, or Ray.

Why not datatrove's executors: they mark a task done by its rank in a logging folder, not by
its output, so deleting one shard's output would not make it run again; their Slurm executor
pickles the whole pipeline with dill and submits in the same call, with no way to only write
the job script. Here a task is a plain top-level function and its arguments, and skipping is
decided by the output-checking markers of :mod:`data_tools.pipeline.shards`.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
from typing import Callable, Sequence

from tqdm import tqdm

from data_tools._common import DataToolError


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork starts workers in milliseconds and shares the imported modules; where it does not
    # exist (macOS defaults, Windows) spawn is the safe choice.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def run_local(fn: Callable, tasks: Sequence[tuple], workers: int, desc: str,
              progress: bool | None = None) -> list:
    """``[fn(*task) for task in tasks]`` with up to ``workers`` processes; results in task order.

    The first failing task's exception is raised after the running ones finish; tasks not
    yet started are cancelled, and finished tasks keep their (atomically written) outputs.
    """
    disable = None if progress is None else not progress
    if workers <= 1 or len(tasks) <= 1:
        return [fn(*task) for task in tqdm(tasks, desc=desc, unit="shard", disable=disable)]
    results: list = [None] * len(tasks)
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(tasks)), mp_context=_pool_context()) as pool:
        futures = {pool.submit(fn, *task): i for i, task in enumerate(tasks)}
        try:
            for future in tqdm(concurrent.futures.as_completed(futures), total=len(futures), desc=desc,
                               unit="shard", disable=disable):
                results[futures[future]] = future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return results


def require_ray():
    """Import ray or explain how to get it (called when the recipe is loaded, before any work)."""
    try:
        import ray
    except ImportError:
        raise DataToolError("executor.kind is 'ray' but the ray package is not installed; "
                            "pip install 'ray[default]' or use executor.kind: local") from None
    return ray


def run_ray(fn: Callable, tasks: Sequence[tuple], address: str | None, num_cpus: float, desc: str,
            progress: bool | None = None) -> list:
    """``[fn(*task) for task in tasks]`` as Ray tasks (one per shard); results in task order."""
    ray = require_ray()
    if not ray.is_initialized():
        ray.init(address=address)
    remote = ray.remote(num_cpus=num_cpus)(fn)
    refs = [remote.remote(*task) for task in tasks]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list = [None] * len(refs)
    pending = list(refs)
    with tqdm(total=len(refs), desc=desc, unit="shard", disable=None if progress is None else not progress) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            results[index[done[0]]] = ray.get(done[0])
            bar.update(1)
    return results
