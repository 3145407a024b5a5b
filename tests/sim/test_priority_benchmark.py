"""benchmarks/priority_sim.py: every policy run ignoring and honouring the priorities, per-class records."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

from click.testing import CliRunner

SCRIPT = pathlib.Path(__file__).parents[2] / "benchmarks" / "priority_sim.py"


def test_the_urgent_class_starts_sooner_when_priorities_are_honoured(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("priority_sim", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    output = tmp_path / "priority.json"
    result = CliRunner().invoke(module.main, ["--num-requests", "400", "--load", "3", "--output", str(output)])
    assert result.exit_code == 0, result.output
    records = json.loads(output.read_text())["results"]
    assert [(r["policy"], r["priorities"]) for r in records] == [("paged", False), ("paged", True), ("s3", False),
                                                                 ("s3", True)]
    for record in records:
        assert set(record["classes"]) == {"urgent", "normal"} and "p99_ttft_s" in record["classes"]["urgent"]
        if record["priorities"]:
            assert record["classes"]["urgent"]["mean_ttft_s"] < record["classes"]["normal"]["mean_ttft_s"]
