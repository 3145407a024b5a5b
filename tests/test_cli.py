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
