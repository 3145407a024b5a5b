import json

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from serve.sim.simulate import SimulateConfig


def _commands(group, prefix=()):
    for name, cmd in group.commands.items():
        yield (*prefix, name)
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*prefix, name))


@pytest.mark.parametrize("path", [(), *_commands(main)])
def test_every_help_works(path):
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_serve_refuses_s3_without_a_predictor(tmp_path):
    result = CliRunner().invoke(main, ["serve", "--predictor", str(tmp_path / "none"), "--port", "8931"])
    assert result.exit_code == 2 and "predictor" in result.output


def test_simulate_from_the_shipped_config(tmp_path):
    args = ["simulate", "--config", "configs/simulate_paper.yaml", "--num-requests", "200", "--policies", "max,s3"]
    args += ["--set", "find_max_rate=false", "--output-dir", str(tmp_path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "s3 throughput ratio (same run): max" in result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["policy"] for r in report["results"]] == ["max", "s3"]
    assert (tmp_path / "simulate.png").exists()


def test_simulate_bad_input_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["simulate", "--set", "workload.num_requestz=5"])
    assert result.exit_code == 2 and "unknown key(s) ['num_requestz']" in result.output
    result = CliRunner().invoke(main, ["simulate", "--policies", "max,fastest"])
    assert result.exit_code == 2 and "fastest" in result.output  # the bad policy is named
    result = CliRunner().invoke(main, ["simulate", "--trace", str(tmp_path / "none.jsonl")])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = CliRunner().invoke(main, ["simulate", "--rate", "5"])  # was ignored: offline is the default
    assert result.exit_code == 2 and "add --mode online" in result.output
    (tmp_path / "empty.json").write_text("[]")
    result = CliRunner().invoke(main, ["simulate", "--calibrate-from", str(tmp_path / "empty.json")])
    assert result.exit_code == 2 and "holds 0 engine steps" in result.output


def test_simulate_checks_its_output_folder_first_and_saves_after_each_policy(tmp_path):
    taken = tmp_path / "a-file"
    taken.write_text("")
    args = ["simulate", "--num-requests", "50", "--policies", "paged,s3"]
    result = CliRunner().invoke(main, [*args, "--output-dir", str(taken)])
    assert result.exit_code == 2 and "File exists" in result.output  # was a traceback after every policy had run
    assert "simulating" not in result.output
    result = CliRunner().invoke(main, [*args, "--output-dir", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert result.exit_code == 0 and report["complete"] and [r["policy"] for r in report["results"]] == ["paged", "s3"]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary file left


def test_simulate_refuses_options_it_would_ignore(tmp_path):
    result = CliRunner().invoke(main, ["simulate", "--set", "workload.rate=5"])  # ran offline without a word
    assert result.exit_code == 2 and "add --mode online" in result.output
    (tmp_path / "bench.json").write_text("{}")
    result = CliRunner().invoke(main, ["simulate", "--calibrate-from", str(tmp_path / "bench.json"),
                                       "--output-dir", str(tmp_path / "out"), "--preset", "paper"])  # fmt: skip
    assert result.exit_code == 2 and "--preset, --output-dir would be ignored" in result.output


@pytest.mark.parametrize("args, words", [
    (["evaluate", ".", "--quantile", "1.5"], "'--quantile': 1.5 is not in the range 0<x<=1"),
    (["evaluate", ".", "--batch-size", "0"], "'--batch-size': 0 is not in the range x>=1"),
    (["generate", "--limit-per-source", "0"], "'--limit-per-source': 0 is not in the range x>=1"),
    (["simulate", "--num-requests", "0"], "num_requests must be >= 1"),
    (["simulate", "--set", "block_size=0"], "block_size must be >= 1"),
    (["generate", "--set", "limit_per_source=0"], "limit_per_source must be >= 1"),
])  # fmt: skip
def test_out_of_range_options_are_refused_before_any_work(args, words, tmp_path):
    if args[0] == "generate":  # should the check ever fail, label nothing into data/labelled
        args = [*args, "--input", str(tmp_path / "none.json"), "--output-dir", str(tmp_path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and words in result.output, result.output


def test_config_layers_and_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: paper\nworkload: {num_requests: 7, output_tokens: {median: 10}}\n")
    config = load_config(SimulateConfig, path, ["workload.rate=3", "policies=[s3, max]"], values={"block_size": 32})
    assert config.workload.num_requests == 7 and config.workload.output_tokens.median == 10.0
    assert config.workload.rate == 3.0 and config.policies == ("s3", "max") and config.block_size == 32
    with pytest.raises(ConfigError, match="expected int"):
        load_config(SimulateConfig, None, ["block_size=big"])
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(SimulateConfig, None, ["workload.mode=sometimes"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(SimulateConfig, None, ["block_size"])


@pytest.mark.integration
def test_batch_answers_a_file_with_smollm2(tmp_path):
    source, answers = tmp_path / "in.jsonl", tmp_path / "answers.jsonl"
    rows = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "smollm2", "messages": [{"role": "user", "content": question}], "max_tokens": 12,
                      "temperature": 0}}
            for i, question in enumerate(("What is the capital of France?", "Name a colour."))]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = CliRunner().invoke(main, ["batch", str(source), "-o", str(answers), "--policy", "paged",
                                       "--set", f"feedback_dir={tmp_path / 'feedback'}"])
    assert result.exit_code == 0, result.output
    assert "2 answered, 0 failed, 0 already in" in result.output
    records = {r["custom_id"]: r for r in map(json.loads, answers.read_text().splitlines())}
    assert "Paris" in records["q0"]["response"]["body"]["choices"][0]["message"]["content"]
    result = CliRunner().invoke(main, ["batch", str(source), "-o", str(answers), "--policy", "paged"])
    assert "0 answered, 0 failed, 2 already in" in result.output


def test_batch_refuses_a_missing_input(tmp_path):
    result = CliRunner().invoke(main, ["batch", str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "out.jsonl"),
                                       "--policy", "paged"])
    assert result.exit_code == 2 and "none.jsonl does not exist" in result.output


def test_s3_serve_exits_non_zero_when_its_engine_failed(monkeypatch):
    from serve.server import launch

    def failed(config, load_checkpoint=None):
        raise launch.EngineFailed("the engine failed: RuntimeError('out of memory')")

    monkeypatch.setattr(launch, "serve_main", failed)
    result = CliRunner().invoke(main, ["serve", "--policy", "paged"])
    assert result.exit_code == 1 and "the engine failed: RuntimeError('out of memory')" in result.output


def test_evaluate_says_when_labels_run_past_the_checkpoints_buckets(tmp_path, monkeypatch):
    """Data labelled with a larger cap and no recipe.json was scored without a word (the longer labels count as
    the last bucket)."""
    from types import SimpleNamespace

    import datasets

    from core.buckets import BucketSpec

    rows = datasets.Dataset.from_list([{"prompt": f"p{i}", "num_prompt_tokens": 2, "num_output_tokens": n}
                                       for i, n in enumerate([10, 600, 900])])  # fmt: skip
    monkeypatch.setattr("pipeline.labelled.labelled_data", lambda data: (rows, {}))  # a Dataset: load_records takes it
    info = SimpleNamespace(target_model="m", buckets=BucketSpec.uniform(500, 5))
    monkeypatch.setattr("predictor_train.checkpoint.read_info", lambda folder: info)
    monkeypatch.setattr("predictor_train.evaluate.evaluate_checkpoint", lambda *a, **k: (_ for _ in ()).throw(
        OSError("no file named model.safetensors")))
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path), "--data", str(tmp_path)])
    assert "warning: 2 of the 3 labels are longer than the checkpoint's buckets (500 tokens)" in result.output
    assert result.exit_code == 2 and "error: no file named model.safetensors" in result.output  # was a traceback
