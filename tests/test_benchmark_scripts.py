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
