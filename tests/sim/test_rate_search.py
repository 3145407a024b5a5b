"""`--find-max-rate`: the search's rates are fractions of the policy's offline capacity whatever the main run's
mode, and an answer no probe bounds from above says it is a lower bound."""

from __future__ import annotations

import dataclasses
import json

from serve.sim.report import format_report, save_report
from serve.sim.simulate import RATE_SEARCH_CAP, SimulateConfig, run_simulation
from serve.sim.workload import LengthDist, WorkloadConfig


def _config(**kw) -> SimulateConfig:
    workload = WorkloadConfig(num_requests=200, prompt_tokens=LengthDist(median=30, max=200),
                              output_tokens=LengthDist(median=60, max=2000))  # fmt: skip
    return SimulateConfig(workload=workload, policies=("paged",), find_max_rate=True, rate_search_requests=200,
                          rate_search_steps=1, **kw)  # fmt: skip


def test_an_online_run_searches_from_the_offline_capacity():
    """The online run's requests/s is its arrival rate; the search used to probe fractions of that (far too low)."""
    offline = run_simulation(_config())
    online_config = _config()
    online_config = dataclasses.replace(online_config,
                                        workload=dataclasses.replace(online_config.workload, mode="online", rate=2.0))
    online = run_simulation(online_config)
    assert online.results[0].requests_per_s < 0.5 * offline.results[0].requests_per_s  # arrival-limited
    assert online.rates[0].capacity_rps == offline.rates[0].capacity_rps == offline.results[0].requests_per_s
    assert online.rates[0].probes == offline.rates[0].probes
    assert online.rates[0].max_rate == offline.rates[0].max_rate


def test_a_search_no_probe_bounds_reports_a_lower_bound(tmp_path):
    """Every rate meets this SLO: the search doubles up to its cap and says the answer is only a lower bound."""
    report = run_simulation(_config(slo_token_latency_s=1e6))
    rate = report.rates[0]
    assert not rate.bracketed
    assert rate.max_rate == max(r for r, _ in rate.probes) >= RATE_SEARCH_CAP * rate.capacity_rps
    assert f">= {rate.max_rate:.2f} req/s (SLO never exceeded)" in format_report(report)
    assert json.loads(save_report(report, tmp_path)["json"].read_text())["rates"][0]["bracketed"] is False


def test_a_bracketed_search_ends_below_a_probe_that_broke_the_slo():
    probes = run_simulation(_config(slo_token_latency_s=1e6)).rates[0].probes
    slo = sorted(v for _, v in probes)[len(probes) // 2]  # about half the probes break it
    report = run_simulation(_config(slo_token_latency_s=slo))
    rate = report.rates[0]
    assert rate.bracketed and rate.token_latency_at_max <= slo
    assert any(r > rate.max_rate and v > slo for r, v in rate.probes)
    assert f"{rate.max_rate:.2f} req/s" in format_report(report) and "never exceeded" not in format_report(report)
