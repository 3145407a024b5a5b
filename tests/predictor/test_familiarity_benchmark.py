"""benchmarks/familiarity.py: a leave-one-source-out checkpoint finds the source it never saw unfamiliar;
benchmarks/predictor_trace.py writes a simulator trace of that source with the predictor's familiarity."""

from __future__ import annotations

import json

import datasets
import torch
from click.testing import CliRunner

from .conftest import TARGET_MODEL, tiny_config

FOREIGN = ("Quelle", "est", "la", "capitale", "du", "pays", "où", "coule", "ce", "fleuve")


def test_the_held_out_source_is_found_unfamiliar(import_benchmark, tmp_path, records):
    bench = import_benchmark("familiarity")
    loso = import_benchmark("leave_one_source_out")
    rows = [{**r, "source": "kept"} for r in records]
    rows += [{**r, "source": "left", "prompt": " ".join(FOREIGN[(i + j) % len(FOREIGN)] for j in range(6)) + f" {i}"}
             for i, r in enumerate(records[:90])]
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = datasets.Dataset.from_list(rows)
    loso.trained(tiny_config(tmp_path, epochs=1, calibrate=False), ds, {"model": TARGET_MODEL}, ("left",),
                 tmp_path / "loso" / "left", reuse=False)
    out = tmp_path / "out"
    result = CliRunner().invoke(bench.main, ["--data", str(data), "--loso-dir", str(tmp_path / "loso"),
                                             "--output-dir", str(out), "--quantile", "0.1"])
    assert result.exit_code == 0, result.output
    (record,) = json.loads((out / "familiarity.json").read_text())["results"]
    assert record["held_out_source"] == "left" and record["auc"] > 0.9
    assert record["held_out_unfamiliar_share"] > 0.5 > record["seen_unfamiliar_share"]
    assert (out / "familiarity.png").is_file()

    trace = import_benchmark("predictor_trace")
    path = tmp_path / "trace.jsonl"
    result = CliRunner().invoke(trace.main, [str(tmp_path / "loso" / "left"), "--data", str(data), "--held-out",
                                             "left", "--unfamiliar-probs", "lengths", "--output", str(path)])
    assert result.exit_code == 0, result.output
    traced = [json.loads(line) for line in path.read_text().splitlines()]
    left = [r for r in traced if r["source"] == "left"]
    assert len(left) == 90 and traced[:90] == left  # every row of the held-out source, first
    unfamiliar = [r for r in traced if r["unfamiliar"]]
    assert len(unfamiliar) > 45 and all(r["probs"] == unfamiliar[0]["probs"] for r in unfamiliar)
    assert any(r["probs"] != unfamiliar[0]["probs"] for r in traced if not r["unfamiliar"])
    result = CliRunner().invoke(trace.main, [str(tmp_path / "loso" / "left"), "--data", str(data), "--held-out",
                                             "nowhere", "--output", str(path)])
    assert result.exit_code != 0 and "no rows of source 'nowhere'" in result.output


def test_auc_below_counts_ties_half(import_benchmark):
    bench = import_benchmark("familiarity")
    assert bench.auc_below(torch.tensor([0.1, 0.2]), torch.tensor([0.5])) == 1.0
    assert bench.auc_below(torch.tensor([0.5]), torch.tensor([0.5, 0.1])) == 0.25
