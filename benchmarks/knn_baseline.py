"""Nearest neighbours in the frozen encoder's embedding space: a length baseline that needs no training.

    .venv/bin/python benchmarks/knn_baseline.py --predictor runs/predictor_9k_4ep --output-dir runs/knn

Each prompt is embedded by the encoder the predictor is fine-tuned from, untouched (``--backbone``, default
MiniLM-L6: the mean of its last hidden states, L2-normalised, the sentence embedding it was trained to give), and
its bucket probabilities are the buckets of its ``k`` most similar training prompts (cosine), with 2% of the
training frequencies mixed in (`predictor_train.baselines.neighbour_probs`). ``k`` is chosen on the validation
split by within-one accuracy. On the test split it reports the `s3 evaluate` metrics of those probabilities and,
with ``--predictor``, of the checkpoint (with its temperature) and of the average of the two (the weight chosen on
validation). Then leave-one-source-out: each source's rows are taken out of the neighbours (which keep at most
``--loso-rows-per-source`` rows of each other source, the budget of benchmarks/leave_one_source_out.py) and its
test rows are scored. Writes ``knn.json`` (a ``results`` list) under ``--output-dir``. Not collected by pytest.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402
import torch  # noqa: E402

from core.buckets import BucketSpec  # noqa: E402
from core.records import json_text  # noqa: E402
from pipeline.labelled import labelled_data  # noqa: E402
from predictor_train.backbone import load_classifier  # noqa: E402
from predictor_train.baselines import encoder_embeddings, neighbour_probs  # noqa: E402
from predictor_train.calibration import probability_metrics  # noqa: E402
from predictor_train.data import cap_per_source, labels_of, load_records, sources_of, split_records  # noqa: E402
from predictor_train.evaluate import bucket_metrics, per_source_metrics  # noqa: E402
from predictor_train.inference import LengthPredictor  # noqa: E402
from predictor_train.train import TrainConfig  # noqa: E402

MIX_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
"""Weights of the predictor in the averaged distribution tried on validation."""


def scores(probs: torch.Tensor, lengths: list[int], spec: BucketSpec) -> dict[str, float]:
    """`s3 evaluate`'s arg-max and probability metrics of one set of bucket probabilities."""
    rows = probs.tolist()
    return {**bucket_metrics(lengths, probs.argmax(1).tolist(), spec),
            **probability_metrics(rows, labels_of(lengths, spec), spec, lengths=lengths)}


def choose_k(train_emb, train_buckets, val_emb, val_lengths, k_values, spec) -> tuple[int, dict[int, float]]:
    """The ``k`` with the best validation within-one accuracy (the smallest on ties), and every k's."""
    within = {}
    for k in k_values:
        probs = neighbour_probs(train_emb, train_buckets, val_emb, k=k, num_buckets=spec.num_buckets)
        within[k] = bucket_metrics(val_lengths, probs.argmax(1).tolist(), spec)["within_one_accuracy"]
    return max(k_values, key=lambda k: (within[k], -k)), within


@click.command()
@click.option("--data", default="data/labelled", show_default=True)
@click.option("--backbone", default=TrainConfig.backbone, show_default=True,
              help="Encoder to embed with: minilm, tiny-random or a Hugging Face folder.")
@click.option("--predictor", default=None, help="A checkpoint to score beside it and to average with.")
@click.option("--k-values", default="5,10,20,50,100,200", show_default=True)
@click.option("--max-prompt-tokens", type=int, default=128, show_default=True)
@click.option("--max-tokens", type=int, default=TrainConfig.max_tokens, show_default=True,
              help="Bucket range (ignored with --predictor: its buckets are used).")
@click.option("--num-buckets", type=int, default=TrainConfig.num_buckets, show_default=True)
@click.option("--loso-rows-per-source", type=int, default=300, show_default=True,
              help="Leave-one-source-out: neighbours kept per other source (0: all).")
@click.option("--output-dir", default="runs/knn", show_default=True)
def main(data, backbone, predictor, k_values, max_prompt_tokens, max_tokens, num_buckets, loso_rows_per_source,
         output_dir):
    dataset, _ = labelled_data(data)
    splits = split_records(load_records(dataset))
    checkpoint = LengthPredictor.load(predictor) if predictor else None
    spec = checkpoint.buckets if checkpoint else BucketSpec.uniform(max_tokens, num_buckets)
    encoder = load_classifier(backbone, spec)
    emb = {name: encoder_embeddings(encoder, list(split["prompt"]), max_prompt_tokens=max_prompt_tokens)
           for name, split in splits.items()}
    lengths = {name: [int(n) for n in split["num_output_tokens"]] for name, split in splits.items()}
    buckets = {name: labels_of(lengths[name], spec) for name in splits}
    sources = {name: sources_of(split) for name, split in splits.items()}
    ks = [int(k) for k in k_values.split(",")]

    k, val_within = choose_k(emb["train"], buckets["train"], emb["validation"], lengths["validation"], ks, spec)
    click.echo(f"validation within one by k: {', '.join(f'{k}: {v:.1%}' for k, v in val_within.items())}; k = {k}")
    knn = {name: neighbour_probs(emb["train"], buckets["train"], emb[name], k=k, num_buckets=spec.num_buckets)
           for name in ("validation", "test")}
    methods = {f"knn (k={k})": knn["test"]}
    if checkpoint is not None:
        model = {name: checkpoint.predict_probs(list(splits[name]["prompt"])) for name in ("validation", "test")}
        weight = max(MIX_WEIGHTS, key=lambda w: bucket_metrics(
            lengths["validation"], (w * model["validation"] + (1 - w) * knn["validation"]).argmax(1).tolist(),
            spec)["within_one_accuracy"])
        methods[f"predictor {checkpoint.checkpoint_id}"] = model["test"]
        methods[f"average, predictor weight {weight}"] = weight * model["test"] + (1 - weight) * knn["test"]
    results = []
    for method, probs in methods.items():
        by_source = per_source_metrics(splits["test"], lengths["test"], {method: probs.argmax(1).tolist()}, spec)
        record = {"method": method, "split": "test", "k": k, **scores(probs, lengths["test"], spec),
                  "within_one_by_source": {s: m[method]["within_one_accuracy"] for s, m in by_source.items()}}
        results.append(record)
        click.echo(f"{method}: accuracy {record['accuracy']:.1%}, within one {record['within_one_accuracy']:.1%} "
                   f"(window {record['window_within_one_accuracy']:.1%}), MAE {record['mae_tokens']:.1f}, "
                   f"under {record['under_prediction_rate']:.1%}, NLL {record['nll']:.3f}, ECE {record['ece']:.3f}")

    train_rows = cap_per_source(splits["train"], loso_rows_per_source)
    keep = {p: i for i, p in enumerate(splits["train"]["prompt"])}
    index = [keep[p] for p in train_rows["prompt"]]
    for source in sorted(set(sources["test"])):
        pool = [i for i in index if sources["train"][i] != source]
        if not pool:
            continue  # one source only: nothing else to be near
        rows = [i for i, s in enumerate(sources["test"]) if s == source]
        probs = neighbour_probs(emb["train"][pool], [buckets["train"][i] for i in pool], emb["test"][rows], k=k,
                                num_buckets=spec.num_buckets)
        record = {"method": f"knn (k={k}), source never seen", "split": "test", "held_out_source": source,
                  **bucket_metrics([lengths["test"][i] for i in rows], probs.argmax(1).tolist(), spec)}
        results.append(record)
        click.echo(f"{source} never seen: within one {record['within_one_accuracy']:.1%}, MAE "
                   f"{record['mae_tokens']:.1f}, under {record['under_prediction_rate']:.1%} (n={len(rows)})")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"data": data, "backbone": backbone, "predictor": predictor, "max_prompt_tokens": max_prompt_tokens,
            "validation_within_one_by_k": val_within, "loso_rows_per_source": loso_rows_per_source}
    (out / "knn.json").write_text(json_text({**meta, "results": results}, indent=2))
    click.echo(f"wrote {out / 'knn.json'}")


if __name__ == "__main__":
    main()
