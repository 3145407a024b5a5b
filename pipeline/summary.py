"""The pipeline's summary: what the predictor learned and what it bought, before and after retraining.

Every s3/max ratio divides two figures of one serving round (each round runs its own `max`), and rows measured
on prompts the retrained predictor was trained on say so."""

from __future__ import annotations


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """Right-aligned columns under a header and a rule."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _pct(x: float) -> str:
    return f"{x:.1%}"


def _retrain_rows(retrain: dict) -> list[list[str]]:
    """The feedback rows: the mispredicted prompts retraining learned from are its training examples; those held
    out of it (feedback_holdout, and every sampled well-predicted one, predictor_train/retrain.py) are not."""
    before, after = retrain.get("before", {}), retrain.get("after", {})
    rows = []
    if "kept_parent_weights" in retrain:  # the guard: a retrained epoch must match them (predictor_train/retrain.py)
        kept = "trained (retrained ones scored lower)" if retrain["kept_parent_weights"] else "retrained"
        rows.append(["predictor weights", "trained", kept])
    if "feedback" in before:
        n = retrain.get("feedback_used", "?")
        rows.append([f"accuracy on the feedback prompts retrained on (training examples, n={n})",
                     _pct(before["feedback"]["accuracy"]), _pct(after["feedback"]["accuracy"])])  # fmt: skip
    if "feedback_held_out" in before:
        n = retrain.get("feedback_held_out", "?")
        rows.append([f"accuracy on held-out feedback prompts (not trained on, n={n})",
                     _pct(before["feedback_held_out"]["accuracy"]), _pct(after["feedback_held_out"]["accuracy"])])
    return rows


def summary_rows(outputs: dict) -> list[list[str]]:
    """Rows of (what, before retraining, after retraining)."""
    train, collect, bench = outputs["train"], outputs["collect"], outputs["bench"]
    retrain = outputs.get("retrain", {})
    test_before = train["test"]["predictor"]
    test_after = retrain.get("after", {}).get("test", test_before)
    rows = [
        ["predictor accuracy (test split)", _pct(test_before["accuracy"]), _pct(test_after["accuracy"])],
        ["under-prediction rate (test split)", _pct(test_before["under_prediction_rate"]),
         _pct(test_after["under_prediction_rate"])],
        ["majority-bucket baseline accuracy", _pct(train["test"]["majority"]["accuracy"]), ""],
        ["prompt-length regression accuracy", _pct(train["test"]["regression"]["accuracy"]), ""],
        *_retrain_rows(retrain),
    ]  # fmt: skip
    before, after = collect, bench  # each serving round: its own max and s3, same prompts
    ratio = lambda run: f"{run['s3']['tokens_per_s'] / run['max']['tokens_per_s']:.2f}x"  # noqa: E731
    rows += [
        ["max tokens/s (this round's own run)", f"{before['max']['tokens_per_s']:.1f}", f"{after['max']['tokens_per_s']:.1f}"],
        ["s3 tokens/s", f"{before['s3']['tokens_per_s']:.1f}", f"{after['s3']['tokens_per_s']:.1f}"],
        ["s3 / max throughput (same round)", ratio(before), ratio(after)],
        ["s3 mispredictions", str(before["s3"]["mispredictions"]), str(after["s3"]["mispredictions"])],
        ["s3 preemptions", str(before["s3"]["preemptions"]), str(after["s3"]["preemptions"])],
        ["s3 mean running batch", f"{before['s3']['mean_running_batch']:.1f}", f"{after['s3']['mean_running_batch']:.1f}"],
        ["served prompts unfamiliar to the predictor", *(_unfamiliar(run["s3"]) for run in (before, after))],
        # the same prompts and decoding: only the schedule differs, so any differing answer is a bug
        ["s3 prompts answered unlike max", *(str(run["s3"].get("answers_differing", "-")) for run in (before, after))],
    ]  # fmt: skip
    return rows


def _unfamiliar(run: dict) -> str:
    """``3 of 16``; ``-`` for a predictor without a familiarity bank (predictor_train/familiarity.py)."""
    return f"{run['unfamiliar_prompts']} of {run['num_prompts']}" if "unfamiliar_prompts" in run else "-"


def format_summary(outputs: dict) -> str:
    return text_table(["", "before retraining", "after retraining"], summary_rows(outputs))


def serve_command(outputs: dict) -> str | None:
    """How to serve the loop's last predictor (the retrained one, or the trained one a round kept)."""
    checkpoint = outputs.get("retrain", {}).get("checkpoint") or outputs.get("train", {}).get("checkpoint")
    return f".venv/bin/s3 serve --predictor {checkpoint}" if checkpoint else None


def log_summary(config, outputs: dict) -> None:
    from core.tracking import finishing, start_run

    run = start_run(project=config.wandb_project, job_type="summary", group=config.run_id, config={},
                    mode=config.wandb_mode)  # fmt: skip
    if run is None:
        return
    import wandb

    with finishing(run):
        run.log({"summary": wandb.Table(columns=["what", "before", "after"], data=summary_rows(outputs))})
