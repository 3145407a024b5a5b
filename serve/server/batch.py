"""Offline batch (`s3 batch`): a file of OpenAI Batch API requests answered by the server in-process, as
`vllm run-batch` does.

Input, one JSON object per line: ``{"custom_id": "...", "method": "POST", "url": "/v1/chat/completions" or
"/v1/completions", "body": {...}}`` (custom ids unique). Output, one line per request, written as its answer is
ready: ``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``, the body as the HTTP
server would have answered (an error body with its status for a request it refuses), or ``response: null`` and an
``error`` for a line that is no request at all. A run cut short keeps every line it wrote; run again with the same
output, it answers only the requests not in it yet, and again those that failed for a reason of the server's (a
5xx or a 429), their old lines removed (`keep_final_answers`).

Every request goes to the app at once, through the same handlers as HTTP (an ASGI transport, no socket), with the
queue sized to hold them all: the scheduler sees the whole batch, so a predictive policy orders and packs all of
it, as in `s3 bench`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Callable

import httpx
from tqdm import tqdm

from core.files import exclusive, replacing
from core.records import utf8_encodable
from serve.server.launch import ServingStack

URLS = ("/v1/completions", "/v1/chat/completions")


@dataclasses.dataclass(frozen=True)
class BatchRequest:
    custom_id: str
    url: str
    body: dict
    problem: str | None = None
    """Why this line cannot be sent (a bad method, url or body), answered as an error line."""


@dataclasses.dataclass
class BatchSummary:
    num_requests: int
    num_skipped: int
    """Already answered in the output by an earlier run."""
    num_ok: int = 0
    num_failed: int = 0
    num_retriable: int = 0
    """Of the failed, those a rerun tries again (a 5xx or a 429: the server's doing, not the request's)."""
    errors: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    """The failed requests' error messages, counted (each request's is in the output)."""
    num_completion_tokens: int = 0
    elapsed_s: float = 0.0
    predictions: str | None = None
    """How the length predictor did on these requests (`PredictionOutcomes.summary`); None without one."""


def read_batch(path: str | Path) -> list[BatchRequest]:
    """The requests of an input file; a line that is not JSON or has no custom_id, or a custom_id given twice,
    makes the whole file an error (its answer could not be told apart)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"batch input {path} does not exist")
    requests, seen = [], set()
    # Lines end at "\n" only: JSON strings may hold U+2028 and its kin raw, which str.splitlines() breaks at.
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}, line {number}: not JSON ({exc})") from None
        custom_id = row.get("custom_id") if isinstance(row, dict) else None
        if not isinstance(custom_id, str) or not custom_id or not _encodable(custom_id):
            raise ValueError(f"{path}, line {number}: every request needs a non-empty string custom_id (valid "
                             "UTF-8: no unpaired surrogate)")
        if custom_id in seen:
            raise ValueError(f"{path}, line {number}: custom_id {custom_id!r} is used twice")
        seen.add(custom_id)
        requests.append(_request(row, custom_id))
    return requests


def _request(row: dict, custom_id: str) -> BatchRequest:
    url, body = row.get("url"), row.get("body")
    problem = None
    if row.get("method", "POST") != "POST":
        problem = f"method must be POST, got {row.get('method')!r}"
    elif url not in URLS:
        problem = f"url must be one of {', '.join(URLS)}, got {url!r}"
    elif not isinstance(body, dict):
        problem = "body must be a JSON object (the request as it would be POSTed)"
    elif body.get("stream"):
        problem = "stream is not supported in a batch (each answer is written whole)"
    elif not _encodable(body):
        problem = "body holds a value JSON cannot send (NaN, Infinity, or an unpaired surrogate in a string)"
    return BatchRequest(custom_id, str(url), body if isinstance(body, dict) else {}, problem)


def _encodable(value) -> bool:
    """Whether ``value`` can be sent as standard JSON in UTF-8 (Python's parser reads NaN and lone surrogates)."""
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
    except ValueError:
        return False
    return utf8_encodable(text)


def keep_final_answers(path: str | Path) -> set[str]:
    """Rewrite an output file (atomically, and only if something changes) without the lines a rerun should redo: a
    torn last line from a run cut short (appending after it would spoil the next answer's line too) and the
    answers that failed for a reason of the server's, not the request's (a 5xx or a 429, or an exception while
    sending it), so the rerun tries those requests again; also a second answer to one custom id (two runs into one
    file), and a last line written whole but for its newline (the next answer would be glued onto it). Returns the
    custom ids it keeps. A file with other lines than answers (anywhere but a torn last line) is refused, not
    rewritten: it is not this command's output."""
    path = Path(path)
    if not path.exists():
        return set()
    text = path.read_text(encoding="utf-8")
    kept, ids, dropped = [], set(), bool(text) and not text.endswith("\n")
    lines = [line for line in text.split("\n") if line]
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not (isinstance(record, dict) and {"custom_id", "response", "error"} <= set(record)):
            if number < len(lines):
                raise ValueError(f"{path}, line {number}, is not a batch answer (custom_id, response, error): it "
                                 "is not an `s3 batch` output file; name another one")
            dropped = True  # the torn last line of a run cut short
            continue
        if _transient(record) or record["custom_id"] in ids:
            dropped = True
            continue
        kept.append(line)
        ids.add(record["custom_id"])
    if dropped:
        with replacing(path) as tidy:
            tidy.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    return ids


def check_paths(input_path: str | Path, output_path: str | Path) -> None:
    """Refuse an output file that is the input file: every request would read as answered, and the input be lost."""
    if Path(output_path).resolve() == Path(input_path).resolve():
        raise ValueError(f"the output file {output_path} is the input file: name another one (answers are appended "
                         "to it)")


def _transient(record: dict) -> bool:
    response = record.get("response")
    if response is None:
        return (record.get("error") or {}).get("code") == "internal_error"
    status = response.get("status_code") if isinstance(response, dict) else None
    return isinstance(status, int) and (status >= 500 or status == 429)


def output_lock(output_path: str | Path):
    """Held while a run writes ``output_path``: two runs into one file answered requests twice, and one's tidying
    (`keep_final_answers`) replaced the file the other was still appending to."""
    lock = Path(output_path).with_name(f".{Path(output_path).name}.lock")
    return exclusive(lock, f"another `s3 batch` is writing {output_path} (it holds {lock}); wait for it to end or "
                           "name another output file")


def run_batch(stack: ServingStack, input_path: str | Path, output_path: str | Path, *,
              progress: bool = True, locked: bool = False) -> BatchSummary:
    """Answer every request of ``input_path`` not yet in ``output_path`` (appended to it) with ``stack``, which
    this starts and stops; ``locked``: the caller holds `output_lock` already."""
    requests = read_batch(input_path)
    check_paths(input_path, output_path)
    if locked:
        return _run_batch(stack, requests, output_path, progress=progress)
    with output_lock(output_path):
        return _run_batch(stack, requests, output_path, progress=progress)


def _run_batch(stack: ServingStack, requests: list[BatchRequest], output_path: str | Path, *,
               progress: bool) -> BatchSummary:
    done = keep_final_answers(output_path)
    todo = [r for r in requests if r.custom_id not in done]
    summary = BatchSummary(len(requests), len(requests) - len(todo))
    # The whole batch waits in the engine's queue rather than meeting a 429.
    engine = stack.state.engine
    engine.max_waiting_requests = max(engine.max_waiting_requests, sum(_num_choices(r.body) for r in todo))
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request would bury the progress bar
    start = time.perf_counter()
    stack.start()
    try:
        with output_path.open("a", encoding="utf-8") as out, \
                tqdm(total=len(todo), unit="request", desc="batch", disable=not progress) as bar:
            def write(record: dict) -> None:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()  # a run cut short keeps every answer written
                bar.update()
                _count(summary, record)

            asyncio.run(_answer_all(stack, todo, write))
    finally:
        stack.stop()
    summary.elapsed_s = time.perf_counter() - start
    if stack.engine_loop.outcomes is not None:
        summary.predictions = stack.engine_loop.outcomes.summary()
    return summary


async def _answer_all(stack: ServingStack, requests: list[BatchRequest], write: Callable[[dict], None]) -> None:
    key = stack.state.api_key
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    transport = httpx.ASGITransport(app=stack.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://s3-batch", timeout=None) as client:
        async def answer(request: BatchRequest) -> None:
            if request.problem is not None:
                write(_record(request, None, error={"code": "invalid_request", "message": request.problem}))
                return
            try:
                response = await client.post(request.url, json=request.body, headers=headers)
            except Exception as exc:  # one line's failure is that line's answer, not the end of the batch
                write(_record(request, None, error={"code": "internal_error", "message": repr(exc)}))
                return
            try:
                body = response.json()
            except json.JSONDecodeError:
                body = {"error": {"message": response.text or f"HTTP {response.status_code}"}}
            if not isinstance(body, dict):
                body = {"error": {"message": f"HTTP {response.status_code}: not a JSON object"}}
            request_id = response.headers.get("x-request-id") or body.get("id")  # an error's too (OpenAI's batch)
            write(_record(request, {"status_code": response.status_code, "request_id": request_id, "body": body}))

        await asyncio.gather(*(answer(r) for r in requests))


def _record(request: BatchRequest, response: dict | None, error: dict | None = None) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": request.custom_id, "response": response,
            "error": error}


def _count(summary: BatchSummary, record: dict) -> None:
    response = record["response"]
    if response is None or response["status_code"] != 200:
        summary.num_failed += 1
        summary.num_retriable += _transient(record)
        summary.errors[_error_message(record)] += 1
        return
    summary.num_ok += 1
    summary.num_completion_tokens += (response["body"].get("usage") or {}).get("completion_tokens", 0)


def _error_message(record: dict) -> str:
    """A failed record's message, whatever shape its error took (a line read back may be any server's)."""
    response = record["response"] or {}
    body = response.get("body")
    error = record["error"] or (body.get("error") if isinstance(body, dict) else None) or {}
    if not isinstance(error, dict):
        return str(error)
    status = response.get("status_code")
    return str(error.get("message") or (f"HTTP {status}" if status is not None else "unknown error"))


def _num_choices(body: dict) -> int:
    """Engine requests a body makes at most (``n`` per prompt), for sizing the queue."""
    n = body.get("n")
    n = n if isinstance(n, int) and n > 0 else 1
    prompt = body.get("prompt")
    batch = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
    return n * batch
