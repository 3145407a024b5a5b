"""How good is a length predictor, in buckets and in tokens, against two free baselines.

Metrics (:func:`bucket_metrics`), over examples with true output length ``n`` (capped at ``max_tokens``, since a
generation cut at the cap says only "at least that long") and predicted bucket ``p``:

- ``accuracy``: ``p`` is the true bucket.
- ``within_one_accuracy``: ``p`` is at most one bucket away from the true one.
- ``mae_tokens``: mean ``|midpoint(p) - n|``.
- ``under_prediction_rate``: share with ``p`` below the true bucket; these outgrow their reservation at serving
  time and must grow or be preempted.
- ``mean_unused_reserved_tokens``: mean ``upper_edge(p) - n`` over the examples that are *not* under-predicted
  (under-predicted ones use their whole reservation and then some, so they are left out; NaN if there are none).
  This is the KV memory a reservation wastes.

Baselines, fitted on the train split: ``majority`` (always the most common training bucket) and ``regression``
(least squares of output length on prompt length, the prediction mapped to its bucket).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from pathlib import Path
from typing import Sequence

from core.buckets import BucketSpec
from predictor_train.data import load_records, split_records

METRIC_NAMES = ("accuracy", "within_one_accuracy", "mae_tokens", "under_prediction_rate",
                "mean_unused_reserved_tokens")


def bucket_metrics(true_lengths: Sequence[int], predicted_buckets: Sequence[int],
                   spec: BucketSpec) -> dict[str, float]:
    """The metrics of the module docstring, plus ``num_examples``."""
    if len(true_lengths) != len(predicted_buckets):
        raise ValueError(f"{len(true_lengths)} lengths but {len(predicted_buckets)} predictions")
    if not true_lengths:
        raise ValueError("no examples to evaluate")
    lengths = [min(int(n), spec.max_tokens) for n in true_lengths]
    truth = [spec.bucket_of(n) for n in lengths]
    pairs = list(zip(lengths, truth, predicted_buckets))
    unused = [spec.upper_edge(p) - n for n, t, p in pairs if p >= t]
    return {
        "accuracy": _mean(p == t for _, t, p in pairs),
        "within_one_accuracy": _mean(abs(p - t) <= 1 for _, t, p in pairs),
        "mae_tokens": _mean(abs(spec.midpoint(p) - n) for n, _, p in pairs),
        "under_prediction_rate": _mean(p < t for _, t, p in pairs),
        "mean_unused_reserved_tokens": _mean(unused) if unused else math.nan,
        "num_examples": float(len(pairs)),
    }


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values)


def majority_bucket(train_lengths: Sequence[int], spec: BucketSpec) -> int:
    """The most common bucket in the training lengths (the lower one on ties)."""
    counts = Counter(spec.bucket_of(int(n)) for n in train_lengths)
    return min(counts, key=lambda b: (-counts[b], b))


def fit_length_regression(prompt_tokens: Sequence[int], output_tokens: Sequence[int]) -> tuple[float, float]:
    """Least squares ``output ≈ slope * prompt + intercept``; a flat line when prompt lengths do not vary."""
    n = len(prompt_tokens)
    if n == 0:
        raise ValueError("cannot fit a regression on no examples")
    mx, my = sum(prompt_tokens) / n, sum(output_tokens) / n
    var = sum((x - mx) ** 2 for x in prompt_tokens)
    if var == 0:
        return 0.0, my
    slope = sum((x - mx) * (y - my) for x, y in zip(prompt_tokens, output_tokens)) / var
    return slope, my - slope * mx


def regression_buckets(prompt_tokens: Sequence[int], line: tuple[float, float], spec: BucketSpec) -> list[int]:
    slope, intercept = line
    return [spec.bucket_of(max(0, round(slope * x + intercept))) for x in prompt_tokens]


def confusion_matrix(true_buckets: Sequence[int], predicted_buckets: Sequence[int],
                     num_buckets: int) -> list[list[int]]:
    """``matrix[true][predicted]`` counts."""
    matrix = [[0] * num_buckets for _ in range(num_buckets)]
    for t, p in zip(true_buckets, predicted_buckets):
        matrix[t][p] += 1
    return matrix


def plot_confusion(matrix: list[list[int]], spec: BucketSpec, path: str | Path, *, title: str = "") -> Path:
    """Save the confusion matrix as a PNG (rows: true bucket, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in tests
    import matplotlib.pyplot as plt

    k = spec.num_buckets
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * k, 0.8 + 0.6 * k))
    ax.imshow(matrix, cmap="Blues")
    ticks = [f"≤{spec.upper_edge(b)}" for b in range(k)]
    ax.set_xticks(range(k), ticks, rotation=60, fontsize=8)
    ax.set_yticks(range(k), ticks, fontsize=8)
    ax.set_xlabel("predicted bucket (upper edge, tokens)")
    ax.set_ylabel("true bucket")
    ax.set_title(title or "length predictor confusion matrix")
    peak = max(max(row) for row in matrix) or 1
    for t in range(k):
        for p in range(k):
            if matrix[t][p]:
                colour = "white" if matrix[t][p] > peak / 2 else "black"
                ax.text(p, t, str(matrix[t][p]), ha="center", va="center", fontsize=7, color=colour)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A plain-text table, one row per method, one column per metric."""
    header = ["method", "acc", "acc±1", "MAE tok", "under %", "unused tok", "n"]
    rows = [header]
    for method, m in results.items():
        rows.append([method, f"{m['accuracy']:.3f}", f"{m['within_one_accuracy']:.3f}", f"{m['mae_tokens']:.1f}",
                     f"{100 * m['under_prediction_rate']:.1f}", f"{m['mean_unused_reserved_tokens']:.1f}",
                     f"{int(m['num_examples'])}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class EvalReport:
    """The outcome of evaluating a predictor on one split."""

    metrics: dict[str, dict[str, float]]
    """Metrics per method: ``predictor``, ``majority``, ``regression``."""
    table: str
    """``metrics`` as a printable table."""
    confusion: list[list[int]]
    """The predictor's confusion matrix, ``[true][predicted]``."""
    confusion_png: Path | None
    """Where the confusion-matrix plot was saved, if an output folder was given."""


def baseline_buckets(train, rows, spec: BucketSpec) -> dict[str, list[int]]:
    """Predictions of the two baselines (fitted on ``train``) for ``rows``; both are datasets or column dicts."""
    train_outputs = [int(n) for n in train["num_output_tokens"]]
    majority = majority_bucket(train_outputs, spec)
    line = fit_length_regression([int(n) for n in train["num_prompt_tokens"]], train_outputs)
    return {
        "majority": [majority] * len(rows["prompt"]),
        "regression": regression_buckets([int(n) for n in rows["num_prompt_tokens"]], line, spec),
    }


def evaluate_predictor(predictor, data, *, split: str = "test", out_dir: str | Path | None = None,
                       batch_size: int = 32, quantile: float | None = None) -> EvalReport:
    """Evaluate a LengthPredictor on one hash split of ``data`` (path or Dataset), with baselines from train."""
    splits = split_records(load_records(data))
    rows = splits[split]
    if len(rows) == 0 or len(splits["train"]) == 0:
        raise ValueError(f"the {split} or train split is empty ({len(rows)} / {len(splits['train'])} rows); "
                         "evaluation needs more data")
    return evaluate_rows(predictor, rows, train=splits["train"], out_dir=out_dir, batch_size=batch_size,
                         quantile=quantile, title=f"{split} split")


def evaluate_rows(predictor, rows, *, train, out_dir: str | Path | None = None, batch_size: int = 32,
                  quantile: float | None = None, title: str = "") -> EvalReport:
    """Evaluate on given rows (Dataset or column dict), with baselines fitted on ``train``."""
    spec = predictor.buckets
    predicted = [p.bucket for p in predictor.predict(list(rows["prompt"]), batch_size=batch_size,
                                                       quantile=quantile)]
    lengths = list(rows["num_output_tokens"])
    methods = {"predictor": predicted, **baseline_buckets(train, rows, spec)}
    metrics = {name: bucket_metrics(lengths, buckets, spec) for name, buckets in methods.items()}
    matrix = confusion_matrix([spec.bucket_of(n) for n in lengths], predicted, spec.num_buckets)
    png = None
    if out_dir is not None:
        png = plot_confusion(matrix, spec, Path(out_dir) / "confusion_matrix.png",
                             title=f"{predictor.checkpoint_id} on {title}".strip())
    return EvalReport(metrics=metrics, table=format_table(metrics), confusion=matrix, confusion_png=png)


def evaluate_checkpoint(checkpoint_dir: str | Path, data, *, split: str = "test",
                        out_dir: str | Path | None = None, batch_size: int = 32,
                        quantile: float | None = None) -> EvalReport:
    """Load a checkpoint and evaluate it (the ``s3 evaluate`` entry point)."""
    from predictor_train.inference import LengthPredictor

    predictor = LengthPredictor.load(checkpoint_dir)
    return evaluate_predictor(predictor, data, split=split, out_dir=out_dir, batch_size=batch_size,
                              quantile=quantile)
