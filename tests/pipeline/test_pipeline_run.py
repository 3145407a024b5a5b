"""`s3 pipeline run` end to end on tiny models: every stage, the summary, skipping and --only."""

import json

import datasets
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from serve.feedback import read_feedback
from tests.predictor.synthetic import make_records

pytestmark = pytest.mark.slow  # end-to-end runs on a tiny model

MAX_NEW = 40


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_chat_model_dir):
    root = tmp_path_factory.mktemp("pipeline")
    records = make_records(200)
    for r in records:
        r["num_output_tokens"] = r["num_output_tokens"] * MAX_NEW // 500 + 1
    datasets.Dataset.from_list(records).save_to_disk(str(root / "labelled" / "dataset"))
    (root / "labelled" / "recipe.json").write_text(json.dumps({"model": "tiny", "max_new_tokens": MAX_NEW}))
    (root / "prompts.json").write_text(json.dumps([{"instruction": f"Briefly explain topic {i}"} for i in range(20)]))
    (root / "model").symlink_to(tiny_chat_model_dir)
    return root


def _args(world):
    sets = {
        "run_id": "t", "runs_dir": str(world / "runs"), "labelled_data": str(world / "labelled"),
        "train.backbone": "tiny-random", "train.max_tokens": MAX_NEW, "train.num_buckets": 4, "train.epochs": 1,
        "train.lr": 0.01, "wandb_mode": "disabled",  # WANDB_MODE=offline wins (the test sets it): tracked for real
        "serve.inputs": f"[{world / 'prompts.json'}]", "serve.num_prompts": 6, "serve.max_new_tokens": MAX_NEW,
        "serve.model": str(world / "model"), "serve.kv_worst_case_seqs": 2,
    }  # fmt: skip
    return ["pipeline", "run", "--config", "configs/pipeline_cpu.yaml"] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def test_pipeline_runs_every_stage_then_skips_them(world, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(world))
    monkeypatch.setenv("WANDB_MODE", "offline")  # wins over the config; training must still open no run of its own
    result = CliRunner().invoke(main, _args(world))
    assert result.exit_code == 0, result.output
    for stage in ("generate", "train", "collect", "retrain", "bench"):
        assert f"[{stage}] running" in result.output
        assert (world / "runs" / "t" / stage / "stage.json").exists()
    assert "s3 / max throughput (same round)" in result.output and "before retraining" in result.output
    # Each serving round ran its own max on the same prompts: every ratio comes from one run.
    for stage in ("collect", "bench"):
        outputs = json.loads((world / "runs" / "t" / stage / "stage.json").read_text())["outputs"]
        assert outputs["max"]["generated_tokens"] == outputs["s3"]["generated_tokens"] > 0
        assert outputs["s3"]["answers_differing"] == 0  # token for token: only the schedule differs

    again = CliRunner().invoke(main, _args(world))
    assert again.exit_code == 0, again.output
    assert again.output.count("up to date, skipped") == 5

    only = CliRunner().invoke(main, _args(world) + ["--only", "bench"])
    assert only.exit_code == 0 and "[bench] running" in only.output and "[train] running" not in only.output

    # Collecting again replaces the round's feedback (the earlier records are kept aside, not doubled).
    feedback = world / "runs" / "t" / "collect" / "feedback"
    first = len(list(read_feedback(feedback))) if feedback.exists() else 0
    recollect = CliRunner().invoke(main, _args(world) + ["--only", "collect"])
    assert recollect.exit_code == 0, recollect.output
    assert (len(list(read_feedback(feedback))) if feedback.exists() else 0) == first
    assert "[retrain]" not in recollect.output and "s3 / max throughput" not in recollect.output  # collect alone
    # One offline wandb run per stage that ran, plus the summary runs (the first three invocations'; --only collect
    # stops there, with no summary): none opened by training or labelling.
    runs = list((world / "wandb").glob("offline-run-*"))
    assert len(runs) == 5 + 1 + 1 + 1 + 1 + 1, [r.name for r in runs]


def test_unknown_stage_is_refused(world):
    result = CliRunner().invoke(main, _args(world) + ["--only", "deploy"])
    assert result.exit_code == 2 and "unknown stage 'deploy'" in result.output
