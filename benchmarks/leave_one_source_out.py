"""Leave-one-source-out: for each source, train without it and test on all of its rows.

    .venv/bin/python benchmarks/leave_one_source_out.py --config configs/train_cpu.yaml \
        --set epochs=2 --set max_train_rows_per_source=350 [--sources nq_open,gsm8k_train]

Prints, per held-out source, the predictor's arg-max metrics on every row of that source (it saw none of them)
beside the baselines fitted on the other sources (the per-source mean falls back to the overall mean). One
training run per source, one after another; checkpoints go under runs/loso/<source>.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.commands import DECODING_KEYS  # noqa: E402
from pipeline.labelled import labelled_data  # noqa: E402
from predictor_train.data import drop_sources, load_records, sources_of, split_records  # noqa: E402
from predictor_train.evaluate import evaluate_rows, format_table  # noqa: E402
from predictor_train.inference import LengthPredictor  # noqa: E402
from predictor_train.train import TrainConfig, train_predictor  # noqa: E402


def held_out_row(config: TrainConfig, ds, recipe: dict, source: str, out_root: Path) -> dict[str, dict]:
    """Train without ``source`` and evaluate on all of its rows; returns the metrics per method."""
    run = dataclasses.replace(config, exclude_sources=(source,), output_dir=str(out_root / source),
                              wandb_mode="disabled")
    decoding = {k: recipe[k] for k in DECODING_KEYS if k in recipe}
    result = train_predictor(run, ds, target_model=recipe.get("model", "unknown"), decoding=decoding,
                             progress=False)
    rows = ds.select([i for i, s in enumerate(sources_of(ds)) if s == source])
    train = drop_sources(split_records(ds)["train"], [source])
    report = evaluate_rows(LengthPredictor.load(result.checkpoint_dir), rows, train=train, title=f"held-out {source}")
    return report.metrics


@click.command()
@click.option("--config", "config_path", default="configs/train_cpu.yaml", show_default=True)
@click.option("--data", default="data/labelled", show_default=True)
@click.option("--sources", default=None, help="Comma-separated sources to hold out (default: every source).")
@click.option("--output-dir", default="runs/loso", show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def main(config_path, data, sources, output_dir, overrides):
    config = load_config(TrainConfig, config_path, overrides)
    dataset, recipe = labelled_data(data)
    ds = load_records(dataset)
    names = sources.split(",") if sources else sorted(set(sources_of(ds)))
    predictor_rows, best_baseline = {}, {}
    for source in names:
        metrics = held_out_row(config, ds, recipe, source, Path(output_dir))
        predictor_rows[source] = metrics["predictor"]
        best_baseline[source] = max(m["within_one_accuracy"] for k, m in metrics.items() if k != "predictor")
        click.echo(f"{source}: within one {metrics['predictor']['within_one_accuracy']:.3f} "
                   f"(best baseline {best_baseline[source]:.3f})", err=True)
    click.echo(format_table(predictor_rows, first="held-out source"))
    click.echo("best baseline within one: " + ", ".join(f"{s} {v:.3f}" for s, v in best_baseline.items()))


if __name__ == "__main__":
    main()
