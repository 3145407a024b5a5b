"""Training losses over length buckets: plain cross-entropy, and two that know the buckets are ordered.

- ``ce``: weighted cross-entropy on the true bucket; a miss by one bucket costs what a miss by nine does.
- ``soft``: cross-entropy against soft labels, a Gaussian over bucket indices centred on the true bucket
  (``label_sigma`` buckets wide): the neighbours of the true bucket get some of the target mass.
- ``rps``: cross-entropy plus ``rps_weight`` times the ranked probability score, the squared distance between
  the predicted and the true cumulative distributions over buckets; the cumulative distribution is what a
  quantile reservation reads, and mass far from the truth costs more than mass next to it.

Each example is weighted by its true bucket's class weight, normalised as ``F.cross_entropy(weight=...)`` does.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

LossKind = Literal["ce", "soft", "rps"]


def soft_targets(target: torch.Tensor, num_buckets: int, sigma: float) -> torch.Tensor:
    """``(B, K)`` target distributions: ``exp(-(k - y)^2 / (2 sigma^2))`` normalised over k."""
    k = torch.arange(num_buckets, device=target.device, dtype=torch.float32)  # (K,)
    d = k[None, :] - target[:, None].float()  # (B, K)
    q = torch.exp(-0.5 * (d / sigma) ** 2)
    return q / q.sum(dim=-1, keepdim=True)


def ranked_probability_score(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(B,)`` sum over buckets of (predicted CDF - true CDF)^2."""
    cdf = probs.cumsum(dim=-1)  # (B, K)
    k = torch.arange(probs.shape[-1], device=probs.device)
    true_cdf = (k[None, :] >= target[:, None]).float()  # (B, K): 1 from the true bucket on
    return ((cdf - true_cdf) ** 2).sum(dim=-1)


def length_loss(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, *, kind: LossKind = "ce",
                label_sigma: float = 1.0, rps_weight: float = 1.0) -> torch.Tensor:
    """The training loss of a batch: ``logits (B, K)``, ``target (B,)`` bucket indices, ``weights (K,)``."""
    logits = logits.float()
    if kind == "ce":
        return F.cross_entropy(logits, target, weight=weights)
    w = weights[target]  # (B,)
    log_p = logits.log_softmax(dim=-1)
    if kind == "soft":
        per_example = -(soft_targets(target, logits.shape[-1], label_sigma) * log_p).sum(dim=-1)
    elif kind == "rps":
        per_example = -log_p.gather(1, target[:, None]).squeeze(1)
        per_example = per_example + rps_weight * ranked_probability_score(log_p.exp(), target)
    else:
        raise ValueError(f"unknown loss {kind!r}; use ce, soft or rps")
    return (w * per_example).sum() / w.sum()
