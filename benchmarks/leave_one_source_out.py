"""Leave-one-source-out: for each source, train without it and test on its rows.

    .venv/bin/python benchmarks/leave_one_source_out.py --config configs/train_cpu.yaml \
        --set epochs=1 --set max_train_rows_per_source=300 --set calibrate=false [--sources nq_open,gsm8k_train]

One training run per held-out source (excluded from training and validation), one after another, plus one on
every source with the same budget ("seen in training"). Per source, on its test-split rows: the held-out model,
the model that saw the source, and the constant guess (the bucket of the other sources' mean answer length: the
per-source mean baseline fitted without the source); and the held-out model on all of the source's rows. Prints a
table and writes ``<output-dir>/loso.json`` (a ``results`` list, one record per source). Checkpoints go under
``<output-dir>/<source>`` and ``<output-dir>/all_sources``; ``--reuse`` skips a training whose checkpoint is
there with the same settings, so an interrupted run resumes.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402

from core.records import json_text  # noqa: E402
from pipeline.commands import DECODING_KEYS  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.labelled import labelled_data  # noqa: E402
from predictor_train.data import drop_sources, load_records, sources_of, split_records  # noqa: E402
from predictor_train.evaluate import evaluate_rows  # noqa: E402
from predictor_train.inference import LengthPredictor  # noqa: E402
from predictor_train.train import TrainConfig, train_predictor  # noqa: E402

ALL_SOURCES = "all_sources"


def trained(config: TrainConfig, ds, recipe: dict, exclude: tuple[str, ...], out_dir: Path,
            reuse: bool) -> LengthPredictor:
    """A predictor trained without ``exclude``, or the one already in ``out_dir`` with the same settings."""
    run = dataclasses.replace(config, exclude_sources=exclude, output_dir=str(out_dir), wandb_mode="disabled")
    info = out_dir / "predictor.json"
    if reuse and info.exists() and json.loads(info.read_text())["train_config"] == json.loads(
            json.dumps(dataclasses.asdict(run))):
        click.echo(f"reusing {out_dir}", err=True)
        return LengthPredictor.load(out_dir)
    decoding = {k: recipe[k] for k in DECODING_KEYS if k in recipe}
    result = train_predictor(run, ds, target_model=recipe.get("model", "unknown"), decoding=decoding,
                             progress=False)
    return LengthPredictor.load(result.checkpoint_dir)


def of_source(rows, source: str):
    return rows.select([i for i, s in enumerate(sources_of(rows)) if s == source])


def held_out_record(predictor: LengthPredictor, splits, ds, source: str, seen: dict[str, dict]) -> dict:
    """The held-out model's metrics on the source's test rows and all its rows, beside the seen model's and the
    constant guess's (baselines fitted on the training rows of the other sources)."""
    train = drop_sources(splits["train"], [source])
    test = evaluate_rows(predictor, of_source(splits["test"], source), train=train).metrics
    everything = evaluate_rows(predictor, of_source(ds, source), train=train).metrics
    return {"source": source, "never_seen_test": test["predictor"], "constant_guess_test": test["source_mean"],
            "best_baseline_within_one_test": max(m["within_one_accuracy"] for k, m in test.items()
                                                 if k != "predictor"),
            "seen_test": seen.get(source), "never_seen_all_rows": everything["predictor"]}


def markdown(records: list[dict]) -> str:
    def pct(m, key):
        return "-" if m is None else f"{100 * m[key]:.1f}%"

    lines = ["| held-out source | n test | never seen: accuracy | within one | MAE | under-predicted | "
             "seen in training: within one | MAE | constant guess: within one | never seen, all rows: n | "
             "within one |", "| --- |" + " ---: |" * 10]
    for r in records:
        never, seen, const, every = r["never_seen_test"], r["seen_test"], r["constant_guess_test"], \
            r["never_seen_all_rows"]
        lines.append(
            f"| {r['source']} | {int(never['num_examples'])} | {pct(never, 'accuracy')} | "
            f"{pct(never, 'within_one_accuracy')} | {never['mae_tokens']:.1f} | "
            f"{pct(never, 'under_prediction_rate')} | {pct(seen, 'within_one_accuracy')} | "
            f"{'-' if seen is None else format(seen['mae_tokens'], '.1f')} | {pct(const, 'within_one_accuracy')} | "
            f"{int(every['num_examples'])} | {pct(every, 'within_one_accuracy')} |")
    return "\n".join(lines)


@click.command()
@click.option("--config", "config_path", default="configs/train_cpu.yaml", show_default=True)
@click.option("--data", default="data/labelled", show_default=True)
@click.option("--sources", default=None, help="Comma-separated sources to hold out (default: every source).")
@click.option("--output-dir", default="runs/loso", show_default=True)
@click.option("--seen/--no-seen", default=True, show_default=True,
              help="Also train on every source with the same budget, for the 'seen in training' columns.")
@click.option("--reuse/--no-reuse", default=True, show_default=True,
              help="Skip a training whose checkpoint already exists with the same settings.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def main(config_path, data, sources, output_dir, seen, reuse, overrides):
    config = load_config(TrainConfig, config_path, overrides)
    dataset, recipe = labelled_data(data)
    ds = load_records(dataset)
    splits = split_records(ds)
    names = sources.split(",") if sources else sorted(set(sources_of(ds)))
    unknown = sorted(set(names) - set(sources_of(ds)))
    if unknown:
        raise click.BadParameter(f"no rows of source(s) {', '.join(unknown)}", param_hint="--sources")
    out_root = Path(output_dir)
    seen_metrics: dict[str, dict] = {}
    if seen:
        everything = trained(config, ds, recipe, (), out_root / ALL_SOURCES, reuse)
        report = evaluate_rows(everything, splits["test"], train=splits["train"])
        seen_metrics = {s: m["predictor"] for s, m in report.per_source.items()}
    records = []
    for source in names:
        predictor = trained(config, ds, recipe, (source,), out_root / source, reuse)
        records.append(held_out_record(predictor, splits, ds, source, seen_metrics))
        click.echo(f"{source}: within one {records[-1]['never_seen_test']['within_one_accuracy']:.3f} on its test "
                   f"rows (constant guess {records[-1]['constant_guess_test']['within_one_accuracy']:.3f})", err=True)
    out_root.mkdir(parents=True, exist_ok=True)
    settings = dataclasses.asdict(dataclasses.replace(config, output_dir=str(out_root)))
    (out_root / "loso.json").write_text(json_text({"data": data, "train_config": settings, "results": records},
                                                   indent=2))
    click.echo(markdown(records))
    click.echo(f"wrote {out_root / 'loso.json'}", err=True)


if __name__ == "__main__":
    main()
