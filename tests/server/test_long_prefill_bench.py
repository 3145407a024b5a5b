"""benchmarks/long_prefill.py's scenario against a tiny server with tiny steps (the real run uses SmolLM2 and
configs/serve_cpu.yaml): the figures it reports, and the prefill cap reaching the engine from ServeConfig."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
from pathlib import Path

import pytest

from pipeline.config import load_config
from serve.server.config import ServeConfig
from tests.server.conftest import API_KEY
from tests.server.fakes import serve_config, start_server

ROOT = Path(__file__).parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("long_prefill", ROOT / "benchmarks/long_prefill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def capped_server(tmp_path_factory):
    """paged, no EOS, steps of at most 64 tokens with at most 16 prefill tokens per request."""
    config = serve_config(tmp_path_factory.mktemp("s3-capped"), policy="paged", kv_cache_tokens=4096,
                          max_new_tokens=400, max_num_seqs=4)
    engine = dataclasses.replace(config.engine, max_num_batched_tokens=64, long_prefill_token_threshold=16)
    srv = start_server(dataclasses.replace(config, engine=engine), eos=False)
    yield srv
    srv.stop()


def test_the_cap_reaches_the_scheduler(capped_server):
    scheduler_config = capped_server.stack.engine.scheduler.config
    assert (scheduler_config.max_num_batched_tokens, scheduler_config.long_prefill_token_threshold) == (64, 16)


def test_the_shipped_configs_cap_long_prefills():
    for name in ("serve_cpu", "serve_gpu"):
        engine = load_config(ServeConfig, ROOT / f"configs/{name}.yaml").engine
        assert 0 < engine.long_prefill_token_threshold < engine.max_num_batched_tokens, name
        assert engine.max_num_batched_tokens - engine.long_prefill_token_threshold >= engine.max_num_seqs, name


def test_the_benchmark_scenario_reports_its_figures(capped_server):
    figures = asyncio.run(_bench().measure(capped_server.url, long_prompt_tokens=200, num_streams=2,
                                           stream_max_tokens=300, short_delay_s=0.05, warmup_s=0.05,
                                           answer_tokens=8, api_key=API_KEY))
    assert 100 <= figures["long_prompt_tokens"] <= 300 and figures["short_completion_tokens"] == 8
    assert figures["streams_ran_throughout"], figures
    # A client reading behind the engine gets several chunks at once: the median gap can round to 0.
    assert 0 <= figures["stream_gap_median_s"] <= figures["stream_gap_longest_s"]
    assert figures["longest_over_median"] >= 1 and figures["long_ttft_s"] > 0 and figures["short_ttft_s"] > 0
    assert isinstance(figures["short_first_token_before_long"], bool)
    assert 0 <= figures["stream_gap_longest_during_long_prefill_s"] <= figures["stream_gap_longest_s"]


def test_only_runs_one_configuration(tmp_path, monkeypatch):
    from click.testing import CliRunner

    bench = _bench()
    calls = []
    monkeypatch.setattr(bench, "run_config", lambda name, overrides, **_: calls.append((name, overrides)) or {})
    out = tmp_path / "long_prefill.json"
    args = ["--only", "after", "--set", "engine.long_prefill_token_threshold=32", "--output", str(out)]
    result = CliRunner().invoke(bench.main, args)
    assert result.exit_code == 0, result.output
    assert calls == [("after", ["engine.long_prefill_token_threshold=32"])] and out.exists()
    calls.clear()
    assert CliRunner().invoke(bench.main, ["--output", str(out)]).exit_code == 0
    assert [name for name, _ in calls] == ["before", "after"]
