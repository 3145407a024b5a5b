"""Every benchmark script imports and answers --help (the scripts are not tests, but a refactor must not leave one
broken until somebody next runs it)."""

import pathlib

import pytest
from click.testing import CliRunner

SCRIPTS = sorted(p.stem for p in (pathlib.Path(__file__).parents[1] / "benchmarks").glob("*.py")
                 if "@click.command" in p.read_text())


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_script_answers_help(import_benchmark, name):
    result = CliRunner().invoke(import_benchmark(name).main, ["--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def _cases(tmp: pathlib.Path) -> list[tuple[str, list[str], str]]:
    """(script, arguments, words of the error): each was found only after the script's work (serving, training,
    simulating), or was a traceback; now an error before any of it."""
    taken, folder = tmp / "a-file", tmp / "a-folder"
    return [
        ("load_sweep", ["--capacity", "1", "--output-dir", str(taken)], "File exists"),
        ("load_sweep", ["--capacity", "1", "--seeds", "0,0"], "name each value once"),
        ("load_sweep", ["--capacity", "1", "--seeds", "0,x"], "--seeds integers"),
        ("load_sweep", ["--capacity", "1", "--policies", "paged,bogus"], "bogus"),
        ("quantile_sweep", ["--preset", "paper", "--quantiles", "0.5,1.5"], "quantile and prior_weight must be in"),
        ("quantile_sweep", ["--preset", "paper", "--output", str(taken)], "File exists"),
        ("priority_sim", ["--preset", "paper", "--policies", "paged,bogus"], "bogus"),
        ("predictor_variants", ["--variant", "a:", "--variant", "b:bogus_key=1", "--output-dir", str(tmp / "pv")],
         "bogus_key"),
        ("predictor_trace", [str(tmp / "none"), "--output", str(taken / "t.jsonl")], "a-file"),
        ("predictor_contention", ["--predictor", str(tmp / "none"), "--output", str(folder)], "is a folder"),
        ("predictor_latency", [str(tmp), "--output", str(folder)], "is a directory"),
        ("long_prefill", ["--num-streams", "0"], "--num-streams"),
        ("long_prefill", ["--output", str(folder)], "is a folder"),
        ("new_source_feedback", ["--sources", "nq_open", "--output-dir", str(taken)], "File exists"),
        ("bench_replay", [str(taken), "--policies", "bogus"], "bogus"),
    ]  # fmt: skip


@pytest.mark.parametrize("index", range(15))
def test_bad_settings_and_output_paths_fail_before_the_work(import_benchmark, tmp_path, index):
    (tmp_path / "a-file").write_text("{}")
    (tmp_path / "a-folder").mkdir()
    name, args, words = _cases(tmp_path)[index]
    also = {"load_sweep": ("load", "sim_load")}.get(name, ())
    result = CliRunner().invoke(import_benchmark(name, *also).main, args)
    assert result.exit_code != 0 and words in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


def test_quantile_sweep_saves_after_each_run(import_benchmark, tmp_path):
    import json

    module = import_benchmark("quantile_sweep")
    args = ["--preset", "paper", "--num-requests", "40", "--quantiles", "0.5,0.9", "--output", str(tmp_path)]
    result = CliRunner().invoke(module.main, args)
    data = json.loads((tmp_path / "q_sweep.json").read_text())
    assert result.exit_code == 0 and data["complete"] and [r["q"] for r in data["results"]] == [0.5, 0.9, None]
