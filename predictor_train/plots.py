"""The predictor's figures: confusion matrix and reliability diagram (matplotlib, no display)."""

from __future__ import annotations

import math
from pathlib import Path

from core.buckets import BucketSpec


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in tests
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_confusion(matrix: list[list[int]], spec: BucketSpec, path: str | Path, *, title: str = "") -> Path:
    """Save the confusion matrix as a PNG (rows: true bucket, columns: predicted)."""
    plt = _pyplot()
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
    return _save(fig, path)


def plot_reliability(curves: dict[str, list[tuple[float, float, int]]], path: str | Path, *,
                     title: str = "") -> Path:
    """Reliability diagram: per confidence bin, the share right against the mean top-bucket probability."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for name, bins in curves.items():
        points = [(c, a) for c, a, n in bins if n and not math.isnan(c)]
        ax.plot([c for c, _ in points], [a for _, a in points], marker="o", markersize=3, label=name)
    ax.set_xlabel("top-bucket probability (bin mean)")
    ax.set_ylabel("share whose top bucket was right")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title(title or "length predictor reliability", fontsize=9)
    return _save(fig, path)
