"""How good is a length predictor, in buckets, in tokens and in probabilities, against free baselines.

Arg-max metrics (:func:`bucket_metrics`), over examples with true output length ``n`` (capped at ``max_tokens``,
since a generation cut at the cap says only "at least that long"), true bucket ``t`` and predicted bucket ``p``:

- ``accuracy``: ``p == t``; ``within_one_accuracy``: ``|p - t| <= 1``.
- ``mae_tokens``: mean ``|midpoint(p) - n|``.
- ``under_prediction_rate``: share with ``p < t``; these outgrow their reservation at serving time.
- ``mean_wasted_tokens`` = ``mean_over_reserved_tokens`` + ``mean_recomputed_tokens`` (each a mean over all
  examples). A request reserved at ``p >= t`` wastes ``upper_edge(p) - n`` reserved slots. An under-predicted one
  follows the s3 path in its worst case: at each overrun it is preempted and re-admitted one bucket larger,
  recomputing the tokens it had generated, ``upper_edge(b)`` for each ``b`` in ``p .. t-1``, and then wastes
  ``upper_edge(t) - n`` like any other. Not counted: the prompt's re-prefill after a preemption, and growth in
  place when memory is free (which costs nothing), so the recompute part is the cost on a full server.

Probability metrics (calibration.py): ``nll``, ``ece``, ``coverage_q50/70/90`` (of the bucket chosen at q), what
the probabilities promise it to be (``promised_coverage_q..``) and the coverage of the quantile in tokens
(``token_coverage_q..``), the mean absolute error of the median in tokens (``median_mae_tokens``) and the
within-one accuracy of the bucket whose three-bucket window is most probable (``window_within_one_accuracy``),
for the predictor without and with its stored temperature, and for the per-source histogram baseline.
Baselines: baselines.py; with ``neighbours=k`` also the k nearest training prompts in the untouched backbone's
embedding (slower: it embeds the train split).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from core.buckets import BucketSpec
from predictor_train.baselines import (baseline_buckets, encoder_embeddings, fit_length_regression,  # noqa: F401
                                       majority_bucket, neighbour_probs, regression_buckets, source_histogram_probs)
from predictor_train.calibration import probability_metrics, reliability_bins
from predictor_train.data import (cap_per_source, check_sources, drop_sources, labels_of, load_records, sources_of,
                                  split_records)
from predictor_train.plots import plot_confusion, plot_reliability

METRIC_NAMES = ("accuracy", "within_one_accuracy", "mae_tokens", "under_prediction_rate", "mean_wasted_tokens")


def _waste(spec: BucketSpec, n: int, t: int, p: int) -> tuple[float, float]:
    """(over-reserved, recomputed) tokens of one example; see the module docstring."""
    final = max(p, t)
    recomputed = sum(spec.upper_edge(b) for b in range(p, t))
    return float(spec.upper_edge(final) - n), float(recomputed)


def bucket_metrics(true_lengths: Sequence[int], predicted_buckets: Sequence[int],
                   spec: BucketSpec, *, weights: Sequence[float] | None = None) -> dict[str, float]:
    """The arg-max metrics of the module docstring, plus ``num_examples``. ``weights``: how many requests each
    example stands for (a sample drawn with unequal probabilities, weighted back); the means are weighted."""
    if len(true_lengths) != len(predicted_buckets):
        raise ValueError(f"{len(true_lengths)} lengths but {len(predicted_buckets)} predictions")
    if not true_lengths:
        raise ValueError("no examples to evaluate")
    weights = [1.0] * len(true_lengths) if weights is None else [float(w) for w in weights]
    lengths = [spec.clip(n) for n in true_lengths]
    triples = [(n, spec.bucket_of(n), int(p)) for n, p in zip(lengths, predicted_buckets)]
    waste = [_waste(spec, n, t, p) for n, t, p in triples]

    def mean(values) -> float:
        return sum(w * float(v) for w, v in zip(weights, values)) / sum(weights)

    over, recomputed = mean(w[0] for w in waste), mean(w[1] for w in waste)
    return {
        "accuracy": mean(p == t for _, t, p in triples),
        "within_one_accuracy": mean(abs(p - t) <= 1 for _, t, p in triples),
        "mae_tokens": mean(abs(spec.midpoint(p) - n) for n, _, p in triples),
        "under_prediction_rate": mean(p < t for _, t, p in triples),
        "mean_over_reserved_tokens": over,
        "mean_recomputed_tokens": recomputed,
        "mean_wasted_tokens": over + recomputed,
        "num_examples": float(len(triples)),
    }


def confusion_matrix(true_buckets: Sequence[int], predicted_buckets: Sequence[int],
                     num_buckets: int) -> list[list[int]]:
    """``matrix[true][predicted]`` counts."""
    matrix = [[0] * num_buckets for _ in range(num_buckets)]
    for t, p in zip(true_buckets, predicted_buckets):
        matrix[t][p] += 1
    return matrix


def _table(header: list[str], rows: list[list[str]]) -> str:
    rows = [header, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_table(results: dict[str, dict[str, float]], *, first: str = "method") -> str:
    """A plain-text table, one row per method (or source), one column per arg-max metric."""
    header = [first, "acc", "acc±1", "MAE tok", "under %", "wasted tok", "n"]
    rows = [[name, f"{m['accuracy']:.3f}", f"{m['within_one_accuracy']:.3f}", f"{m['mae_tokens']:.1f}",
             f"{100 * m['under_prediction_rate']:.1f}", f"{m['mean_wasted_tokens']:.1f}", f"{int(m['num_examples'])}"]
            for name, m in results.items()]
    return _table(header, rows)


def format_probability_table(results: dict[str, dict[str, float]]) -> str:
    """NLL, ECE and quantile coverage per probability source: of the bucket chosen at q (measured / promised by
    the probabilities) and of the quantile in tokens, the error of the median in tokens where present, and the
    within-one accuracy of the best three-bucket window."""
    header = ["probabilities", "NLL", "ECE", *(f"{kind} q.{q // 10}" for kind in ("cov", "promised", "tok cov")
                                               for q in (50, 70, 90)), "MAE median tok", "acc±1 window"]
    keys = [f"{kind}_q{q}" for kind in ("coverage", "promised_coverage", "token_coverage") for q in (50, 70, 90)]
    rows = [[name, f"{m['nll']:.3f}", f"{m['ece']:.3f}", *(f"{m[k]:.3f}" if k in m else "-" for k in keys),
             f"{m['median_mae_tokens']:.1f}" if "median_mae_tokens" in m else "-",
             f"{m['window_within_one_accuracy']:.3f}" if "window_within_one_accuracy" in m else "-"]
            for name, m in results.items()]
    return _table(header, rows)


@dataclasses.dataclass(frozen=True)
class EvalReport:
    """The outcome of evaluating a predictor on one split."""

    metrics: dict[str, dict[str, float]]
    """Arg-max metrics per method: ``predictor``, ``majority``, ``regression``, ``source_mean``."""
    table: str
    """Everything below as printable tables: methods, per-source rows, probabilities."""
    confusion: list[list[int]]
    """The predictor's confusion matrix, ``[true][predicted]``."""
    confusion_png: Path | None
    """Where the confusion-matrix plot was saved, if an output folder was given."""
    per_source: dict[str, dict[str, dict[str, float]]] = dataclasses.field(default_factory=dict)
    """``per_source[source][method]``: the arg-max metrics on that source's rows."""
    probabilities: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    """NLL, ECE and coverage per probability source (empty when the predictor gives no probabilities)."""
    reliability_png: Path | None = None
    """Where the reliability diagram was saved."""
    by_familiarity: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    """The predictor's arg-max metrics on the ``familiar`` and ``unfamiliar`` rows (predictor_train/familiarity.py),
    each with ``share`` of the rows; empty when the checkpoint keeps no training-prompt embeddings."""


def evaluate_predictor(predictor, data, *, split: str = "test", out_dir: str | Path | None = None,
                       batch_size: int = 32, quantile: float | None = None,
                       exclude_sources: Sequence[str] = (), neighbours: int = 0) -> EvalReport:
    """Evaluate a LengthPredictor on one split of ``data`` (path or Dataset), beside baselines fitted on the
    train rows the predictor was trained on (``rows_trained_on``).

    ``exclude_sources`` leaves those sources' rows out of every split after splitting, as training does, so the
    other sources keep exactly the rows they have in the whole data's splits.
    """
    records = load_records(data)
    check_sources(records, exclude_sources)
    splits = {name: drop_sources(rows, exclude_sources) for name, rows in split_records(records).items()}
    rows, train = splits[split], rows_trained_on(predictor, splits["train"])
    if len(rows) == 0 or len(train) == 0:
        raise ValueError(f"the {split} split or the train rows the predictor was trained on are empty ({len(rows)} "
                         f"/ {len(train)} rows); evaluation needs more data")
    return evaluate_rows(predictor, rows, train=train, out_dir=out_dir, batch_size=batch_size,
                         quantile=quantile, title=f"{split} split", neighbours=neighbours)


def rows_trained_on(predictor, train):
    """The rows of a train split that the checkpoint's training read: its ``exclude_sources`` dropped and its
    ``max_train_rows_per_source`` applied, as training does. The baselines are fitted on these, so that a per-source
    mean never knows a source the predictor was kept from, nor more rows of one than it saw."""
    config = getattr(getattr(predictor, "info", None), "train_config", None) or {}
    train = drop_sources(train, tuple(config.get("exclude_sources") or ()))
    return cap_per_source(train, int(config.get("max_train_rows_per_source") or 0))


def _predictor_probs(predictor, prompts: list[str], batch_size: int):
    """The probability lists by name (uncalibrated, calibrated, and blended with the neighbours' vote where the
    checkpoint fitted one; the last are the predictor's), the prompts' familiarity, and the name of the calibrated
    probabilities before the blend where there is one (else None), from one pass over the prompts; no probabilities
    for a predictor without logits, the familiarity None for one without a familiarity bank."""
    if hasattr(predictor, "outputs"):
        logits, probs, familiarity = predictor.outputs(prompts, batch_size=batch_size)
    elif hasattr(predictor, "predict_logits"):
        logits, familiarity = predictor.predict_logits(prompts, batch_size=batch_size), None
        probs = (logits / predictor.temperature).softmax(-1)
    else:
        return {}, None, None
    calibrated = f"predictor, T={predictor.temperature:.2f}"
    named = {"predictor, T=1": logits.softmax(-1).tolist(),
             calibrated: (logits / predictor.temperature).softmax(-1).tolist()}
    blend = getattr(predictor, "familiarity", None)
    if blend is None or not blend.neighbours or blend.weight >= 1:
        return named, familiarity, None
    named[f"{calibrated}, {blend.weight:.2f} + {blend.neighbours} neighbours"] = probs.tolist()
    return named, familiarity, calibrated


def _pick(probs: list[list[float]], quantile: float | None, spec: BucketSpec) -> list[int]:
    if quantile is None:
        return [max(range(len(row)), key=row.__getitem__) for row in probs]
    return [spec.quantile_bucket(row, quantile) for row in probs]


def neighbour_baseline(predictor, train, rows, *, k: int) -> list[list[float]]:
    """Bucket probabilities of ``rows`` from their ``k`` nearest ``train`` prompts, embedded by the backbone the
    checkpoint was fine-tuned from, untouched (baselines.py)."""
    from predictor_train.backbone import load_classifier

    config = getattr(getattr(predictor, "info", None), "train_config", None)
    if not config:
        raise ValueError("the neighbours baseline needs a trained checkpoint (it embeds with its backbone)")
    spec = predictor.buckets
    backbone = load_classifier(config["backbone"], spec, seed=int(config.get("seed", 0)))
    embed = dict(max_prompt_tokens=predictor.max_prompt_tokens, truncation=predictor.prompt_truncation)
    probs = neighbour_probs(encoder_embeddings(backbone, list(train["prompt"]), **embed),
                            labels_of(train["num_output_tokens"], spec),
                            encoder_embeddings(backbone, list(rows["prompt"]), **embed), k=k,
                            num_buckets=spec.num_buckets)
    return probs.tolist()


def evaluate_rows(predictor, rows, *, train, out_dir: str | Path | None = None, batch_size: int = 32,
                  quantile: float | None = None, title: str = "", neighbours: int = 0) -> EvalReport:
    """Evaluate on given rows (Dataset or column dict), with baselines fitted on ``train`` (``neighbours=k``:
    also the k-nearest-prompts baseline)."""
    spec, prompts = predictor.buckets, list(rows["prompt"])
    named, familiarity, unblended = _predictor_probs(predictor, prompts, batch_size)
    calibrated = list(named.values())[-1] if named else None  # what the predictor answers with
    if calibrated is None:
        predicted = [p.bucket for p in predictor.predict(prompts, batch_size=batch_size, quantile=quantile)]
    else:
        predicted = _pick(calibrated, quantile, spec)
    lengths = [int(n) for n in rows["num_output_tokens"]]
    labels = [spec.bucket_of(n) for n in lengths]
    methods = {"predictor": predicted, **baseline_buckets(train, rows, spec)}
    if unblended is not None:  # the same predictor without its neighbours' vote, beside it
        methods["predictor, no neighbours"] = _pick(named[unblended], quantile, spec)
    near = neighbour_baseline(predictor, train, rows, k=neighbours) if neighbours else None
    if near is not None:
        methods["neighbours"] = _pick(near, None, spec)
    metrics = {name: bucket_metrics(lengths, buckets, spec) for name, buckets in methods.items()}
    per_source = per_source_metrics(rows, lengths, methods, spec)
    probabilities, curves = {}, {}
    if calibrated is not None:
        named = {**named, "source histogram": source_histogram_probs(train, rows, spec),
                 **({f"neighbours, k={neighbours}": near} if near is not None else {})}
        probabilities = {name: probability_metrics(p, labels, spec, lengths) for name, p in named.items()}
        curves = {name: reliability_bins(p, labels) for name, p in named.items()}
    matrix = confusion_matrix(labels, predicted, spec.num_buckets)
    png = reliability_png = None
    label = f"{predictor.checkpoint_id} on {title}".strip()
    if out_dir is not None:
        png = plot_confusion(matrix, spec, Path(out_dir) / "confusion_matrix.png", title=label)
        if curves:
            reliability_png = plot_reliability(curves, Path(out_dir) / "reliability.png", title=label)
    by_familiarity = {} if familiarity is None else familiarity_metrics(predictor, familiarity, lengths, predicted)
    table = _report_table(metrics, per_source, probabilities, by_familiarity)
    return EvalReport(metrics=metrics, table=table, confusion=matrix, confusion_png=png, per_source=per_source,
                      probabilities=probabilities, reliability_png=reliability_png, by_familiarity=by_familiarity)


def familiarity_metrics(predictor, familiarity, lengths: list[int], predicted: list[int]) -> dict[str, dict]:
    """The predictor's metrics on the prompts it finds familiar and on those it does not, by their ``familiarity``
    scores, with each group's share of the rows."""
    groups = ["unfamiliar" if u else "familiar" for u in predictor.familiarity.unfamiliar(familiarity).tolist()]
    by_group = metrics_by_group(groups, lengths, {"predictor": predicted}, predictor.buckets)
    return {group: {"share": groups.count(group) / len(groups), **m["predictor"]} for group, m in by_group.items()}


def per_source_metrics(rows, lengths: list[int], methods: dict[str, list[int]], spec: BucketSpec) -> dict:
    """``{source: {method: bucket_metrics}}`` of each method's predicted buckets on each source's rows."""
    return metrics_by_group(sources_of(rows), lengths, methods, spec)


def metrics_by_group(groups: Sequence[str], lengths: list[int], methods: dict[str, list[int]],
                     spec: BucketSpec) -> dict:
    """``{group: {method: bucket_metrics}}`` of each method's predicted buckets on each group's rows."""
    out = {}
    for group in sorted(set(groups)):
        idx = [i for i, g in enumerate(groups) if g == group]
        out[group] = {name: bucket_metrics([lengths[i] for i in idx], [buckets[i] for i in idx], spec)
                      for name, buckets in methods.items()}
    return out


def _report_table(metrics: dict, per_source: dict, probabilities: dict, by_familiarity: dict) -> str:
    blocks = [format_table(metrics)]
    if len(per_source) > 1:
        predictor_rows = {s: m["predictor"] for s, m in per_source.items()}
        lines = format_table(predictor_rows, first="predictor by source").splitlines()
        best = {s: max(m[b]["within_one_accuracy"] for b in m if not b.startswith("predictor")) for s, m in per_source.items()}
        lines[0] += "  best baseline acc±1"
        lines[1] += "-" * 21
        lines[2:] = [f"{line}  {best[s]:>19.3f}" for line, s in zip(lines[2:], per_source)]
        blocks.append("\n".join(lines))
    if probabilities:
        blocks.append(format_probability_table(probabilities))
    if by_familiarity:
        blocks.append(format_table(by_familiarity, first="predictor by familiarity"))
    return "\n\n".join(blocks)


def evaluate_checkpoint(checkpoint_dir: str | Path, data, *, split: str = "test",
                        out_dir: str | Path | None = None, batch_size: int = 32,
                        quantile: float | None = None, exclude_sources: Sequence[str] = (),
                        neighbours: int = 0) -> EvalReport:
    """Load a checkpoint and evaluate it (the ``s3 evaluate`` entry point)."""
    from predictor_train.inference import LengthPredictor

    predictor = LengthPredictor.load(checkpoint_dir)
    return evaluate_predictor(predictor, data, split=split, out_dir=out_dir, batch_size=batch_size,
                              quantile=quantile, exclude_sources=exclude_sources, neighbours=neighbours)
