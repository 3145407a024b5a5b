"""`s3 bench` end to end on a tiny random Llama saved as a Hugging Face folder (no SmolLM2 needed)."""

import json

from click.testing import CliRunner

from pipeline.cli import main


def test_bench_runs_every_policy_on_the_same_prompts(tiny_chat_model_dir, tmp_path):
    args = ["bench", "--model", str(tiny_chat_model_dir), "--num-prompts", "6", "--max-new-tokens", "24",
            "--output-dir", str(tmp_path), "--set", "kv_worst_case_seqs=2", "--set", "reference_batch=3",
            "--set", "block_size=4"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "bench.json").read_text())
    names = [r["name"] for r in report["results"]]
    assert names == ["max", "paged", "s3", "oracle", "hf-generate@3"]
    by = {r["name"]: r for r in report["results"]}
    # Greedy decoding: every policy and the reference generate exactly the same tokens.
    assert len({r["generated_tokens"] for r in report["results"]}) == 1
    assert by["max"]["mean_running_batch"] <= 2.0 <= by["oracle"]["mean_running_batch"]
    assert by["max"]["num_preemptions"] == 0
    assert all(len(r["steps"]) > 0 for r in report["results"][:4])
    assert "vs max" in result.output and (tmp_path / "bench.png").exists()


def test_calibration_fits_the_bench_and_replays_it(tiny_chat_model_dir, tmp_path, monkeypatch):
    from serve.sim import calibrate as calibration

    monkeypatch.setattr(calibration, "CALIBRATION_DIR", tmp_path / "calibration")
    args = ["bench", "--model", str(tiny_chat_model_dir), "--num-prompts", "6", "--max-new-tokens", "24",
            "--policies", "max,s3", "--output-dir", str(tmp_path), "--set", "kv_worst_case_seqs=2",
            "--set", "reference_batch=0", "--set", "block_size=4"]  # fmt: skip
    assert CliRunner().invoke(main, args).exit_code == 0
    fit, rows = calibration.calibrate(tmp_path / "bench.json")
    assert fit.overhead_s >= 0 and fit.per_token_s >= 0 and fit.per_context_s >= 0
    assert [r["policy"] for r in rows] == ["max", "s3"]
    assert all(r["simulated_tokens_per_s"] > 0 for r in rows)
    assert (tmp_path / "calibration" / "smollm2-cpu.json").exists()
