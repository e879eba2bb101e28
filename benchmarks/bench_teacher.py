"""Overhead of the teacher client and the crash-safe journal (a script, not a test).

Against the scripted loopback server of tests/openai_test_server.py (so the teacher itself costs
~nothing and what is measured is our side):

1. the bare ``openai.AsyncOpenAI`` client, N chat requests at concurrency C (the reference);
2. :class:`TeacherClient` with its SQLite cache, the same N requests (cold: every one goes to the
   server and is written to the cache);
3. the same again (warm: every one is a cache hit, what a rerun costs);
4. :class:`SampleJournal` appends (one ``write`` + ``fsync`` each) against plain buffered
   ``write`` calls without fsync (the reference).

    python benchmarks/bench_teacher.py                  # N=400, C=16
    python benchmarks/bench_teacher.py --requests 2000 --concurrency 64
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import openai  # noqa: E402

from data_tools.generate.journal import ACCEPTED, SampleJournal  # noqa: E402
from data_tools.teacher import ResponseCache, TeacherClient, TeacherConfig  # noqa: E402
from tests.openai_test_server import ScriptedTeacherServer  # noqa: E402


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"# Task: oss_instruct\nSeed {i}: def f(x): return x * {i}"}]


async def bare_openai(base_url: str, n: int, concurrency: int) -> float:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0)
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            await client.chat.completions.create(model="bench", messages=messages(i), temperature=0.7, seed=i)

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.perf_counter() - start
    await client.close()
    return elapsed


async def teacher_client(base_url: str, cache_path: str, n: int, concurrency: int) -> float:
    config = TeacherConfig(name="bench", base_url=base_url, model="bench", max_concurrency=concurrency)
    with ResponseCache(cache_path) as cache:
        client = TeacherClient(config, cache)
        start = time.perf_counter()
        await asyncio.gather(*(client.ask(messages(i), lambda text: text, key=f"item-{i}") for i in range(n)))
        elapsed = time.perf_counter() - start
        await client.aclose()
    return elapsed


def journal_appends(directory: str, n: int) -> float:
    record = {"id": "", "problem": "x" * 400, "solution": "y" * 600, "tests": "z" * 300}
    start = time.perf_counter()
    with SampleJournal(directory) as journal:
        for i in range(n):
            journal.append(ACCEPTED, {**record, "id": f"r{i}"})
    return time.perf_counter() - start


def plain_appends(path: str, n: int) -> float:
    record = {"id": "", "problem": "x" * 400, "solution": "y" * 600, "tests": "z" * 300}
    start = time.perf_counter()
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({**record, "id": f"r{i}"}) + "\n")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    n = args.requests
    with tempfile.TemporaryDirectory() as tmp, ScriptedTeacherServer(models=["bench"]) as server:
        reference = asyncio.run(bare_openai(server.base_url, n, args.concurrency))
        cold = asyncio.run(teacher_client(server.base_url, os.path.join(tmp, "cache.sqlite"), n, args.concurrency))
        asked = server.counts["chat"]
        warm = asyncio.run(teacher_client(server.base_url, os.path.join(tmp, "cache.sqlite"), n, args.concurrency))
        assert server.counts["chat"] == asked, "the warm run must be served from the cache"
        journal = journal_appends(os.path.join(tmp, "journal"), n)
        plain = plain_appends(os.path.join(tmp, "plain.jsonl"), n)
    rows = [("bare openai.AsyncOpenAI (reference)", reference), ("TeacherClient, cold cache", cold),
            ("TeacherClient, warm cache (rerun)", warm), ("plain write, no fsync (reference)", plain),
            ("SampleJournal append + fsync", journal)]
    print(f"{n} requests/records, concurrency {args.concurrency}, loopback scripted server")
    print(f"| {'what':<38} | {'seconds':>8} | {'per second':>10} |")
    print(f"| {'-' * 38} | {'-' * 8} | {'-' * 10} |")
    for name, seconds in rows:
        print(f"| {name:<38} | {seconds:8.3f} | {n / seconds:10.0f} |")


if __name__ == "__main__":
    main()
