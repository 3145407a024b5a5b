"""Are the bucket probabilities honest? Temperature scaling, NLL, expected calibration error, quantile coverage.

The scheduler reads the probabilities, not only the arg-max: a quantile reservation takes the smallest bucket
whose cumulative probability reaches q, so about a share q of requests should fit in it (a little more: the
bucket overshoots q by part of its own mass, which :func:`promised_coverage` measures; the quantile in tokens,
:func:`token_quantile_coverage`, has no overshoot). Temperature scaling
(Guo et al., 2017) divides the logits by one scalar T fitted on the validation split by minimising the NLL; it
changes no arg-max. The checkpoint stores T and :class:`~predictor_train.inference.LengthPredictor` applies it.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from core.buckets import BucketSpec

COVERAGE_QUANTILES = (0.5, 0.7, 0.9)
NUM_ECE_BINS = 15


def fit_temperature(logits: torch.Tensor, labels: Sequence[int], *, max_iter: int = 200) -> float:
    """The T > 0 minimising the mean NLL of ``softmax(logits / T)`` on the labels (LBFGS on log T)."""
    logits = logits.detach().float().clone()  # may come from inference mode
    target = torch.as_tensor(list(labels), dtype=torch.long)
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), target)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def choose_temperature(logits: torch.Tensor, labels: Sequence[int]) -> tuple[float, float]:
    """(the temperature to keep, the fitted one): `fit_temperature`'s, unless it raises the expected calibration
    error on the same labels; then 1."""
    fitted = fit_temperature(logits, labels)
    before, after = logits.softmax(-1).tolist(), (logits / fitted).softmax(-1).tolist()
    worse = expected_calibration_error(after, labels) > expected_calibration_error(before, labels)
    return (1.0 if worse else fitted), fitted


def nll(probs: Sequence[Sequence[float]], labels: Sequence[int]) -> float:
    """Mean negative log-likelihood of the true buckets (probabilities floored at 1e-12)."""
    return sum(-math.log(max(row[y], 1e-12)) for row, y in zip(probs, labels)) / len(labels)


def reliability_bins(probs: Sequence[Sequence[float]], labels: Sequence[int],
                     num_bins: int = NUM_ECE_BINS) -> list[tuple[float, float, int]]:
    """Per equal-width confidence bin: (mean top-bucket probability, share where it was right, count)."""
    sums = [[0.0, 0.0, 0] for _ in range(num_bins)]
    for row, y in zip(probs, labels):
        top = max(range(len(row)), key=row.__getitem__)
        b = min(int(row[top] * num_bins), num_bins - 1)
        sums[b][0] += row[top]
        sums[b][1] += float(top == y)
        sums[b][2] += 1
    return [(c / n, a / n, n) if n else (math.nan, math.nan, 0) for c, a, n in sums]


def expected_calibration_error(probs: Sequence[Sequence[float]], labels: Sequence[int],
                               num_bins: int = NUM_ECE_BINS) -> float:
    """Top-label ECE: the count-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    bins = reliability_bins(probs, labels, num_bins)
    total = sum(n for _, _, n in bins)
    return sum(n * abs(acc - conf) for conf, acc, n in bins if n) / total


def quantile_coverage(probs: Sequence[Sequence[float]], labels: Sequence[int], spec: BucketSpec,
                      quantiles: Sequence[float] = COVERAGE_QUANTILES) -> dict[float, float]:
    """For each q, the share of examples whose true bucket is at or under the bucket chosen at quantile q."""
    return {q: sum(spec.quantile_bucket(row, q) >= y for row, y in zip(probs, labels)) / len(labels)
            for q in quantiles}


def promised_coverage(probs: Sequence[Sequence[float]], spec: BucketSpec,
                      quantiles: Sequence[float] = COVERAGE_QUANTILES) -> dict[float, float]:
    """For each q, the coverage the probabilities themselves promise: the mean cumulative probability of the bucket
    chosen at q. A calibrated predictor's :func:`quantile_coverage` is close to this, which is above q: the chosen
    bucket is the first whose cumulative probability *reaches* q, so it overshoots by part of that bucket's mass."""
    def reached(row, bucket):
        return sum(row[: bucket + 1]) / sum(row)

    return {q: sum(reached(row, spec.quantile_bucket(row, q)) for row in probs) / len(probs) for q in quantiles}


def token_quantile_coverage(probs: Sequence[Sequence[float]], lengths: Sequence[int], spec: BucketSpec,
                            quantiles: Sequence[float] = COVERAGE_QUANTILES) -> dict[float, float]:
    """For each q, the share of examples whose true length is at or under the q-quantile *in tokens* of their
    distribution, lengths uniform inside each bucket (the estimate the `s3` scheduler takes before a request has
    written anything). Free of the bucket overshoot, so a calibrated predictor's share is close to q itself."""
    capped = [spec.clip(n) for n in lengths]
    return {q: sum(n <= spec.quantile_length(row, q) for row, n in zip(probs, capped)) / len(capped)
            for q in quantiles}


def median_absolute_error(probs: Sequence[Sequence[float]], lengths: Sequence[int], spec: BucketSpec) -> float:
    """Mean |median - n| in tokens, the median of each distribution taken with lengths uniform inside each bucket:
    the point estimate that minimises the expected absolute error, where the arg-max bucket's midpoint (the
    ``mae_tokens`` of evaluate.py) does not."""
    capped = [spec.clip(n) for n in lengths]
    return sum(abs(spec.quantile_length(row, 0.5) - n) for row, n in zip(probs, capped)) / len(capped)


def window_buckets(probs: Sequence[Sequence[float]]) -> list[int]:
    """Per row, the bucket whose window of itself and its two neighbours holds the most probability: the point
    estimate that maximises the expected within-one-bucket accuracy, where the arg-max bucket does not (a bucket
    at an edge has one neighbour)."""
    def window(row, b):
        return sum(row[max(b - 1, 0):b + 2])

    return [max(range(len(row)), key=lambda b: (window(row, b), row[b])) for row in probs]


def window_within_one(probs: Sequence[Sequence[float]], labels: Sequence[int]) -> float:
    """Within-one-bucket accuracy of :func:`window_buckets`."""
    return sum(abs(b - y) <= 1 for b, y in zip(window_buckets(probs), labels)) / len(labels)


def probability_metrics(probs: Sequence[Sequence[float]], labels: Sequence[int], spec: BucketSpec,
                        lengths: Sequence[int] | None = None) -> dict[str, float]:
    """``nll``, ``ece``, ``coverage_q{50,70,90}`` (buckets), ``promised_coverage_q..`` and
    ``window_within_one_accuracy`` of one set of bucket probabilities; with the true ``lengths`` also
    ``token_coverage_q..`` and ``median_mae_tokens``."""
    out = {"nll": nll(probs, labels), "ece": expected_calibration_error(probs, labels),
           "window_within_one_accuracy": window_within_one(probs, labels)}
    for q, share in quantile_coverage(probs, labels, spec).items():
        out[f"coverage_q{round(100 * q)}"] = share
    for q, share in promised_coverage(probs, spec).items():
        out[f"promised_coverage_q{round(100 * q)}"] = share
    if lengths is not None:
        for q, share in token_quantile_coverage(probs, lengths, spec).items():
            out[f"token_coverage_q{round(100 * q)}"] = share
        out["median_mae_tokens"] = median_absolute_error(probs, lengths, spec)
    return out


def calibrate_checkpoint(folder, prompts: Sequence[str], lengths: Sequence[int], *, batch_size: int = 64):
    """Fit the temperature on (validation) prompts, write it into the checkpoint; returns the new CheckpointInfo.

    The fit minimises NLL; where that raises the expected calibration error on the same prompts (few of them:
    T = 0.30 took a 150-row predictor's ECE from 0.060 to 0.090, 0.037 to 0.110 on its test split), the checkpoint
    keeps T = 1. ``metrics`` gains ``temperature`` (the one kept), ``temperature_fitted`` and the validation NLL
    and ECE before and after."""
    import dataclasses

    from predictor_train.checkpoint import update_info
    from predictor_train.inference import LengthPredictor

    predictor = LengthPredictor.load(folder)
    spec = predictor.buckets
    labels = [spec.bucket_of(int(n)) for n in lengths]
    logits = predictor.predict_logits(list(prompts), batch_size=batch_size)
    temperature, fitted = choose_temperature(logits, labels)
    before, after = logits.softmax(-1).tolist(), (logits / temperature).softmax(-1).tolist()
    metrics = {**predictor.info.metrics, "temperature": temperature, "temperature_fitted": fitted,
               "nll_uncalibrated": nll(before, labels), "nll_calibrated": nll(after, labels),
               "ece_uncalibrated": expected_calibration_error(before, labels),
               "ece_calibrated": expected_calibration_error(after, labels)}
    return update_info(folder, dataclasses.replace(predictor.info, temperature=temperature, metrics=metrics))
