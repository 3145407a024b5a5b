"""The pipeline's summary: what the predictor learned and what it bought, before and after retraining."""

from __future__ import annotations


def summary_rows(outputs: dict) -> list[list[str]]:
    """Rows of (what, before retraining, after retraining)."""
    train, collect, bench = outputs["train"], outputs["collect"], outputs["bench"]
    retrain = outputs.get("retrain", {})
    test_before = train["test"]["predictor"]
    test_after = retrain.get("after", {}).get("test", test_before)
    pct = lambda x: f"{x:.1%}"  # noqa: E731
    rows = [
        ["predictor accuracy (test split)", pct(test_before["accuracy"]), pct(test_after["accuracy"])],
        ["under-prediction rate (test split)", pct(test_before["under_prediction_rate"]),
         pct(test_after["under_prediction_rate"])],
        ["majority-bucket baseline accuracy", pct(train["test"]["majority"]["accuracy"]), ""],
        ["prompt-length regression accuracy", pct(train["test"]["regression"]["accuracy"]), ""],
    ]  # fmt: skip
    if "feedback" in retrain.get("before", {}):
        rows.append(["accuracy on the mispredicted prompts", pct(retrain["before"]["feedback"]["accuracy"]),
                     pct(retrain["after"]["feedback"]["accuracy"])])  # fmt: skip
    max_tps = collect["max"]["tokens_per_s"]
    s3_before, s3_after = collect["s3"], bench["s3"]
    rows += [
        ["max policy tokens/s (same prompts)", f"{max_tps:.1f}", ""],
        ["s3 tokens/s", f"{s3_before['tokens_per_s']:.1f}", f"{s3_after['tokens_per_s']:.1f}"],
        ["s3 / max throughput", f"{s3_before['tokens_per_s'] / max_tps:.2f}x", f"{s3_after['tokens_per_s'] / max_tps:.2f}x"],
        ["s3 mispredictions", str(s3_before["mispredictions"]), str(s3_after["mispredictions"])],
        ["s3 preemptions", str(s3_before["preemptions"]), str(s3_after["preemptions"])],
        ["s3 mean running batch", f"{s3_before['mean_running_batch']:.1f}", f"{s3_after['mean_running_batch']:.1f}"],
    ]  # fmt: skip
    return rows


def format_summary(outputs: dict) -> str:
    from serve.sim.report import _table

    return _table(["", "before retraining", "after retraining"], summary_rows(outputs))


def log_summary(config, outputs: dict) -> None:
    from pipeline.tracking import start_run

    run = start_run(project=config.wandb_project, job_type="summary", group=config.run_id, config={},
                    mode=config.wandb_mode)  # fmt: skip
    if run is None:
        return
    import wandb

    run.log({"summary": wandb.Table(columns=["what", "before", "after"], data=summary_rows(outputs))})
    run.finish()
