"""benchmarks/load_sweep.py: every (rate, seed) once, tagged, resumable, summarised against paged."""

from __future__ import annotations

import dataclasses
import json

import click
import pytest


@pytest.fixture
def sweep_module(import_benchmark):
    return import_benchmark("load_sweep", "load", "sim_load")


def fake_benchmark(load, served):
    def benchmark(cfg, echo=print):
        served.append((cfg.rate, cfg.seed))
        rows = []
        for policy, slow in (("paged", 2.0), ("s3", 1.0)):
            results = [load.Result(f"p{i}", num_tokens=10, start=float(i), first_token=i + 0.1 * slow,
                                   end=i + slow) for i in range(4)]  # fmt: skip
            rows.append(load.summarise(policy, results, wall=10.0 * slow, metrics={}, max_tokens=16))
        return rows
    return benchmark


def test_sweep_runs_each_rate_and_seed_once_and_resumes(sweep_module, monkeypatch, tmp_path):
    load, served = sweep_module.load, []
    monkeypatch.setattr(load, "benchmark", fake_benchmark(load, served))
    base = load.LoadConfig(policies=("paged", "s3"), mode="poisson", frequency_penalty=0.5)
    records = sweep_module.sweep(base, 0.5, [0.5, 1.0], [0, 1], tmp_path, echo=lambda *_: None)
    assert sorted(served) == [(0.25, 0), (0.25, 1), (0.5, 0), (0.5, 1)]
    assert len(records) == 8 and {r["rate_fraction"] for r in records} == {0.5, 1.0}
    assert (tmp_path / "rate0.5_seed1.json").exists() and (tmp_path / "rate0.5_seed1.png").exists()

    served.clear()  # a second sweep reads every run back and serves nothing
    again = sweep_module.sweep(base, 0.5, [0.5, 1.0], [0, 1], tmp_path, echo=lambda *_: None)
    assert served == [] and [r["mean_latency_s"] for r in again] == [r["mean_latency_s"] for r in records]
    summary = sweep_module.sim_load.summarize(again)
    s3 = next(row for row in summary if row["policy"] == "s3" and row["rate_fraction"] == 1.0)
    assert s3["mean_latency_s_vs_paged"]["mean"] == pytest.approx(0.5)

    # a run saved before load.py wrote the decode figures gets them from its per-request times
    path = tmp_path / "rate0.5_seed0.json"
    saved = json.loads(path.read_text())
    figures = ("mean_tpot_s", "p50_tpot_s", "p99_tpot_s", "mean_in_system")
    saved["results"] = [{k: v for k, v in r.items() if k not in figures} for r in saved["results"]]
    path.write_text(json.dumps(saved))
    older = sweep_module.sweep(base, 0.5, [0.5], [0], tmp_path, echo=lambda *_: None)
    assert [[r[k] for k in figures] for r in older] == [[r[k] for k in figures] for r in records[:2]]

    # a run saved before a knob was a LoadConfig field ran at its default; at another value it is not mixed in
    saved = json.loads(path.read_text())
    del saved["config"]["quantile"]
    path.write_text(json.dumps(saved))
    assert len(sweep_module.sweep(base, 0.5, [0.5], [0], tmp_path, echo=lambda *_: None)) == 2
    with pytest.raises(click.ClickException, match="other settings"):
        sweep_module.sweep(dataclasses.replace(base, quantile=0.9), 0.5, [0.5], [0], tmp_path, echo=lambda *_: None)

    with pytest.raises(click.ClickException, match="other settings"):  # a changed setting is not mixed in
        sweep_module.sweep(base, 0.6, [0.5], [0], tmp_path, echo=lambda *_: None)
    json.loads((tmp_path / "rate1_seed0.json").read_text())  # plain JSON, one file per run


def test_capacity_is_paged_requests_over_wall_with_all_sent_at_once_and_is_kept(sweep_module, monkeypatch, tmp_path):
    load, served = sweep_module.load, []

    def benchmark(cfg, echo=print):
        served.append(cfg)
        results = [load.Result(f"p{i}", num_tokens=10, start=0.0, first_token=0.1, end=1.0) for i in range(4)]
        return [load.summarise("paged", results, wall=8.0, metrics={}, max_tokens=16)]

    monkeypatch.setattr(load, "benchmark", benchmark)
    base = load.LoadConfig(policies=("paged", "s3"), mode="poisson", num_requests=4, frequency_penalty=0.5)
    assert sweep_module.measure_capacity(base, 3, tmp_path, echo=lambda *_: None) == pytest.approx(0.5)
    (cfg,) = served
    assert (cfg.policies, cfg.mode, cfg.concurrency, cfg.seed) == (("paged",), "closed", 4, 3)
    assert sweep_module.measure_capacity(base, 3, tmp_path, echo=lambda *_: None) == pytest.approx(0.5)
    assert len(served) == 1  # read back from capacity.json
    with pytest.raises(click.ClickException, match="other settings"):
        sweep_module.measure_capacity(base, 4, tmp_path, echo=lambda *_: None)
