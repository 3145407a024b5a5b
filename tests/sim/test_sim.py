import dataclasses
import json

import pytest

from core.buckets import BucketSpec
from serve.sched_output import ScheduledSeq, SchedulerOutput
from serve.sim.costmodel import CALIBRATION_DIR, PRESETS, get_preset
from serve.sim.report import format_report
from serve.sim.simulate import SimulateConfig, run_simulation
from serve.sim.workload import LengthDist, PredictorConfig, WorkloadConfig, load_trace, make_workload, predict


def _plan(*seqs):
    return SchedulerOutput(seqs=[ScheduledSeq(str(i), start, n, [], True) for i, (start, n) in enumerate(seqs)])


def test_step_time_grows_with_batch_context_and_prefill():
    cost = get_preset("paper")
    one = cost.step_time(_plan((100, 1)))
    assert cost.step_time(_plan()) == 0.0
    assert one > cost.hardware.step_overhead_s
    assert cost.step_time(_plan(*[(100, 1)] * 64)) > one
    assert cost.step_time(_plan((1000, 1))) > one
    assert cost.step_time(_plan((0, 2000))) > 5 * one  # a long prefill is compute-bound


def test_presets_fit_and_tensor_parallel_divides_kv():
    for cost in PRESETS.values():
        assert cost.num_blocks(16) > 0
    big = get_preset("llama-2-70b-8xa100")
    assert big.kv_spec.bytes_per_token == big.model.kv_spec(1).bytes_per_token / 8
    with pytest.raises(ValueError, match="unknown simulator preset"):
        get_preset("nope")


def test_confusion_predictor_hits_its_accuracy():
    items = make_workload(WorkloadConfig(num_requests=4000), max_seq_len=2048)
    buckets = BucketSpec.uniform(2048, 10)
    predict(items, PredictorConfig(kind="confusion", accuracy=0.7), buckets)
    right = sum(i.prediction.bucket == buckets.bucket_of(i.num_output_tokens) for i in items)
    assert 0.66 < right / len(items) < 0.74
    assert all(abs(i.prediction.bucket - buckets.bucket_of(i.num_output_tokens)) <= 1 for i in items)


def test_online_arrivals_are_poisson_at_the_rate():
    items = make_workload(WorkloadConfig(num_requests=2000, mode="online", rate=50.0), max_seq_len=2048)
    assert items[-1].arrival_time == pytest.approx(2000 / 50.0, rel=0.1)
    assert all(a.arrival_time <= b.arrival_time for a, b in zip(items, items[1:]))


def test_trace_errors_name_file_and_row(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"num_prompt_tokens": 5, "num_output_tokens": 9}\n{"num_prompt_tokens": 5}\n')
    with pytest.raises(ValueError, match=r"t.jsonl, row 2"):
        load_trace(path)
    with pytest.raises(FileNotFoundError):
        load_trace(tmp_path / "missing.jsonl")
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("num_prompt_tokens,num_output_tokens,predicted_bucket\n5,9,0\n7,300,1\n")
    rows = load_trace(csv_path)
    assert [(r.num_prompt_tokens, r.num_output_tokens, r.predicted_bucket) for r in rows] == [(5, 9, 0), (7, 300, 1)]
    for bad in ("[1, 2]", "not json"):  # a row that is no object, a line that is no JSON
        path.write_text('{"num_prompt_tokens": 5, "num_output_tokens": 9}\n' + bad + "\n")
        with pytest.raises(ValueError, match=r"t.jsonl, row 2"):
            load_trace(path)


@pytest.mark.parametrize("row", [dict(predicted_bucket=-2), dict(predicted_bucket=10), dict(probs=[0.5, 0.5])])
def test_a_trace_prediction_outside_the_buckets_is_refused(row):
    """A negative bucket read another bucket's edge by Python's negative indexing, one past the top was clamped."""
    items = make_workload(WorkloadConfig(num_requests=1), max_seq_len=2048)
    items = [dataclasses.replace(items[0], **row)]
    with pytest.raises(ValueError, match="10 buckets"):
        predict(items, PredictorConfig(kind="file"), BucketSpec.uniform(2048, 10))


def test_a_trace_is_shuffled_per_seed_a_pass_at_a_time_unless_its_order_is_kept(tmp_path):
    """A trace grouped by source (a split is) sent in file order is a load that changes with time: every pass over
    it is a fresh permutation instead, drawn from the seed; trace_order="file" keeps the file's order."""
    path = tmp_path / "grouped.jsonl"
    path.write_text("".join(f'{{"num_prompt_tokens": 5, "num_output_tokens": {n}}}\n' for n in range(1, 11)))
    lengths = lambda **kw: [i.num_output_tokens for i in make_workload(  # noqa: E731
        WorkloadConfig(trace=str(path), num_requests=25, **kw), max_seq_len=2048)]
    shuffled = lengths(seed=0)
    assert sorted(shuffled[:10]) == sorted(shuffled[10:20]) == list(range(1, 11)) and len(shuffled) == 25
    assert shuffled[:10] != list(range(1, 11)) and shuffled[:10] != shuffled[10:20]
    assert lengths(seed=0) == shuffled and lengths(seed=1) != shuffled
    assert lengths(trace_order="file") == [*range(1, 11), *range(1, 11), *range(1, 6)]
    with pytest.raises(ValueError, match="trace_order"):
        WorkloadConfig(trace_order="sorted")


def _small_config(**kw):
    workload = WorkloadConfig(
        num_requests=300, prompt_tokens=LengthDist(median=30, max=200), output_tokens=LengthDist(median=60, max=2000)
    )
    return SimulateConfig(workload=workload, **kw)


def test_all_policies_finish_everything_and_s3_beats_max():
    report = run_simulation(_small_config(predictor=PredictorConfig(accuracy=0.6)))
    by = {r.policy: r for r in report.results}
    from serve.policy_config import POLICY_NAMES

    assert set(by) == set(POLICY_NAMES)
    total = sum(i for i in [by["max"].generated_tokens_per_s * by["max"].makespan_s])
    for r in report.results:
        assert r.num_requests == 300
        assert r.generated_tokens_per_s * r.makespan_s == pytest.approx(total)
        assert 0 < r.longest_stall_s < r.makespan_s  # every run has answers of more than one token
    assert by["max"].num_preemptions == 0 and by["max"].num_mispredictions == 0
    assert by["s3"].num_mispredictions > 0  # 40% wrong predictions, some too short
    assert by["s3-oracle"].num_preemptions == 0
    assert by["s3"].mean_running_batch > by["max"].mean_running_batch
    assert report.ratios("s3")["max"] > 1.0


def test_rate_search_and_report_files(tmp_path):
    from serve.sim.report import format_report, save_report

    config = _small_config(policies=("max", "s3"), find_max_rate=True, rate_search_requests=200, rate_search_steps=2)
    report = run_simulation(config)
    assert [r.policy for r in report.rates] == ["max", "s3"]
    for rate, result in zip(report.rates, report.results):
        assert 0 < rate.max_rate
    text = format_report(report)
    assert "s3 throughput ratio" in text and "largest arrival rate" in text
    paths = save_report(report, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["s3_throughput_ratios"]["s3"] == 1.0 and paths["png"].stat().st_size > 10_000
    assert data["step_time_fit"] is None and "step time: roofline" in text  # the paper preset


def test_a_calibrated_preset_says_which_fit_it_ran_with(tmp_path, monkeypatch):
    from serve.sim.report import format_report, to_json

    monkeypatch.chdir(tmp_path)  # no runs/calibration/ here: the shipped fit
    config = dataclasses.replace(_small_config(policies=("paged",)), preset="smollm2-cpu", max_new_tokens=256)
    report = run_simulation(config)
    fit = to_json(report)["step_time_fit"]
    assert fit == dataclasses.asdict(get_preset("smollm2-cpu").linear) and fit["source"]
    assert f"{fit['overhead_s'] * 1e3:.1f} ms" in format_report(report)
    # runs/calibration/ is looked up from the working directory: the record names the file the fit came from
    shipped = str((CALIBRATION_DIR / "smollm2-cpu.json").resolve())
    assert fit["fit_file"] == shipped and shipped in format_report(report)


def test_a_run_saves_what_it_has_after_each_policy_and_rate_search():
    """Results were written only at the end: a run cut short (a rate search takes many minutes) lost them all."""
    seen, messages = [], []
    config = _small_config(policies=("paged", "s3"), find_max_rate=True, rate_search_requests=100,
                           rate_search_steps=1, slo_token_latency_s=1e6)  # fmt: skip
    run_simulation(config, progress=messages.append,
                   save=lambda r: seen.append(([x.policy for x in r.results], [x.policy for x in r.rates])))
    assert seen == [(["paged"], []), (["paged", "s3"], []), (["paged", "s3"], ["paged"]),
                    (["paged", "s3"], ["paged", "s3"])]  # fmt: skip
    probes = [m for m in messages if "req/s:" in m]  # every probe of the search is reported, not one line per policy
    assert len(probes) >= 2 * 7 and all("within the SLO" in m for m in probes)


@pytest.mark.parametrize("kw, words", [
    ({"policies": ("s3", "paged", "paged")}, "each be named once"),
    ({"slo_token_latency_s": -1.0}, "slo_token_latency_s must be > 0"),
    ({"rate_search_requests": 0}, "rate_search_requests >= 1"),
])  # fmt: skip
def test_settings_a_rate_search_needs_are_checked_before_any_work(kw, words):
    with pytest.raises(ValueError, match=words):
        _small_config(**kw)


def test_rate_search_probes_above_the_offline_capacity():
    # An SLO every rate meets: the search must not stop at the offline capacity.
    config = _small_config(policies=("paged",), find_max_rate=True, rate_search_requests=200, rate_search_steps=1,
                           slo_token_latency_s=1e6)
    report = run_simulation(config)
    assert report.rates[0].max_rate > 1.5 * report.results[0].requests_per_s


def test_results_carry_the_shared_benchmark_keys(tmp_path):
    from serve.sim.report import save_report

    report = run_simulation(_small_config(policies=("paged", "s3")))
    record = json.loads(save_report(report, tmp_path)["json"].read_text())["results"][0]
    keys = ("policy", "generated_tokens_per_s", "mean_ttft_s", "p50_ttft_s", "p99_ttft_s", "mean_latency_s",
            "p50_latency_s", "p99_latency_s", "num_preemptions", "num_recomputed_tokens")
    assert all(record[k] is not None for k in keys)
    assert record["p50_ttft_s"] <= record["p99_ttft_s"] and record["p50_latency_s"] <= record["p99_latency_s"]


@pytest.mark.slow
def test_simulating_10k_requests_takes_seconds():
    import time

    config = SimulateConfig(policies=("s3",), workload=dataclasses.replace(WorkloadConfig(), num_requests=10_000))
    start = time.perf_counter()
    run_simulation(config)
    # About 50 s on this 2-core machine (70-95 s before 2026-12-07, when s3 evaluated its projected peak for every
    # admission, four slices per running sequence); generous for a loaded CI machine.
    assert time.perf_counter() - start < 300


def test_a_shared_system_prompt_is_computed_once_with_prefix_caching():
    workload = WorkloadConfig(num_requests=200, shared_prefix_tokens=300, prompt_tokens=LengthDist(median=340, max=600))
    items = make_workload(workload, max_seq_len=2048)
    assert all(i.num_shared_prefix_tokens == min(300, i.num_prompt_tokens) for i in items)
    results = {}
    for caching in (False, True):
        config = SimulateConfig(policies=("paged", "s3", "s3-oracle"), workload=workload,
                                enable_prefix_caching=caching, kv_cache_tokens=40_000)
        results[caching] = {r.policy: r for r in run_simulation(config).results}
    for policy in ("paged", "s3", "s3-oracle"):
        assert results[True][policy].generated_tokens_per_s > 1.2 * results[False][policy].generated_tokens_per_s
        assert results[True][policy].kv_utilization <= results[True][policy].kv_reserved + 1e-9
    assert results[True]["s3-oracle"].num_preemptions == 0


def test_urgent_requests_go_first_and_the_report_gives_each_class():
    """workload.urgent_share: a seeded share of the requests at priority -1, the lengths and arrivals as without it;
    offline (all waiting at once) the urgent ones get their first token sooner, and the report splits the classes."""
    plain = WorkloadConfig(num_requests=300)
    urgent = dataclasses.replace(plain, urgent_share=0.2)
    items, marked = make_workload(plain, max_seq_len=2048), make_workload(urgent, max_seq_len=2048)
    assert [(i.num_prompt_tokens, i.num_output_tokens) for i in items] == [
        (i.num_prompt_tokens, i.num_output_tokens) for i in marked]
    assert sum(i.priority == -1 for i in marked) == 60 and not any(i.priority for i in items)
    config = SimulateConfig(policies=("paged", "s3"), workload=urgent, kv_cache_tokens=20_000)
    report = run_simulation(config)
    for result in report.results:
        classes = result.classes
        assert classes["urgent"]["num_requests"] == 60 and classes["normal"]["num_requests"] == 240
        assert classes["urgent"]["mean_ttft_s"] < classes["normal"]["mean_ttft_s"]
    assert "by priority (20% of the requests urgent)" in format_report(report)
    assert not run_simulation(dataclasses.replace(config, workload=plain)).results[0].classes
    with pytest.raises(ValueError, match="urgent_share"):
        WorkloadConfig(urgent_share=1.5)


@pytest.mark.parametrize("fields, words", [
    (dict(num_requests=0), "num_requests"), (dict(rate=0.0), "rate"),
    (dict(output_tokens=dict(median=0)), "median > 0"), (dict(prompt_tokens=dict(median=5, min=10, max=5)), "min <= max"),
])  # fmt: skip
def test_bad_workloads_are_refused(fields, words):
    """A length distribution is given as a dict of LengthDist's fields."""
    with pytest.raises(ValueError, match=words):
        WorkloadConfig(**{k: LengthDist(**v) if isinstance(v, dict) else v for k, v in fields.items()})
