"""benchmarks/sim_load.py: sim_load.json records the settings that decide its figures."""

from __future__ import annotations

import json

from click.testing import CliRunner


def test_sim_load_json_records_its_settings(import_benchmark, tmp_path):
    """It left out the pool, the output cap, the batch limit, the accuracy, the policies, seeds and rates."""
    module = import_benchmark("sim_load")
    args = ["--preset", "paper", "--policies", "s3", "--rate-fractions", "0.5,1.2", "--seeds", "3", "--num-requests",
            "40", "--accuracy", "0.8", "--max-new-tokens", "128", "--kv-cache-tokens", "20000", "--max-num-seqs", "32",
            "--output", str(tmp_path)]  # fmt: skip
    result = CliRunner().invoke(module.main, args)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "sim_load.json").read_text())
    assert {k: data[k] for k in ("preset", "num_requests", "kv_cache_tokens", "max_new_tokens", "max_num_seqs",
                                 "predictor", "accuracy", "policies", "seeds", "rate_fractions")} == {
        "preset": "paper", "num_requests": 40, "kv_cache_tokens": 20000, "max_new_tokens": 128, "max_num_seqs": 32,
        "predictor": "confusion", "accuracy": 0.8, "policies": ["paged", "s3"], "seeds": [3],
        "rate_fractions": [0.5, 1.2]}  # fmt: skip
    assert data["quantile"] == 0.5 and {r["seed"] for r in data["results"]} == {3}


def test_a_seed_without_a_figure_makes_its_spread_nan_in_any_order(import_benchmark):
    """min and max over a NaN depended on where it fell: seeds (0, 1) gave NaN, (1, 0) a number."""
    import math

    sim_load = import_benchmark("sim_load")
    for values in ([math.nan, 2.0], [2.0, math.nan]):
        assert all(math.isnan(v) for v in sim_load.spread(values).values())
    assert sim_load.spread([1.0, 3.0]) == {"mean": 2.0, "min": 1.0, "max": 3.0}


def test_bad_settings_are_errors_before_any_work_and_each_seed_is_saved(import_benchmark, tmp_path):
    """Bad input was a traceback (an output path that is a file: after every run); results came only at the end."""
    module = import_benchmark("sim_load")
    taken = tmp_path / "a-file"
    taken.write_text("")
    small = ["--preset", "paper", "--policies", "s3", "--rate-fractions", "0.5", "--num-requests", "30"]
    for args, words in [(["--num-requests", "0"], "num_requests must be >= 1"),
                        (["--preset", "nope"], "unknown simulator preset 'nope'"),
                        (["--trace", str(tmp_path / "none.jsonl")], "does not exist"),
                        (["--output", str(taken)], "File exists"),
                        (["--policies", "s3,s3"], "name each policy once"),
                        (["--seeds", "0,0"], "name each value once")]:  # fmt: skip
        result = CliRunner().invoke(module.main, [*small, "--output", str(tmp_path / "out"), *args])
        assert result.exit_code != 0 and words in result.output and "Traceback" not in result.output, result.output
        assert "seed 0 rate" not in result.output
    saved = []
    real_save = module._save
    module._save = lambda out, records, complete, **meta: (saved.append((len(records), complete)),
                                                            real_save(out, records, complete, **meta))
    try:
        result = CliRunner().invoke(module.main, [*small, "--seeds", "0,1", "--output", str(tmp_path / "out")])
    finally:
        module._save = real_save
    assert result.exit_code == 0 and saved == [(2, False), (4, True)]
    assert json.loads((tmp_path / "out" / "sim_load.json").read_text())["complete"]
