"""A kind of prompt the predictor never saw, served and fed back: what one retraining round on the server's
feedback does for that kind, and which feedback to record.

    .venv/bin/python benchmarks/new_source_feedback.py --config configs/train_cpu.yaml --set epochs=1 \
        --set max_train_rows_per_source=300 --set calibrate=false --loso-dir runs/loso_9k \
        --sources gsm8k_train,gpteacher_toolformer --num-served 200 --output-dir runs/new_source
    # the store a server with feedback_sample_rate 0.1 writes, and the round judged on it too:
    #   --feedback sampled --sample-rate 0.1 --output-dir runs/new_source_judge
    # another round on fresh traffic (the next 200 rows), every round shipped so that each can be scored:
    #   --served-offset 200 --retrain-set keep_parent_unless_matched=false

Per held-out source S: the leave-one-source-out predictor (trained without S as `benchmarks/leave_one_source_out.py`
does, reused from ``--loso-dir`` when its settings match), then S's first ``--num-served`` train-split rows
(prompt-hash order, after the first ``--served-offset``) served as new traffic, and the feedback a server would
record from them. ``under``: the requests that wrote past their predicted bucket (what `s3 serve` recorded until
2026-12-06); ``both``: those and the ones that ended in a bucket below the predicted one (what it records now);
``all``: every served request, all trained on; ``sampled``: what a server with ``feedback_sample_rate``
``--sample-rate`` records, ``both`` and that share of the well-predicted requests, weighted back into a sample of
the traffic. One retraining round per kind of feedback (the config plus ``--retrain-set`` overrides, S still
excluded, so the replay holds no row of S and the validation gate judges the other sources only; all feedback
trained on, except for ``sampled``, whose round holds records out as `s3 train` does and is judged on them too),
scored before and after on S's test rows (never trained on) and on the other sources' test rows (what the round
costs them). Prints a table and writes ``<output-dir>/new_source.json`` (a ``results`` list, one record per source
and kind of feedback; for ``sampled``, the parent and the round scored on the traffic sample too, beside the test
rows, on each metric a guard could compare: `JUDGED`).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402
import datasets  # noqa: E402

from core.files import replacing  # noqa: E402
from core.records import json_text  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.labelled import labelled_data  # noqa: E402
from predictor_train.data import cap_per_source, drop_sources, load_records, sources_of, split_records  # noqa: E402
from predictor_train.evaluate import bucket_metrics, evaluate_rows  # noqa: E402
from predictor_train.inference import LengthPredictor  # noqa: E402
from predictor_train.retrain import effective_size, hold_out_feedback, retrain_predictor, traffic_sample  # noqa: E402
from predictor_train.train import TrainConfig  # noqa: E402
from serve.feedback import in_sample, over_predicted  # noqa: E402

from leave_one_source_out import of_source, trained  # noqa: E402  (the sibling script)

KINDS = ("under", "both", "all", "sampled")

JUDGED = ("accuracy", "within_one_accuracy", "mae_tokens", "mean_wasted_tokens")
"""The metrics a sample of the traffic could judge a round on, compared with the test rows' verdict."""


def served_feedback(predictor, rows, kind: str, *, sample_rate: float = 0.0) -> datasets.Dataset:
    """The feedback records a server would write for ``rows`` served under ``predictor``'s arg-max buckets, with
    each one's ``traffic_weight`` (``sampled``: 1 for a misprediction, 1 / ``sample_rate`` for a sampled
    well-predicted request, chosen by a hash of its prompt; the other kinds: 0, no sample of the traffic)."""
    spec = predictor.buckets
    predicted = [p.bucket for p in predictor.predict(list(rows["prompt"]))]
    keep, weights, sampled = [], [], []
    for i, (prompt, length, finished, bucket) in enumerate(
            zip(rows["prompt"], rows["num_output_tokens"], rows["finished"], predicted)):
        true = spec.bucket_of(int(length))
        missed = true > bucket or (kind != "under" and over_predicted(bucket, true, ended_of_itself=finished))
        if kind == "all" or missed:
            keep.append(i)
            weights.append(1.0 if kind == "sampled" else 0.0)
            sampled.append(False)
        elif kind == "sampled" and in_sample(prompt, sample_rate):
            keep.append(i)
            weights.append(1.0 / sample_rate)
            sampled.append(True)
    picked = rows.select(keep)  # built in memory: a .map would leave a cache file in the labelled data's folder
    return datasets.Dataset.from_dict({**{name: picked[name] for name in picked.column_names},
                                       "source": ["feedback"] * len(keep),
                                       "predicted_bucket": [predicted[i] for i in keep], "sampled": sampled,
                                       "traffic_weight": weights})


def served_rows(rows, num_served: int, offset: int = 0):
    """``num_served`` of ``rows`` in prompt-hash order, after the first ``offset`` (another round's traffic)."""
    served = cap_per_source(rows, offset + num_served)
    if not offset:
        return served
    earlier = set(cap_per_source(rows, offset)["prompt"])
    return served.select([i for i, prompt in enumerate(served["prompt"]) if prompt not in earlier])


def scores(predictor, rows, train) -> dict:
    """`evaluate_rows`'s metrics of the predictor, with the share of ``rows`` it finds unfamiliar when its checkpoint
    keeps a familiarity bank (predictor_train/familiarity.py; None when not)."""
    report = evaluate_rows(predictor, rows, train=train)
    metrics = report.metrics["predictor"]
    unfamiliar = report.by_familiarity.get("unfamiliar", {}).get("share", 0.0) if report.by_familiarity else None
    return {**{k: metrics[k] for k in ("num_examples", *JUDGED, "under_prediction_rate")},
            "unfamiliar_share": unfamiliar}


def sample_scores(parent, child, feedback, share: float) -> dict:
    """Parent and round scored on the held-out records weighted back into a sample of the traffic, as retraining
    builds it (`traffic_sample`): what a guard on each of `JUDGED` would have seen, whatever the round's guard did."""
    served, weights = traffic_sample(hold_out_feedback(feedback, share)[1], parent.buckets.max_tokens, share)
    record = {"num_records": len(served), "num_sampled": sum(served["sampled"]) if len(served) else 0,
              "effective_size": effective_size(weights)}
    if not len(served):
        return record
    lengths = [int(n) for n in served["num_output_tokens"]]
    for name, predictor in (("parent", parent), ("round", child)):
        predicted = [p.bucket for p in predictor.predict(list(served["prompt"]))]
        metrics = bucket_metrics(lengths, predicted, predictor.buckets, weights=weights)
        record[name] = {k: metrics[k] for k in JUDGED}
    return record


def agreement(record: dict) -> dict[str, bool]:
    """For each of `JUDGED`: whether the traffic sample and the source's test rows say the round moved it the same
    way (an accuracy up, a token count down, counts as better)."""
    sample, new = record["traffic_sample"], record["new_source"]
    if "round" not in sample:
        return {}

    def better(before, after, key):
        return after[key] >= before[key] if "accuracy" in key else after[key] <= before[key]
    return {key: better(sample["parent"], sample["round"], key) == better(new["before"], new["after"], key)
            for key in JUDGED}


def round_record(source: str, kind: str, *, num_served: int, feedback, kept_parent: bool, verdict: str, before: dict,
                 after: dict, history: list, sample: dict | None = None) -> dict:
    """One round's entry of ``new_source.json``: before/after on the source's test rows and on the others', and
    (``sampled``) on the traffic sample."""
    record = {"source": source, "feedback": kind, "num_served": num_served, "num_records": len(feedback),
              "kept_parent": kept_parent, "verdict": verdict, "history": history,
              "new_source": {"before": before["new"], "after": after["new"]},
              "other_sources": {"before": before["old"], "after": after["old"]}}
    if sample is not None:
        record["traffic_sample"] = sample
        record["sample_agrees"] = agreement(record)
    return record


def judge_markdown(records: list[dict]) -> str:
    """Per sampled round: each metric on the traffic sample and on the test rows, parent -> round."""
    header = " | ".join(f"{key}: sample / test rows" for key in JUDGED)
    lines = [f"| held-out source | sampled (records, effective size) | {header} |",
             "| --- |" + " ---: |" * (1 + len(JUDGED))]
    for r in records:
        sample, new = r.get("traffic_sample"), r["new_source"]
        if not sample or "round" not in sample:
            continue

        def move(before, after, key):
            fmt = (lambda v: f"{100 * v:.1f}%") if "accuracy" in key else (lambda v: f"{v:.1f}")
            return f"{fmt(before[key])} -> {fmt(after[key])}"
        cells = [f"{move(sample['parent'], sample['round'], k)} / {move(new['before'], new['after'], k)}"
                 f"{'' if r['sample_agrees'][k] else ' (disagree)'}" for k in JUDGED]
        lines.append(f"| {r['source']} | {sample['num_sampled']} ({sample['num_records']}, "
                     f"{sample['effective_size']:.0f}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(records: list[dict]) -> str:
    lines = ["| held-out source | feedback | records (of served) | kept | its test rows: within one before -> after "
             "| MAE | under-predicted | unfamiliar | other sources' test rows: within one | MAE |",
             "| --- | --- |" + " ---: |" * 8]
    for r in records:
        new, old = r["new_source"], r["other_sources"]

        def move(m, key, pct=True):
            fmt = (lambda v: "-" if v is None else f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.1f}")
            return f"{fmt(m['before'].get(key))} -> {fmt(m['after'].get(key))}"
        lines.append(f"| {r['source']} | {r['feedback']} | {r['num_records']} ({r['num_served']}) | "
                     f"{'previous weights' if r['kept_parent'] else 'retrained'} | "
                     f"{move(new, 'within_one_accuracy')} | {move(new, 'mae_tokens', False)} | "
                     f"{move(new, 'under_prediction_rate')} | {move(new, 'unfamiliar_share')} | "
                     f"{move(old, 'within_one_accuracy')} | "
                     f"{move(old, 'mae_tokens', False)} |")
    return "\n".join(lines)


@click.command()
@click.option("--config", "config_path", default="configs/train_cpu.yaml", show_default=True)
@click.option("--data", default="data/labelled", show_default=True)
@click.option("--sources", default="gsm8k_train,gpteacher_toolformer", show_default=True,
              help="Comma-separated sources to hold out and then serve.")
@click.option("--num-served", default=200, show_default=True, help="Train-split rows of the source served.")
@click.option("--served-offset", default=0, show_default=True,
              help="Skip this many rows (prompt-hash order) before the served ones: fresh traffic for another round.")
@click.option("--feedback", "kinds", default="under,both", show_default=True,
              help="Kinds of feedback to retrain on: under, both, all (every served request, the well-predicted "
                   "ones too: what a store that recorded everything would hold), sampled (the mispredicted and "
                   "--sample-rate of the rest, as s3 serve records).")
@click.option("--sample-rate", default=0.1, show_default=True,
              help="--feedback sampled: the share of well-predicted requests recorded (s3 serve's "
                   "feedback_sample_rate).")
@click.option("--loso-dir", default="runs/loso", show_default=True,
              help="Where the leave-one-source-out checkpoints are (trained there when missing).")
@click.option("--output-dir", default="runs/new_source", show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="TrainConfig, for the held-out model.")
@click.option("--retrain-set", "retrain_overrides", multiple=True, metavar="KEY=VALUE",
              help="TrainConfig overrides for the retraining round, after --set (default: the shipped recipe).")
def main(config_path, data, sources, num_served, served_offset, kinds, sample_rate, loso_dir, output_dir, overrides,
         retrain_overrides):
    kinds = kinds.split(",")
    if set(kinds) - set(KINDS):
        raise click.BadParameter(f"kinds are {', '.join(KINDS)}", param_hint="--feedback")
    if "sampled" in kinds and not 0 < sample_rate <= 1:
        raise click.BadParameter("must be in (0, 1] with --feedback sampled", param_hint="--sample-rate")
    config = load_config(TrainConfig, config_path, overrides)
    retrain_config = load_config(TrainConfig, config_path, [*overrides, *retrain_overrides])
    dataset, recipe = labelled_data(data)
    ds = load_records(dataset)
    splits = split_records(ds)
    names = sources.split(",")
    unknown = sorted(set(names) - set(sources_of(ds)))
    if unknown:
        raise click.BadParameter(f"no rows of source(s) {', '.join(unknown)}", param_hint="--sources")
    out_root = Path(output_dir)
    try:  # a bad output folder fails now, not after the first training
        out_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.ClickException(str(exc)) from None
    settings = {"held_out_model": dataclasses.asdict(config), "retrain": dataclasses.asdict(retrain_config),
                "num_served": num_served, "served_offset": served_offset, "sample_rate": sample_rate, "data": data}
    records = []
    for source in names:
        parent_dir = Path(loso_dir) / source
        parent = trained(config, ds, recipe, (source,), parent_dir, reuse=True)
        served = served_rows(of_source(splits["train"], source), num_served, served_offset)
        train = drop_sources(splits["train"], [source])
        new_rows, old_rows = of_source(splits["test"], source), drop_sources(splits["test"], [source])
        before = {"new": scores(parent, new_rows, train), "old": scores(parent, old_rows, train)}
        for kind in kinds:
            feedback = served_feedback(parent, served, kind, sample_rate=sample_rate)
            history, sample = [], None
            if len(feedback) == 0:  # nothing mispredicted in this direction: no round to run
                after, kept_parent, verdict = before, True, "no feedback records: nothing to retrain on"
            else:
                holdout = retrain_config.feedback_holdout if kind == "sampled" else 0.0
                run = dataclasses.replace(retrain_config, exclude_sources=(source,), feedback_holdout=holdout,
                                          output_dir=str(out_root / f"{source}_{kind}"), wandb_mode="disabled")
                report = retrain_predictor(run, ds, feedback, previous_checkpoint=parent_dir, progress=False)
                child = LengthPredictor.load(report.result.checkpoint_dir)
                after = {"new": scores(child, new_rows, train), "old": scores(child, old_rows, train)}
                kept_parent, verdict, history = report.kept_parent, report.verdict(), report.result.history
                if kind == "sampled":
                    sample = sample_scores(parent, child, feedback, holdout)
            records.append(round_record(source, kind, num_served=len(served), feedback=feedback,
                                        kept_parent=kept_parent, verdict=verdict, before=before, after=after,
                                        history=history, sample=sample))
            click.echo(f"{source}, {kind}: {len(feedback)} records; {verdict}; within one on its test rows "
                       f"{before['new']['within_one_accuracy']:.3f} -> {after['new']['within_one_accuracy']:.3f}",
                       err=True)
            with replacing(out_root / "new_source.json") as tmp:  # after each round: an interrupted run keeps them
                tmp.write_text(json_text({"settings": settings, "complete": len(records) == len(names) * len(kinds),
                                          "results": records}, indent=2))
    click.echo(markdown(records))
    if "sampled" in kinds:
        click.echo("\nWhat the traffic sample says of each round beside the source's test rows:\n")
        click.echo(judge_markdown(records))
    click.echo(f"wrote {out_root / 'new_source.json'}", err=True)


if __name__ == "__main__":
    main()
