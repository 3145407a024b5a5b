"""How familiar a prompt is to a predictor: its similarity to the prompts the predictor was trained on.

A predictor trained on a few kinds of prompt predicts a new kind about as well as a constant guess (README,
leave-one-source-out), and its probabilities do not say so. What it can tell is that a prompt looks like none of
its training prompts. The checkpoint keeps the embeddings of a sample of its training prompts (its own encoder's
last hidden states, mean-pooled over the prompt and L2-normalised; ``familiarity.safetensors``). A prompt's
*familiarity* is its mean cosine similarity to the ``k`` most similar of them; below ``threshold``, the score
that a share ``quantile`` (5% by default) of the validation prompts fall under, it counts as *unfamiliar*.

Served traffic like the training data is unfamiliar about ``quantile`` of the time; a kind of prompt the
predictor never saw raises that share (measured in docs/predictor.md: 38-95% of the test prompts of five of seven
held-out sources, 3-6% of the other two that resemble the chat sources kept in training). The server counts
unfamiliar prompts in ``/metrics`` and writes the score into feedback records, so `s3 feedback` can say how much
of the traffic served has drifted from what the predictor learned: a reason to feed it back and retrain.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from predictor_train.checkpoint import FAMILIARITY_FILE, CheckpointInfo, update_info

DEFAULT_K = 10
"""Training prompts each prompt is compared with (the mean similarity of its ``k`` nearest)."""


def mean_pooled(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """L2-normalised mean of the last hidden states over each prompt's tokens, ``(batch, hidden_size)``."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1).float()


@dataclasses.dataclass(frozen=True)
class Familiarity:
    """A checkpoint's training-prompt embeddings and the threshold below which a prompt is unfamiliar."""

    bank: torch.Tensor
    """``(n, hidden_size)``, L2-normalised rows."""
    k: int = DEFAULT_K
    threshold: float = 0.0

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Mean cosine similarity of each embedded prompt to its ``k`` most similar training prompts."""
        k = min(self.k, len(self.bank))
        return (embeddings.float() @ self.bank.T).topk(k, dim=1).values.mean(1)

    def unfamiliar(self, scores: torch.Tensor) -> torch.Tensor:
        return scores < self.threshold

    @classmethod
    def load(cls, folder: str | Path, info: CheckpointInfo) -> "Familiarity | None":
        """The checkpoint's familiarity, or None when it keeps none (older checkpoints, or bank size 0)."""
        if not info.familiarity:
            return None
        path = Path(folder) / FAMILIARITY_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: predictor.json describes a familiarity bank but {FAMILIARITY_FILE} "
                                    "is missing; copy the whole checkpoint folder")
        return cls(load_file(str(path))["bank"].float(), k=int(info.familiarity["k"]),
                   threshold=float(info.familiarity["threshold"]))


def sample_prompts(prompts: Sequence[str], size: int, *, seed: int = 0, keep: Sequence[str] = ()) -> list[str]:
    """At most ``size`` distinct prompts (retraining repeats its feedback records): every one of ``keep`` (up to
    ``size``), then a sample of the others, the same for the same input."""
    kept = list(dict.fromkeys(keep))[:size]
    rest = sorted(set(prompts) - set(kept))
    room = size - len(kept)
    return kept + (rest if len(rest) <= room else random.Random(seed).sample(rest, room))


def fit_familiarity(predictor, train_prompts: Sequence[str], validation_prompts: Sequence[str], *,
                    bank_size: int, quantile: float, k: int = DEFAULT_K, seed: int = 0, keep: Sequence[str] = (),
                    batch_size: int = 64) -> tuple[Familiarity, torch.Tensor]:
    """Embed a sample of ``train_prompts`` (``keep``: prompts always in it) with ``predictor`` (a `LengthPredictor`)
    and set the threshold at the ``quantile`` of the validation prompts' scores; returns the familiarity and those
    scores."""
    if not validation_prompts:
        raise ValueError("the familiarity threshold needs validation prompts")
    bank = predictor.embed(sample_prompts(train_prompts, bank_size, seed=seed, keep=keep), batch_size=batch_size)
    scores = Familiarity(bank, k=k).scores(predictor.embed(list(validation_prompts), batch_size=batch_size))
    return Familiarity(bank, k=k, threshold=float(torch.quantile(scores, quantile))), scores


def build_familiarity(predictor, folder: str | Path, train_prompts: Sequence[str],
                      validation_prompts: Sequence[str], *, bank_size: int, quantile: float, k: int = DEFAULT_K,
                      seed: int = 0, keep: Sequence[str] = (), batch_size: int = 64) -> CheckpointInfo:
    """`fit_familiarity` for ``predictor``, the checkpoint in ``folder`` as loaded, written into it; returns its
    new info."""
    familiarity, scores = fit_familiarity(predictor, train_prompts, validation_prompts, bank_size=bank_size,
                                          quantile=quantile, k=k, seed=seed, keep=keep, batch_size=batch_size)
    save_file({"bank": familiarity.bank.contiguous()}, str(Path(folder) / FAMILIARITY_FILE))
    meta = {"k": k, "threshold": familiarity.threshold, "quantile": quantile, "bank_size": len(familiarity.bank),
            "validation_median": float(scores.median())}
    return update_info(folder, dataclasses.replace(predictor.info, familiarity=meta))
