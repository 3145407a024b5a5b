"""Predictor variants side by side: one training run per variant, all scored on the same test split.

    .venv/bin/python benchmarks/predictor_variants.py --config configs/train_cpu.yaml \
        --set epochs=1 --set max_train_rows_per_source=300 \
        --variant "ce:" --variant "soft:loss=soft" --variant "rps:loss=rps" --variant "ce-256:max_prompt_tokens=256"

A variant is ``NAME:KEY=VALUE;KEY=VALUE`` (TrainConfig fields, applied after the config file and ``--set``).
Prints and writes (``variants.json`` under ``--output-dir``) per variant: arg-max accuracy, within-one accuracy,
MAE, under-prediction, the worst source's within-one accuracy, NLL / ECE / quantile coverage with the fitted
temperature, and the predictor's latency per prompt at batch 1. Checkpoints go under ``<output-dir>/<NAME>``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402

from core.files import replacing  # noqa: E402
from core.records import json_text  # noqa: E402
from pipeline.commands import DECODING_KEYS  # noqa: E402
from pipeline.config import ConfigError, load_config  # noqa: E402
from pipeline.labelled import labelled_data  # noqa: E402
from predictor_train.data import load_records, split_records  # noqa: E402
from predictor_train.evaluate import evaluate_rows  # noqa: E402
from predictor_train.inference import LengthPredictor  # noqa: E402
from predictor_train.train import TrainConfig, train_predictor  # noqa: E402


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition(":")
    if not name:
        raise click.BadParameter(f"{text!r}: expected NAME:KEY=VALUE;KEY=VALUE")
    return name, [o for o in overrides.split(";") if o.strip()]


def variant_row(report, predictor: LengthPredictor) -> dict:
    """One table row: the predictor's arg-max metrics, calibrated probability metrics, worst source, latency."""
    calibrated = next(m for name, m in report.probabilities.items() if name.startswith("predictor, T=") and
                      name != "predictor, T=1")
    worst = min(report.per_source.items(), key=lambda kv: kv[1]["predictor"]["within_one_accuracy"])
    return {
        **report.metrics["predictor"], **{f"calibrated_{k}": v for k, v in calibrated.items()},
        "temperature": predictor.temperature, "worst_source": worst[0],
        "worst_source_within_one": worst[1]["predictor"]["within_one_accuracy"],
        "ms_per_prompt_batch1": 1e3 * predictor.benchmark_latency((1,))[1],
    }  # fmt: skip


def format_rows(rows: dict[str, dict]) -> str:
    header = ("| variant | accuracy | within one | MAE | under | worst source (within one) | NLL | ECE | "
              "cov .5 / .7 / .9 | ms/prompt |")
    lines = [header, "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['accuracy']:.1%} | {r['within_one_accuracy']:.1%} | {r['mae_tokens']:.1f} | "
            f"{r['under_prediction_rate']:.1%} | {r['worst_source']} ({r['worst_source_within_one']:.1%}) | "
            f"{r['calibrated_nll']:.3f} | {r['calibrated_ece']:.3f} | {r['calibrated_coverage_q50']:.2f} / "
            f"{r['calibrated_coverage_q70']:.2f} / {r['calibrated_coverage_q90']:.2f} | "
            f"{r['ms_per_prompt_batch1']:.1f} |"
        )  # fmt: skip
    return "\n".join(lines)


@click.command()
@click.option("--config", "config_path", default="configs/train_cpu.yaml", show_default=True)
@click.option("--data", default="data/labelled", show_default=True)
@click.option("--variant", "variants", multiple=True, required=True, help="NAME:KEY=VALUE;KEY=VALUE (repeatable).")
@click.option("--output-dir", default="runs/variants", show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Applied to every variant.")
def main(config_path, data, variants, output_dir, overrides):
    dataset, recipe = labelled_data(data)
    records = load_records(dataset)
    splits = split_records(records)
    decoding = {k: recipe[k] for k in DECODING_KEYS if k in recipe}
    out, rows = Path(output_dir), {}
    try:  # every variant's config, and the output folder, checked before the first one trains
        parsed = [parse_variant(variant) for variant in variants]
        if len({name for name, _ in parsed}) < len(parsed):
            raise ValueError("name each --variant differently (each trains into output-dir/NAME)")
        configs = {name: (extra, load_config(TrainConfig, config_path, [*overrides, *extra])) for name, extra in parsed}
        out.mkdir(parents=True, exist_ok=True)
    except (ConfigError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    for name, (extra, config) in configs.items():
        config = dataclasses.replace(config, output_dir=str(out / name), wandb_mode="disabled")
        click.echo(f"variant {name}: {' '.join(extra) or '(the config as it is)'}", err=True)
        result = train_predictor(config, records, target_model=recipe.get("model", "unknown"), decoding=decoding)
        predictor = LengthPredictor.load(result.checkpoint_dir)
        report = evaluate_rows(predictor, splits["test"], train=splits["train"], title=f"variant {name}")
        rows[name] = variant_row(report, predictor) | {"overrides": extra}
        click.echo(format_rows({name: rows[name]}).splitlines()[-1], err=True)
        with replacing(out / "variants.json") as tmp:  # after each variant: an interrupted run keeps the others
            tmp.write_text(json_text({"base_overrides": list(overrides), "complete": len(rows) == len(configs),
                                      "variants": rows}, indent=2))
    click.echo(format_rows(rows))
    click.echo(f"wrote {out / 'variants.json'}")


if __name__ == "__main__":
    main()
