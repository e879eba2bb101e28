"""A scripted OpenAI-compatible chat-completions server on loopback, standing in for a teacher LLM.

It speaks the real protocol (``POST /v1/chat/completions``, ``GET /v1/models``) over real
HTTP, so the production client (the ``openai`` package) is exercised end to end. Replies are
computed from the request: the server reads which generation template is asking (the
``# Task: <strategy>`` line every template starts with) and answers with a small, correct
Python problem/solution/tests in that strategy's reply format. The problem is derived from a
hash of the prompt (one per seed snippet), and later strategies (evol, unit tests, repair)
read the function name and multiplier back out of the problem text they are given.

Failure modes are driven by a script: :meth:`ScriptedTeacherServer.push` queues directives
that the next chat requests consume in order (``"429"``, ``"500"``, ``"503"``, ``"sleep"``,
``"bad_json"``, ``"empty_choices"``, ``"unparseable"``); ``wrong_solutions`` makes chosen
strategies answer with a solution that fails its own tests (``"evol_instruct:2"`` limits it
to the evolution that produces round 2), so the repair loop and evol discarding have work;
``canned`` answers prompts containing a given text with a fixed reply (e.g. a benchmark
solution, for decontamination tests).

Usage::

    with ScriptedTeacherServer(models=["teacher-a"]) as server:
        server.push("429", "ok")
        ... TeacherConfig(base_url=server.base_url, model="teacher-a", ...)
        assert server.counts["chat"] == 2
"""
from __future__ import annotations

import collections
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TASK_LINE = re.compile(r"^# Task: ([a-z_]+)\s*$", re.MULTILINE)
FUNCTION_NAME = re.compile(r"\b(scale_sum_[0-9a-f]{6})\b")
MULTIPLIER = re.compile(r"returns (\d+) times the sum")
ROUND_MARK = re.compile(r"Additional requirement (\d+):")


class ScriptedTeacherServer:
    """Threaded HTTP server; ``base_url`` is ``http://127.0.0.1:PORT/v1`` on a free port."""

    def __init__(self, models=("test-teacher",), delay_s: float = 0.0, sleep_s: float = 2.0,
                 wrong_solutions=(), fingerprint: str = "fp_test_1", canned=()):
        self.models = list(models)
        # (strategy, text, reply): a request of that strategy's template whose prompt contains the text
        # is answered with the reply verbatim, like a teacher reciting what it memorized.
        self.canned = list(canned)
        self.delay_s = delay_s          # added to every chat reply (makes kill -9 tests catchable)
        self.sleep_s = sleep_s          # how long a "sleep" directive stalls (longer than the client timeout)
        self.wrong_solutions = set(wrong_solutions)
        self.fingerprint = fingerprint
        self.counts: collections.Counter = collections.Counter()
        self.requests: list[dict] = []  # bodies of chat requests, in arrival order
        self.in_flight = 0
        self.max_in_flight = 0          # most chat requests being served at once
        self._script: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "ScriptedTeacherServer":
        handler = type("Handler", (_Handler,), {"server_state": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "ScriptedTeacherServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    # -- script --------------------------------------------------------------------------------
    def push(self, *directives: str) -> None:
        """Queue directives; each chat request consumes one (``"ok"`` when the queue is empty)."""
        known = {"ok", "429", "500", "503", "sleep", "bad_json", "empty_choices", "unparseable"}
        unknown = set(directives) - known
        assert not unknown, f"unknown directives {unknown}; known: {sorted(known)}"
        with self._lock:
            self._script.extend(directives)

    def next_directive(self, body: dict) -> str:
        with self._lock:
            self.counts["chat"] += 1
            self.requests.append(body)
            return self._script.popleft() if self._script else "ok"

    def chat_count(self, task: str) -> int:
        """How many chat requests came from the template of strategy ``task``."""
        return sum(1 for body in self.requests if task_of(body) == task)


class _Handler(BaseHTTPRequestHandler):
    server_state: ScriptedTeacherServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        state = self.server_state
        if self.path.rstrip("/") != "/v1/models":
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        with state._lock:
            state.counts["models"] += 1
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "test"} for m in state.models]
        self._send(200, {"object": "list", "data": data})

    def do_POST(self) -> None:
        state = self.server_state
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        if body.get("model") not in state.models:
            with state._lock:
                state.counts["chat_unknown_model"] += 1
            return self._send(404, {"error": {"message": f"model {body.get('model')!r} not found"}})
        directive = state.next_directive(body)
        with state._lock:
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            self._reply(directive, body)
        finally:
            with state._lock:
                state.in_flight -= 1

    def _reply(self, directive: str, body: dict) -> None:
        state = self.server_state
        time.sleep(state.delay_s)
        if directive == "429":
            return self._send(429, {"error": {"message": "rate limited"}}, {"retry-after-ms": "20", "retry-after": "1"})
        if directive in ("500", "503"):
            return self._send(int(directive), {"error": {"message": "server error"}})
        if directive == "bad_json":
            return self._send_raw(200, b'{"id": "x", "choices": [ {"mess')
        if directive == "sleep":
            time.sleep(state.sleep_s)
        if directive == "empty_choices":
            return self._send(200, completion(body, None, state.fingerprint) | {"choices": []})
        content = "I am sorry, I cannot help with that." if directive == "unparseable" else reply_for(body, state)
        self._send(200, completion(body, content, state.fingerprint))

    def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
        self._send_raw(status, json.dumps(payload).encode(), headers)

    def _send_raw(self, status: int, raw: bytes, headers: dict | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(raw)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass


def completion(body: dict, content: str | None, fingerprint: str) -> dict:
    prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
    completion_tokens = len((content or "").split())
    return {
        "id": "chatcmpl-" + hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12],
        "object": "chat.completion", "created": int(time.time()), "model": body.get("model"),
        "system_fingerprint": fingerprint,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def task_of(body: dict) -> str | None:
    for message in body.get("messages", []):
        match = TASK_LINE.search(str(message.get("content", "")))
        if match:
            return match.group(1)
    return None


def user_text(body: dict) -> str:
    return "\n".join(str(m.get("content", "")) for m in body.get("messages", []) if m.get("role") == "user")


# -- canned, correct answers -----------------------------------------------------------------

def problem_params(prompt: str) -> tuple[str, int]:
    """(function name, multiplier): read back from a given problem, else derived from the prompt."""
    name, mult = FUNCTION_NAME.search(prompt), MULTIPLIER.search(prompt)
    if name and mult:
        return name.group(1), int(mult.group(1))
    digest = hashlib.sha1(prompt.encode()).hexdigest()
    return f"scale_sum_{digest[:6]}", 2 + int(digest[6:8], 16) % 7


def function_code(name: str, mult: int, wrong: bool) -> str:
    return f"def {name}(xs):\n    return {mult} * sum(xs){' + 1' if wrong else ''}\n"


def asserts(name: str, mult: int) -> str:
    cases = ([1, 2, 3], [], [-4, 10])
    return "".join(f"assert {name}({c}) == {mult * sum(c)}\n" for c in cases)


def problem_text(name: str, mult: int) -> str:
    return (f"Write a Python function `{name}(xs)` that returns {mult} times the sum of the integers "
            f"in the list `xs` (0 for an empty list).")


def fenced(code: str, lang: str = "python") -> str:
    return f"```{lang}\n{code}```"


def reply_for(body: dict, state: ScriptedTeacherServer) -> str:
    task, prompt = task_of(body), user_text(body)
    for canned_task, text, reply in state.canned:
        if task == canned_task and text in prompt:
            return reply
    name, mult = problem_params(prompt)
    wrong = task in state.wrong_solutions
    if task == "evol_instruct":
        return _evol_reply(prompt, name, mult, state)
    if task == "unit_tests":
        return f"Here are the tests.\n\n## Tests\n{fenced(asserts(name, mult))}\n"
    if task == "repair":
        return f"## Solution\n{fenced(function_code(name, mult, wrong))}\n\n## Explanation\nDropped the +1.\n"
    if task == "humaneval_style":
        return _humaneval_reply(name, mult, wrong)
    if task == "livecodebench_style":
        return _livecodebench_reply(mult, wrong)
    if task == "textbook":
        return _textbook_reply(name, mult)
    return (f"## Problem\n{problem_text(name, mult)}\n\n## Solution\n{fenced(function_code(name, mult, wrong))}\n\n"
            f"## Tests\n{fenced(asserts(name, mult))}\n\n## Difficulty\neasy\n\n## Concepts\nlists, arithmetic\n")


def _evol_reply(prompt: str, name: str, mult: int, state: ScriptedTeacherServer) -> str:
    rounds = [int(r) for r in ROUND_MARK.findall(prompt)]
    new_round = max(rounds, default=0) + 1
    wrong = "evol_instruct" in state.wrong_solutions or f"evol_instruct:{new_round}" in state.wrong_solutions
    earlier = "".join(f"\nAdditional requirement {r}: keep the result an integer." for r in sorted(set(rounds)))
    problem = problem_text(name, mult) + earlier + f"\nAdditional requirement {new_round}: keep the result an integer."
    tests = asserts(name, mult) + f"assert isinstance({name}([{new_round}]), int)\n"
    return (f"```markdown\n## Problem\n{problem}\n\n## Solution\n{fenced(function_code(name, mult, wrong))}\n\n"
            f"## Tests\n{fenced(tests)}\n\n## Difficulty\nmedium\n```\n")


def _humaneval_reply(name: str, mult: int, wrong: bool) -> str:
    prompt = (f"def {name}(xs: list) -> int:\n    \"\"\"Return {mult} times the sum of xs.\n"
              f"    >>> {name}([1, 2])\n    {3 * mult}\n    \"\"\"\n")
    body = f"    return {mult} * sum(xs){' + 1' if wrong else ''}\n"
    check = "def check(candidate):\n" + "".join(
        f"    assert candidate({c}) == {mult * sum(c)}\n" for c in ([1, 2], [], [5, -5, 7]))
    return (f"## Prompt\n{fenced(prompt)}\n\n## Solution\n{fenced(prompt + body)}\n\n"
            f"## Tests\n{fenced(check)}\n\n## Entry Point\n`{name}`\n")


def _livecodebench_reply(mult: int, wrong: bool) -> str:
    solution = f"nums = list(map(int, input().split()))\nprint({mult} * sum(nums){' + 1' if wrong else ''})\n"
    examples = [{"input": "1 2 3\n", "output": f"{6 * mult}\n"}, {"input": "5\n", "output": f"{5 * mult}\n"}]
    return (f"## Problem\nRead integers on one line and print {mult} times their sum.\n\n"
            f"## Solution\n{fenced(solution)}\n\n## Examples\n{fenced(json.dumps(examples) + chr(10), 'json')}\n")


def _textbook_reply(name: str, mult: int) -> str:
    return ("# Summing a list, scaled\n\nAdding up a list is the simplest reduction: start from zero and add "
            "each element in turn. Python's built-in `sum` does exactly this in C, so it is both shorter and "
            "faster than an explicit loop. Scaling the total afterwards costs one multiplication, whereas "
            "scaling every element first costs one per element and gives the same answer because "
            "multiplication distributes over addition.\n\n"
            f"{fenced(function_code(name, mult, False))}\n\nThe empty list sums to zero, so the function "
            "needs no special case for it.\n")
