"""Does a predictor notice a kind of prompt it never saw? Familiarity on the leave-one-source-out checkpoints.

    .venv/bin/python benchmarks/familiarity.py --loso-dir runs/loso_9k --output-dir runs/familiarity

For each checkpoint of benchmarks/leave_one_source_out.py (trained without one source), the familiarity that
`s3 train` stores in a checkpoint (predictor_train/familiarity.py) is fitted as training fits it: a sample of the
rows it was trained on (from its recorded config), the threshold at ``--quantile`` of its validation rows' scores.
On the test split it reports the share of the held-out source's rows found unfamiliar (what a server would see
if that kind of prompt were all its traffic), the share of the other sources' rows (false alarms, which should stay
near the quantile), the AUC (how often a held-out prompt scores below a seen one), and the predictor's within-one
accuracy on the unfamiliar and the familiar rows of each. Writes ``familiarity.json`` (a ``results`` list, one
record per held-out source) and ``familiarity.png`` under ``--output-dir``; leaves the checkpoints as they are.
Not collected by pytest (tests/predictor/test_familiarity.py covers the code it calls).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402
import torch  # noqa: E402

from core.records import json_text  # noqa: E402
from pipeline.labelled import labelled_data  # noqa: E402
from predictor_train.data import sources_of, split_records, load_records  # noqa: E402
from predictor_train.evaluate import bucket_metrics  # noqa: E402
from predictor_train.familiarity import DEFAULT_K, fit_familiarity  # noqa: E402
from predictor_train.inference import LengthPredictor  # noqa: E402
from predictor_train.train import TrainConfig, training_splits  # noqa: E402


def auc_below(held: torch.Tensor, seen: torch.Tensor) -> float:
    """P(a held-out prompt scores below a seen one), ties counted half: 0.5 is no signal, 1.0 a clean split."""
    below = (held[:, None] < seen[None, :]).float() + 0.5 * (held[:, None] == seen[None, :]).float()
    return float(below.mean())


def within_one(lengths: list[int], predicted: list[int], rows: list[int], predictor: LengthPredictor):
    if not rows:
        return None
    return bucket_metrics([lengths[i] for i in rows], [predicted[i] for i in rows],
                          predictor.buckets)["within_one_accuracy"]


def held_out_record(folder: Path, data, test, *, bank_size: int, quantile: float, k: int) -> dict:
    predictor = LengthPredictor.load(folder)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{key: value for key, value in predictor.info.train_config.items() if key in known})
    (source,) = config.exclude_sources
    splits = training_splits(config, data)
    familiarity, _ = fit_familiarity(predictor, list(splits["train"]["prompt"]), list(splits["validation"]["prompt"]),
                                     bank_size=bank_size, quantile=quantile, k=k, seed=config.seed)
    prompts, lengths = list(test["prompt"]), [int(n) for n in test["num_output_tokens"]]
    logits, embedded = predictor.forward(prompts, embed=True)
    scores = familiarity.scores(embedded)
    flagged = familiarity.unfamiliar(scores).tolist()
    predicted = logits.argmax(1).tolist()  # the arg-max: the temperature does not move it
    held = [i for i, s in enumerate(sources_of(test)) if s == source]
    seen = [i for i, s in enumerate(sources_of(test)) if s != source]

    def share(rows):
        return sum(flagged[i] for i in rows) / len(rows)

    return {
        "held_out_source": source, "checkpoint_id": predictor.checkpoint_id, "threshold": familiarity.threshold,
        "bank_size": len(familiarity.bank), "n_held_out": len(held), "n_seen": len(seen),
        "held_out_unfamiliar_share": share(held), "seen_unfamiliar_share": share(seen),
        "auc": auc_below(scores[held], scores[seen]),
        "held_out_mean_familiarity": float(scores[held].mean()), "seen_mean_familiarity": float(scores[seen].mean()),
        "held_out_within_one_unfamiliar": within_one(lengths, predicted, [i for i in held if flagged[i]], predictor),
        "held_out_within_one_familiar": within_one(lengths, predicted, [i for i in held if not flagged[i]], predictor),
        "seen_within_one_unfamiliar": within_one(lengths, predicted, [i for i in seen if flagged[i]], predictor),
        "seen_within_one_familiar": within_one(lengths, predicted, [i for i in seen if not flagged[i]], predictor),
    }


def plot(results: list[dict], path: Path, quantile: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["held_out_source"] for r in results]
    x = torch.arange(len(names)).tolist()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.bar([i - 0.2 for i in x], [r["held_out_unfamiliar_share"] for r in results], 0.4,
           label="the held-out source's test prompts")
    ax.bar([i + 0.2 for i in x], [r["seen_unfamiliar_share"] for r in results], 0.4,
           label="the six sources trained on")
    ax.axhline(quantile, color="grey", lw=0.8, ls="--")
    ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share found unfamiliar")
    ax.set_title(f"Prompts a predictor never saw: found unfamiliar (threshold at {quantile:.0%} of validation)",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@click.command()
@click.option("--data", default="data/labelled", show_default=True)
@click.option("--loso-dir", default="runs/loso_9k", show_default=True,
              help="Output folder of benchmarks/leave_one_source_out.py: one checkpoint per held-out source.")
@click.option("--bank-size", type=int, default=TrainConfig.familiarity_bank_size, show_default=True)
@click.option("--quantile", type=float, default=TrainConfig.familiarity_quantile, show_default=True)
@click.option("--k", type=int, default=DEFAULT_K, show_default=True)
@click.option("--output-dir", default="runs/familiarity", show_default=True)
def main(data, loso_dir, bank_size, quantile, k, output_dir):
    dataset, _ = labelled_data(data)
    records = load_records(dataset)
    test = split_records(records)["test"]
    folders = sorted(p.parent for p in Path(loso_dir).glob("*/predictor.json")
                     if len(json.loads(p.read_text())["train_config"].get("exclude_sources") or []) == 1)
    if not folders:
        raise click.UsageError(f"no leave-one-source-out checkpoints under {loso_dir}")
    results = []
    for folder in folders:
        record = held_out_record(folder, records, test, bank_size=bank_size, quantile=quantile, k=k)
        results.append(record)
        click.echo(f"{record['held_out_source']}: unfamiliar {record['held_out_unfamiliar_share']:.1%} of its "
                   f"{record['n_held_out']} test prompts, {record['seen_unfamiliar_share']:.1%} of the seen sources' "
                   f"{record['n_seen']}; AUC {record['auc']:.2f}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"data": data, "loso_dir": loso_dir, "bank_size": bank_size, "quantile": quantile, "k": k}
    (out / "familiarity.json").write_text(json_text({**meta, "results": results}, indent=2))
    click.echo(f"wrote {out / 'familiarity.json'} and {plot(results, out / 'familiarity.png', quantile)}")


if __name__ == "__main__":
    main()
