"""benchmarks/load.py and load_report.py: requests decoded as the predictor's labels were made; per-request times and
the timeline plot."""

from __future__ import annotations

import pathlib
import sys
import time

import pytest


def test_request_frequency_penalty_follows_the_predictor(import_benchmark, monkeypatch):
    load = import_benchmark("load", "load_report")
    from pipeline.generate import GenerateConfig

    assert load.request_frequency_penalty(load.LoadConfig()) == GenerateConfig.frequency_penalty
    assert load.request_frequency_penalty(load.LoadConfig(frequency_penalty=0.0)) == 0.0

    class Info:
        decoding = {"frequency_penalty": 1.25}

    monkeypatch.setattr("predictor_train.checkpoint.read_info", lambda path: Info)
    assert load.request_frequency_penalty(load.LoadConfig(predictor="some/checkpoint")) == 1.25


def test_per_request_times_and_timeline(import_benchmark, tmp_path):
    report = import_benchmark("load_report")
    # Three requests sent at 10, 11 and 12 s; the second never got a first token before it failed.
    results = [report.Result("a", num_tokens=5, start=10.0, first_token=10.5, end=13.0),
               report.Result("b", start=11.0, end=11.2, error="500: boom"),
               report.Result("c", num_tokens=2, start=12.0, first_token=14.0, end=15.0)]
    row = report.summarise("paged", results, wall=5.0, metrics={}, max_tokens=8)
    assert [r["sent_s"] for r in row["per_request"]] == [0.0, 1.0, 2.0]
    assert [r["ttft_s"] for r in row["per_request"]] == [0.5, None, 2.0]  # a failed request has no times
    assert [r["latency_s"] for r in row["per_request"]] == [3.0, None, 3.0]
    assert row["per_request"][1]["error"] == "500: boom"
    assert row["per_request"][1]["answer_sha1"] is None and len(row["per_request"][0]["answer_sha1"]) == 16
    # TPOT: (3.0 - 0.5) / 4 for "a", (3.0 - 2.0) / 1 for "c" (p99 interpolated between the two, as numpy does);
    # in the server: (3 + 3) s of latency over 5 s
    assert row["mean_tpot_s"] == pytest.approx((0.625 + 1.0) / 2)
    assert row["p99_tpot_s"] == pytest.approx(0.625 + 0.99 * 0.375)
    assert row["mean_in_system"] == pytest.approx(6.0 / 5.0) and "TPOT" in report.format_table([row])
    assert row["server_mean_tpot_s"] != row["server_mean_tpot_s"]  # NaN: the server gave no figure
    assert row["mean_step_s"] != row["mean_step_s"] and row["step_share"] != row["step_share"]
    metrics = {"s3_time_per_output_token_seconds_sum": 1.5, "s3_time_per_output_token_seconds_count": 2.0,
               "s3_engine_steps_total": 4.0, "s3_engine_step_seconds_total": 1.0, "s3_batched_sequences_total": 10.0,
               "s3_batched_tokens_total": 30.0, "s3_unfamiliar_prompts_total": 1.0,
               "s3_prompt_familiarity_count": 4.0}
    served = report.summarise("paged", results, wall=5.0, metrics=metrics, max_tokens=8)
    assert served["unfamiliar_share"] == 0.25 and row["unfamiliar_share"] != row["unfamiliar_share"]
    assert (served["server_mean_tpot_s"], served["mean_step_s"]) == (0.75, 0.25)
    assert (served["mean_running_batch"], served["mean_batched_tokens"]) == (2.5, 7.5)
    assert served["step_share"] == pytest.approx(1.0 / 5.0)  # 1 s of steps in a 5 s run
    assert "step" in report.format_table([served, row])
    ok = [r for r in row["per_request"] if r["error"] is None]
    assert report.waiting_over_time(ok) == ([0.0, 0.5, 2.0, 4.0], [1, 0, 1, 0])
    report.plot_timeline([row, {**row, "policy": "s3"}], tmp_path / "timeline.png", "test")
    assert (tmp_path / "timeline.png").stat().st_size > 0


KILLED_BENCHMARK = """
import sys
sys.path[:0] = [{root!r}, {benchmarks!r}]
import load
from tests.health_stub import start_and_wait

load.in_fresh_process(start_and_wait)
"""


def _alive(pid: int) -> bool:
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_benchmark_stops_its_client_and_server():
    """`kill` on load.py or load_sweep.py ends the processes it started (a policy's client, and the server that
    client started) as Ctrl-C does; the server used to be left running."""
    import os
    import signal
    import subprocess
    import time

    root = pathlib.Path(__file__).parents[1]
    script = KILLED_BENCHMARK.format(root=str(root), benchmarks=str(root / "benchmarks"))
    bench = subprocess.Popen([sys.executable, "-c", script], cwd=root, stdout=subprocess.PIPE, text=True)
    children = []
    try:
        children = [int(pid) for pid in bench.stdout.readline().split()]
        assert len(children) == 2 and all(_alive(pid) for pid in children)
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(30) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in children)
    finally:
        bench.kill()
        for pid in children:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_each_policy_is_served_from_a_fresh_process(import_benchmark):
    """The client of each policy runs in a process of its own: the result comes back, and so does an exception."""
    import os

    load = import_benchmark("load")
    assert load.in_fresh_process(os.getpid) != os.getpid()
    with pytest.raises(ValueError, match="invalid literal"):
        load.in_fresh_process(int, "not a number")


def test_answers_are_compared_prompt_by_prompt(import_benchmark):
    """A policy's answers against the reference run's, prompt by prompt: one answered in only one run counts as
    differing (its request failed in the other), and a fingerprint tells two texts apart without keeping them."""
    report = import_benchmark("load_report")
    reference = {"a": ("Hi there.", 3), "b": ("Two.", 2), "c": ("Long answer", 9)}
    assert report.answers_differing(reference, reference) == 0
    assert report.answers_differing({"a": ("Hi there.", 3), "b": ("Three.", 2)}, reference) == 2  # "c" failed here
    assert report.answers_differing({"a": ("Hi there.", 3), "d": ("New.", 2)}, reference) == 3
    assert report.answers_differing({}, reference) == 3  # every request failed: not "identical"
    assert report.answer_fingerprint("Two.") == report.answer_fingerprint("Two.") != report.answer_fingerprint("Three.")


def test_each_record_counts_its_answers_unlike_the_first_policys(import_benchmark, monkeypatch):
    load = import_benchmark("load", "load_report")
    texts = {"paged": {"a": "x", "b": "y"}, "s3": {"a": "x", "b": "z"}}

    def serve(fn, cfg, policy, prompts, **kwargs):
        results = [load.Result(p, text=texts[policy][p], num_tokens=1, start=0.0, first_token=1.0, end=1.0)
                   for p in prompts]
        return load.summarise(policy, results, wall=1.0, metrics={}, max_tokens=8)

    monkeypatch.setattr(load, "load_prompts", lambda *args: ["a", "b"])
    monkeypatch.setattr(load, "in_fresh_process", serve)
    said = []
    rows = load.benchmark(load.LoadConfig(policies=("paged", "s3"), predictor="ckpt", frequency_penalty=0.5,
                                          num_requests=2), echo=said.append)
    assert [(r["policy"], r["answers_differing"]) for r in rows] == [("paged", 0), ("s3", 1)]
    assert "answers unlike paged's: paged 0, s3 1" in said[-1]


def test_urgent_requests_are_marked_sent_with_their_priority_and_reported_apart(import_benchmark):
    load = import_benchmark("load", "load_report")
    cfg = load.LoadConfig(num_requests=10, urgent_share=0.3, seed=1)
    urgent = load.urgent_requests(cfg)
    assert len(urgent) == 3 and urgent == load.urgent_requests(cfg)  # drawn with the seed: every policy alike
    assert load._priority(cfg, True) == {"urgent": True, "priority": -1}
    ignoring = load.LoadConfig(num_requests=10, urgent_share=0.3, seed=1, honour_priorities=False)
    assert load._priority(ignoring, True) == {"urgent": True, "priority": 0}
    assert load.serve_config(cfg, "paged", 8000, oracle_lengths=None, feedback_dir="x").priority_scheduling
    assert not load.serve_config(ignoring, "paged", 8000, oracle_lengths=None, feedback_dir="x").priority_scheduling
    results = [load.Result("a", num_tokens=5, start=0.0, first_token=0.5, end=2.0, urgent=True),
               load.Result("b", num_tokens=5, start=1.0, first_token=4.0, end=6.0)]
    row = load.summarise("paged", results, wall=6.0, metrics={}, max_tokens=8)
    assert row["classes"]["urgent"]["mean_ttft_s"] == 0.5 and row["classes"]["normal"]["mean_latency_s"] == 5.0
    assert [r["urgent"] for r in row["per_request"]] == [True, False] and "urgent (1)" in load.format_table([row])


@pytest.mark.parametrize("bad", [dict(policies=("max", "foo")), dict(policies=()), dict(mode="poisson", rate=0.0),
                                 dict(concurrency=0), dict(urgent_share=1.5), dict(aging_s=float("nan"))])
def test_settings_are_refused_before_any_server_starts(import_benchmark, bad):
    load = import_benchmark("load", "load_report")
    with pytest.raises(ValueError):
        load.LoadConfig(**bad)


def test_a_policy_whose_every_request_failed_is_still_a_row(import_benchmark):
    """Its ratio to itself was 0 / 0 and stopped the benchmark before anything was written."""
    report = import_benchmark("load_report")
    failed = [report.Result(str(i), start=0.0, end=1.0, error="400: bad") for i in range(3)]
    row = report.summarise("max", failed, wall=1.0, metrics={}, max_tokens=8)
    assert row["tokens_per_s"] == 0 and "max" in report.format_table([row])


def test_the_warm_up_request_is_not_timed(import_benchmark, monkeypatch):
    import asyncio

    load = import_benchmark("load", "load_report")
    sent = []

    async def one_request(http, prompt, max_tokens, *args, **kwargs):
        sent.append(prompt)
        await asyncio.sleep(0.3 if prompt == "Say hi." else 0.0)
        return load.Result(prompt, num_tokens=1, start=0.0, first_token=0.0, end=0.0)

    monkeypatch.setattr(load, "one_request", one_request)
    results, wall = asyncio.run(load.run_load("http://127.0.0.1:9", ["a", "b"], load.LoadConfig(num_requests=2)))
    assert sent[0] == "Say hi." and [r.prompt for r in results] == ["a", "b"] and wall < 0.2


def _streaming(load, events: list[str], status: int = 200):
    """An httpx client whose every POST answers ``events`` as a server-sent event stream."""
    import httpx

    body = "".join(f"data: {e}\n\n" for e in events).encode()
    transport = httpx.MockTransport(lambda request: httpx.Response(status, content=body))
    return httpx.AsyncClient(base_url="http://test", transport=transport)


def test_an_error_inside_the_stream_fails_the_request(import_benchmark):
    """An engine failure after the 200 comes as an error event and [DONE]: the request failed, it is no success cut
    short (it was counted in the latencies, and its prompt in the answers compared)."""
    import asyncio
    import json

    load = import_benchmark("load", "load_report")
    chunk = json.dumps({"choices": [{"delta": {"content": "Hello"}}]})
    error = json.dumps({"error": {"message": "the engine stopped", "type": "server_error", "code": 503}})

    async def ask(events):
        async with _streaming(load, events) as http:
            return await load.one_request(http, "p", 8)

    failed = asyncio.run(ask([chunk, error, "[DONE]"]))
    assert failed.error and "the engine stopped" in failed.error
    row = load.summarise("paged", [failed], wall=1.0, metrics={}, max_tokens=8)
    assert row["errors"] == 1 and row["answers"] == {}
    usage = json.dumps({"choices": [], "usage": {"completion_tokens": 1}})
    assert asyncio.run(ask([chunk, usage, "[DONE]"])).error is None
    assert "JSONDecodeError" in asyncio.run(ask([chunk, "{not json"])).error  # this request fails, not the run


def test_an_open_loop_times_each_request_from_its_arrival(import_benchmark, monkeypatch):
    """A client that falls behind its arrivals (its event loop busy) still counts the wait, and sends no later
    request earlier to catch up on the schedule; nothing after the last arrival is counted as the run's time."""
    import asyncio

    load = import_benchmark("load", "load_report")
    cfg = load.LoadConfig(num_requests=4, mode="poisson", rate=20.0, seed=3)
    offsets = load.arrival_offsets(cfg, 4)
    assert offsets[0] == 0.0 and offsets == sorted(offsets) and offsets == load.arrival_offsets(cfg, 4)

    events, sleep = [], asyncio.sleep

    async def recorded_sleep(seconds, *args):
        events.append("sleep")
        return await sleep(seconds, *args)

    async def one_request(http, prompt, max_tokens, *args, scheduled=None, **kwargs):
        now = time.perf_counter()
        if scheduled is None:  # the warm-up
            return load.Result(prompt)
        events.append(prompt)
        time.sleep(0.15 if prompt == "a" else 0.0)  # blocks the loop: the next ones go out late
        return load.Result(prompt, num_tokens=1, start=scheduled, first_token=now, end=time.perf_counter(),
                           send_lag=now - scheduled)

    monkeypatch.setattr(load, "one_request", one_request)
    monkeypatch.setattr(asyncio, "sleep", recorded_sleep)
    called = time.perf_counter()
    results, wall = asyncio.run(load.run_load("http://127.0.0.1:9", ["a", "b", "c", "d"], cfg))
    returned = time.perf_counter()
    start = results[0].start
    assert [r.start - start for r in results] == pytest.approx(offsets)
    assert results[1].send_lag > 0.1 - offsets[1] and results[1].ttft >= results[1].send_lag
    # From the first arrival to the last answer's end (bounds, not a tolerance), with no wait after the last
    # arrival (a sleep of one more gap once the last request was sent was counted in the wall time).
    assert max(r.end for r in results) - start <= wall <= returned - called
    assert events[-1] == "d" and events.count("sleep") == 4


def test_the_servers_counters_leave_out_the_warm_up(import_benchmark):
    load = import_benchmark("load", "load_report")
    before = {"s3_preemptions_total": 1.0, "s3_engine_step_seconds_total": 0.5, "s3_kv_blocks_capacity": 100.0,
              "s3_time_per_output_token_seconds_count": 1.0, 's3_latency_seconds_bucket{le="1"}': 1.0}
    after = {"s3_preemptions_total": 4.0, "s3_engine_step_seconds_total": 2.5, "s3_kv_blocks_capacity": 100.0,
             "s3_time_per_output_token_seconds_count": 9.0, 's3_latency_seconds_bucket{le="1"}': 3.0}
    assert load.counted_since(after, before) == {
        "s3_preemptions_total": 3.0, "s3_engine_step_seconds_total": 2.0, "s3_kv_blocks_capacity": 100.0,
        "s3_time_per_output_token_seconds_count": 8.0, 's3_latency_seconds_bucket{le="1"}': 2.0}
    row = load.summarise("paged", [load.Result("a", num_tokens=1, end=1.0)], wall=1.0,
                         metrics=load.counted_since(after, before), max_tokens=8)
    assert row["num_preemptions"] == 3 and isinstance(row["num_preemptions"], int)


def test_each_finished_policy_is_saved_before_the_next_runs(import_benchmark, monkeypatch):
    load = import_benchmark("load", "load_report")
    saved = []

    def serve(fn, cfg, policy, prompts, **kwargs):
        if policy == "s3":
            raise KeyboardInterrupt
        results = [load.Result(p, text="x", num_tokens=1, start=0.0, first_token=1.0, end=1.0) for p in prompts]
        return load.summarise(policy, results, wall=1.0, metrics={}, max_tokens=8)

    monkeypatch.setattr(load, "load_prompts", lambda *args: ["a", "b"])
    monkeypatch.setattr(load, "in_fresh_process", serve)
    cfg = load.LoadConfig(policies=("paged", "s3"), predictor="ckpt", frequency_penalty=0.5, num_requests=2)
    with pytest.raises(KeyboardInterrupt):
        load.benchmark(cfg, echo=lambda *a: None, save=lambda rows: saved.append([r["policy"] for r in rows]))
    assert saved == [["paged"]]
