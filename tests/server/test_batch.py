"""Offline batch (`s3 batch`, serve/server/batch.py): OpenAI Batch API lines answered in-process through the
server's own handlers, errors as lines, and a second run answering only what the first did not."""

from __future__ import annotations

import json

import pytest

from pipeline.cli import load_predictor_checkpoint
from serve.server.batch import read_batch, run_batch
from serve.server.launch import build_stack
from tests.engine.engine_driver import tiny_llama
from tests.server.fakes import EOS_ID, CharTokenizer, FakePredictor, serve_config

LINES = [
    {"custom_id": "a", "method": "POST", "url": "/v1/completions",
     "body": {"model": "tiny", "prompt": "Once upon", "max_tokens": 5, "temperature": 0}},
    {"custom_id": "b", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "n": 2,
              "temperature": 1.0, "seed": 3}},
    {"custom_id": "c", "url": "/v1/completions", "body": {"model": "tiny", "prompt": ["x", "y"], "max_tokens": 3}},
    {"custom_id": "too hot", "url": "/v1/completions", "body": {"model": "tiny", "prompt": "a", "temperature": 5}},
    {"custom_id": "nowhere", "url": "/v1/embeddings", "body": {"model": "tiny", "input": "a"}},
    {"custom_id": "streamed", "url": "/v1/completions", "body": {"model": "tiny", "prompt": "a", "stream": True}},
]  # fmt: skip


def stack(tmp_path):
    model = tiny_llama()
    model.generation_config.eos_token_id = EOS_ID
    return build_stack(serve_config(tmp_path), model=model, tokenizer=CharTokenizer(),
                       predictor=FakePredictor(bucket=0), load_checkpoint=load_predictor_checkpoint)


def write_lines(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_a_batch_is_answered_line_by_line_and_resumed(tmp_path):
    source, answers = tmp_path / "in.jsonl", tmp_path / "out" / "answers.jsonl"
    write_lines(source, LINES[:5])
    served = stack(tmp_path)
    summary = run_batch(served, source, answers, progress=False)
    assert (summary.num_ok, summary.num_failed, summary.num_skipped) == (3, 2, 0)
    records = {r["custom_id"]: r for r in map(json.loads, answers.read_text().splitlines())}
    assert set(records) == {"a", "b", "c", "too hot", "nowhere"}
    a = records["a"]["response"]
    assert a["status_code"] == 200 and a["request_id"] == a["body"]["id"] and records["a"]["error"] is None
    assert a["body"]["object"] == "text_completion" and a["body"]["usage"]["prompt_tokens"] == len("Once upon")
    assert [c["index"] for c in records["b"]["response"]["body"]["choices"]] == [0, 1]
    assert len(records["c"]["response"]["body"]["choices"]) == 2  # a batch of prompts inside a batch line
    assert records["too hot"]["response"]["status_code"] == 400
    assert records["too hot"]["response"]["body"]["error"]["param"] == "temperature"
    assert records["too hot"]["response"]["request_id"].startswith("err-")  # an error's line names its request too
    assert records["nowhere"]["response"] is None and "url must be one of" in records["nowhere"]["error"]["message"]
    assert summary.num_completion_tokens == sum(records[k]["response"]["body"]["usage"]["completion_tokens"]
                                                for k in "abc")
    assert summary.predictions == served.engine_loop.outcomes.summary()  # how the length predictor did
    assert set(summary.errors) == {records["too hot"]["response"]["body"]["error"]["message"],
                                   records["nowhere"]["error"]["message"]}  # counted for the command's last lines

    write_lines(source, LINES)  # one more line: only it is answered
    again = run_batch(stack(tmp_path), source, answers, progress=False)
    assert (again.num_ok, again.num_failed, again.num_skipped) == (0, 1, 5)
    lines = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(lines) == 6 and "stream is not supported" in lines[-1]["error"]["message"]


def test_a_line_json_cannot_send_is_that_lines_error_and_u2028_is_no_line_end(tmp_path):
    # Python's parser reads NaN and lone surrogates, which no request can carry; and JSON strings may hold U+2028
    # raw, which str.splitlines() would break a line at, in the input and in the answers read back on resuming.
    source, answers = tmp_path / "in.jsonl", tmp_path / "answers.jsonl"
    good = {"model": "tiny", "prompt": "a\u2028b", "max_tokens": 3, "temperature": 0, "echo": True}
    source.write_text("\n".join([
        json.dumps({"custom_id": "nan", "url": "/v1/completions", "body": {"model": "tiny", "prompt": "a", "temperature": float("nan")}}),
        '{"custom_id": "surrogate", "url": "/v1/completions", "body": {"model": "tiny", "prompt": "\\ud800"}}',
        json.dumps({"custom_id": "line\u2028separator", "url": "/v1/completions", "body": good}, ensure_ascii=False),
    ]) + "\n", encoding="utf-8")  # fmt: skip
    summary = run_batch(stack(tmp_path), source, answers, progress=False)
    assert (summary.num_ok, summary.num_failed) == (1, 2)
    records = {r["custom_id"]: r for r in map(json.loads, answers.read_text(encoding="utf-8").split("\n")[:-1])}
    assert "JSON cannot send" in records["nan"]["error"]["message"] and records["surrogate"]["response"] is None
    assert records["line\u2028separator"]["response"]["body"]["choices"][0]["text"].startswith("a\u2028b")
    again = run_batch(stack(tmp_path), source, answers, progress=False)
    assert (again.num_ok, again.num_failed, again.num_skipped) == (0, 0, 3)  # every line read back as answered


def test_a_rerun_retries_what_failed_on_the_servers_side_and_drops_a_torn_line(tmp_path):
    source, answers = tmp_path / "in.jsonl", tmp_path / "answers.jsonl"
    write_lines(source, LINES[:3])  # a, b, c
    ok = {"id": "batch_req_1", "custom_id": "a", "error": None,
          "response": {"status_code": 200, "request_id": "x", "body": {"choices": [], "usage": {}}}}
    crashed = {"id": "batch_req_2", "custom_id": "b", "error": None,  # the engine stopped mid-run: a 503
               "response": {"status_code": 503, "request_id": None, "body": {"error": {"message": "stopped"}}}}
    answers.write_text(json.dumps(ok) + "\n" + json.dumps(crashed) + "\n" + '{"id": "batch_req_3", "custom_')
    summary = run_batch(stack(tmp_path), source, answers, progress=False)
    assert (summary.num_ok, summary.num_failed, summary.num_skipped) == (2, 0, 1)
    records = [json.loads(line) for line in answers.read_text().splitlines()]  # every line whole
    assert sorted(r["custom_id"] for r in records) == ["a", "b", "c"] and records[0] == ok
    assert all(r["response"]["status_code"] == 200 for r in records)


def test_a_last_answer_without_its_newline_or_a_second_answer_is_tidied_before_appending(tmp_path):
    """A whole last answer without its newline was kept as it was, and the next answer appended onto its line (the
    file then refused on the next run); two runs into one file left answers twice, both kept."""
    source, answers = tmp_path / "in.jsonl", tmp_path / "answers.jsonl"
    write_lines(source, LINES[:3])
    ok = {"id": "batch_req_1", "custom_id": "a", "error": None,
          "response": {"status_code": 200, "request_id": "x", "body": {"choices": [], "usage": {}}}}
    answers.write_text(json.dumps(ok) + "\n" + json.dumps(ok))
    summary = run_batch(stack(tmp_path), source, answers, progress=False)
    assert (summary.num_ok, summary.num_skipped) == (2, 1)
    records = [json.loads(line) for line in answers.read_text().splitlines()]  # every line whole
    assert sorted(r["custom_id"] for r in records) == ["a", "b", "c"]


def test_two_runs_into_one_output_file_are_refused(tmp_path):
    from serve.server import batch

    source, answers = tmp_path / "in.jsonl", tmp_path / "answers.jsonl"
    write_lines(source, LINES[:1])
    with batch.output_lock(answers):
        with pytest.raises(ValueError, match="another `s3 batch` is writing"):
            run_batch(stack(tmp_path), source, answers, progress=False)
    assert not answers.exists()


def test_an_output_file_that_is_the_input_or_no_batch_output_is_refused(tmp_path):
    """The input as output read every request as answered (0 answered, the input appended to); any other file as
    output lost every line that was no answer."""
    from click.testing import CliRunner

    from pipeline.cli import main
    from serve.server.batch import check_paths, keep_final_answers

    source = tmp_path / "in.jsonl"
    write_lines(source, LINES[:1])
    with pytest.raises(ValueError, match="is the input file"):
        check_paths(source, tmp_path / "." / "in.jsonl")
    other = tmp_path / "notes.json"
    other.write_text('{\n  "a": 1\n}\n')
    with pytest.raises(ValueError, match="line 1, is not a batch answer"):
        keep_final_answers(other)
    assert other.read_text() == '{\n  "a": 1\n}\n'  # untouched
    for output in (source, other):  # refused before any model loads
        result = CliRunner().invoke(main, ["batch", str(source), "-o", str(output), "--policy", "paged"])
        assert result.exit_code == 2 and ("is the input file" in result.output or "not a batch answer" in result.output)


@pytest.mark.parametrize(("text", "words"), [
    ('{"custom_id": "a", "url": "/v1/completions", "body": {}}\nnot json\n', "line 2: not JSON"),
    ('{"url": "/v1/completions", "body": {}}\n', "line 1: every request needs a non-empty string custom_id"),
    ('{"custom_id": "a", "body": {}}\n\n{"custom_id": "a", "body": {}}\n', "line 3: custom_id 'a' is used twice"),
])  # fmt: skip
def test_unusable_input_files_are_refused_naming_the_line(tmp_path, text, words):
    source = tmp_path / "in.jsonl"
    source.write_text(text)
    with pytest.raises(ValueError, match=words):
        read_batch(source)
    with pytest.raises(FileNotFoundError):
        read_batch(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(("record", "message"), [
    ({"response": None, "error": {"code": "invalid_request", "message": "no url"}}, "no url"),
    ({"response": None, "error": {"code": "x"}}, "unknown error"),
    ({"response": {"status_code": 503, "body": {"error": {"message": "busy"}}}, "error": None}, "busy"),
    ({"response": {"status_code": 500, "body": {}}, "error": None}, "HTTP 500"),
    ({"response": {"status_code": 502, "body": ["not", "a", "dict"]}, "error": None}, "HTTP 502"),
    ({"response": {"status_code": 400, "body": {"error": "plain text"}}, "error": None}, "plain text"),
])  # fmt: skip
def test_a_failed_line_is_counted_by_its_message_whatever_its_shape(record, message):
    from serve.server.batch import _error_message

    assert _error_message(record) == message


def test_the_command_exits_1_when_a_rerun_is_due(tmp_path, monkeypatch):
    """It exited 0 whatever failed, so a script could not tell that the engine had failed every line."""
    from click.testing import CliRunner

    import serve.server.batch as batch
    import serve.server.launch as launch
    from pipeline.cli import main

    source, answers = tmp_path / "in.jsonl", tmp_path / "answers.jsonl"
    write_lines(source, LINES[:1])

    def answered(stack, input_path, output_path, **kwargs):
        return batch.BatchSummary(1, 0, num_failed=1, num_retriable=retriable)

    monkeypatch.setattr(batch, "run_batch", answered)
    monkeypatch.setattr(launch, "build_stack", lambda *args, **kwargs: None)
    for retriable, code in ((1, 1), (0, 0)):
        result = CliRunner().invoke(main, ["batch", str(source), "--output", str(answers)])
        assert result.exit_code == code, result.output
    assert "run the same command again" not in result.output


def test_a_cancelled_handler_leaves_no_exception_unretrieved():
    """Ctrl-C in `s3 batch` cancelled every handler waiting on its answers; the answers' gathers then failed with
    nobody to retrieve them, and asyncio logged "exception was never retrieved" and a traceback for each (290,000
    lines for 3,000 requests)."""
    import asyncio
    import gc

    from serve.server import app

    class Request:
        async def receive(self):
            await asyncio.sleep(3600)  # the client never leaves

    async def answer():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RuntimeError("the engine stopped") from None

    said = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: said.append(context["message"]))
        handler = asyncio.ensure_future(app._unless_disconnected(Request(), asyncio.gather(answer())))
        await asyncio.sleep(0.05)
        handler.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handler
        await asyncio.sleep(0.05)
        gc.collect()

    asyncio.run(main())
    gc.collect()
    assert not said
