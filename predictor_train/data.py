"""Labelled prompts for the length predictor: loading, the hash split, labels, class weights, batches.

A record has the columns of the ``generate`` stage: ``prompt`` (the raw user prompt), ``source``,
``num_prompt_tokens``, ``num_output_tokens`` (the target LLM's real output length) and ``finished``; feedback
records from serving carry the same columns plus ``predicted_bucket``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from pathlib import Path
from typing import Iterator, Literal, Sequence, get_args

import datasets
import torch

from core.buckets import BucketSpec

REQUIRED_COLUMNS = ("prompt", "num_prompt_tokens", "num_output_tokens")
"""Columns training and evaluation read; ``source`` and ``finished`` are kept when present but not needed."""

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


def load_records(source: str | Path | datasets.Dataset) -> datasets.Dataset:
    """Load labelled records from a ``save_to_disk`` folder, a Parquet file or a JSONL file (or pass a Dataset)."""
    where = str(source) if not isinstance(source, datasets.Dataset) else "the dataset"
    try:
        ds = source if isinstance(source, datasets.Dataset) else _read(Path(source))
    except datasets.exceptions.DatasetGenerationError as exc:
        raise ValueError(f"cannot read {where}: {exc.__cause__ or exc}") from None
    except ValueError as exc:
        if "corresponds to no data" not in str(exc):  # datasets' words for a file of blank lines
            raise
        ds = datasets.Dataset.from_list([])
    if len(ds) == 0:
        raise ValueError(f"{where} holds no labelled records")
    check_columns(ds, where=where)
    bad = next((i for i, prompt in enumerate(ds["prompt"]) if not isinstance(prompt, str)), None)
    if bad is not None:
        raise ValueError(f"{where}, record {bad + 1}: prompt must be a string, got {ds[bad]['prompt']!r:.60}")
    return ds


def _read(path: Path) -> datasets.Dataset:
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        # We split by prompt hash ourselves, so the splits of a saved DatasetDict are pooled.
        if isinstance(loaded, datasets.DatasetDict):
            return datasets.concatenate_datasets(list(loaded.values()))
        return loaded
    if not path.is_file():
        raise FileNotFoundError(f"no data at {path}: pass a save_to_disk folder, a .parquet or a .jsonl file")
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty: it holds no labelled records")
    if suffix == ".parquet":
        return datasets.Dataset.from_parquet(str(path))
    if suffix in (".jsonl", ".json"):
        return datasets.Dataset.from_json(str(path))
    raise ValueError(f"cannot read {path}: expected a save_to_disk folder, .parquet or .jsonl")


def check_columns(ds: datasets.Dataset, *, where: str, extra: Sequence[str] = ()) -> None:
    """Raise a ValueError naming the missing columns, so a user can fix the data file."""
    missing = [c for c in (*REQUIRED_COLUMNS, *extra) if c not in ds.column_names]
    if missing:
        raise ValueError(f"{where} lacks column(s) {missing}; it has {ds.column_names}. "
                         "Records need prompt, num_prompt_tokens and num_output_tokens (see `s3 generate`).")


def _unit_hash(prompt: str) -> float:
    """A prompt's position in [0, 1), from a hash of its text: stable across runs, machines and data orders."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(prompt: str, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> Split:
    """The split a prompt belongs to by hash threshold alone (what :func:`split_indices` does with no sources)."""
    u = _unit_hash(prompt)
    total = 0.0
    for split, fraction in zip(SPLITS, fractions):
        total += fraction
        if u < total:
            return split
    return SPLITS[-1]


def _check_fractions(fractions: Sequence[float]) -> None:
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) < 0:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")


def _stratified_splits(prompts: Sequence[str], sources: Sequence[str],
                       fractions: Sequence[float]) -> dict[str, Split]:
    """Split of each distinct prompt: within each source, prompts ordered by hash, cut at the fractions.

    Every source of at least 10 prompts (at 80/10/10) then has its share of each split to within one prompt.
    Sources too small to hold one prompt of each split (rounding gave them none) are cut together, as one: many
    such sources left validation or test empty; their prompts' splits depend on which small sources there are. A
    prompt listed under several sources counts under the first of them by name, so the result does not depend on
    row order.
    """
    home: dict[str, str] = {}
    for prompt, source in zip(prompts, sources):
        home[prompt] = min(home.get(prompt, source), source)
    by_source: dict[str, list[str]] = {}
    for prompt, source in home.items():
        by_source.setdefault(source, []).append(prompt)
    smallest = min((f for f in fractions if f > 0), default=1.0)
    pooled = [p for members in by_source.values() if len(members) * smallest < 1 for p in members]
    strata = [members for members in by_source.values() if len(members) * smallest >= 1] + [pooled]
    out: dict[str, Split] = {}
    for members in strata:
        members.sort(key=lambda p: (_unit_hash(p), p))
        n = len(members)
        cut_train = round(n * fractions[0])
        cut_val = round(n * (fractions[0] + fractions[1]))
        for rank, prompt in enumerate(members):
            out[prompt] = "train" if rank < cut_train else "validation" if rank < cut_val else "test"
    return out


def split_indices(prompts: Sequence[str], fractions: Sequence[float] = DEFAULT_FRACTIONS,
                  sources: Sequence[str] | None = None) -> dict[Split, list[int]]:
    """Row indices per split; equal prompts always share a split, so duplicates never leak across them.

    Without ``sources`` a prompt's split is its hash threshold (:func:`split_of`). With ``sources`` the split is
    stratified: each source is cut at the fractions in hash order, so each holds 80/10/10 of its prompts and the
    test split has every source in proportion (sources too small for that are cut together). Both are deterministic
    and independent of row order; the stratified cut depends on which prompts a source holds (and, for the small
    ones, which small sources there are), so adding rows can move a prompt that sits at a cut.
    """
    _check_fractions(fractions)
    if sources is not None and len(sources) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(sources)} sources")
    home = _stratified_splits(prompts, sources, fractions) if sources is not None else None
    out: dict[Split, list[int]] = {s: [] for s in SPLITS}
    for i, prompt in enumerate(prompts):
        out[home[prompt] if home is not None else split_of(prompt, fractions)].append(i)
    return out


def sources_of(ds) -> list[str]:
    """The ``source`` column, or one unnamed source (``""``) when the records have none."""
    columns = ds.column_names if hasattr(ds, "column_names") else list(ds)
    return [str(s) for s in ds["source"]] if "source" in columns else [""] * len(ds["prompt"])


def split_records(ds: datasets.Dataset, fractions: Sequence[float] = DEFAULT_FRACTIONS, *,
                  stratify: bool = True) -> datasets.DatasetDict:
    """Deterministic train/validation/test split (80/10/10), stratified by ``source`` unless ``stratify=False``."""
    indices = split_indices(ds["prompt"], fractions, sources_of(ds) if stratify else None)
    return datasets.DatasetDict({s: ds.select(indices[s]) for s in SPLITS})


def check_sources(ds, sources: Sequence[str]) -> None:
    """Raise ValueError naming any of ``sources`` that no row of ``ds`` has (a typo would exclude nothing)."""
    known = set(sources_of(ds))
    unknown = sorted(set(sources) - known)
    if unknown:
        raise ValueError(f"no rows of source(s) {', '.join(unknown)} to exclude; "
                         f"the data has {', '.join(sorted(known))}")


def drop_sources(ds: datasets.Dataset, sources: Sequence[str]) -> datasets.Dataset:
    """The rows whose source is not in ``sources`` (leave-one-source-out training)."""
    if not sources:
        return ds
    drop = set(sources)
    return ds.select([i for i, s in enumerate(sources_of(ds)) if s not in drop])


def cap_per_source(ds: datasets.Dataset, max_rows: int) -> datasets.Dataset:
    """At most ``max_rows`` rows of each source, the first in prompt-hash order (deterministic); 0 keeps all."""
    if max_rows <= 0:
        return ds
    prompts = ds["prompt"]
    order = sorted(range(len(ds)), key=lambda i: (_unit_hash(prompts[i]), i))
    taken: dict[str, int] = {}
    keep = []
    sources = sources_of(ds)
    for i in order:
        if taken.get(sources[i], 0) < max_rows:
            taken[sources[i]] = taken.get(sources[i], 0) + 1
            keep.append(i)
    return ds.select(sorted(keep))


@dataclasses.dataclass(frozen=True)
class Examples:
    """Prompts and their true output lengths: what training reads from a split."""

    prompts: tuple[str, ...]
    """Raw user prompts."""
    num_output_tokens: tuple[int, ...]
    """The target LLM's real output length for each prompt."""
    weights: tuple[float, ...] | None = None
    """How many requests each example stands for, when they are a sample drawn with unequal probabilities (the
    feedback store's sample of served traffic); validation weights its loss and metrics by them. None: 1 each."""

    @classmethod
    def from_rows(cls, rows) -> "Examples":
        """From a Dataset (or anything with ``prompt`` and ``num_output_tokens`` columns); a length that is not a
        whole number of tokens >= 0 (null, negative, text) is refused, naming its prompt."""
        prompts, lengths = tuple(rows["prompt"]), []
        for prompt, n in zip(prompts, rows["num_output_tokens"]):
            if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n < 0 or n != int(n):
                raise ValueError(f"num_output_tokens must be a whole number of tokens >= 0, got {n!r} for the prompt "
                                 f"{prompt[:60]!r} (labels come from `s3 generate`)")
            lengths.append(int(n))
        return cls(prompts, tuple(lengths))

    def __add__(self, other: "Examples") -> "Examples":
        if self.weights is not None or other.weights is not None:
            raise ValueError("weighted examples are a sample to validate on; they are not concatenated")
        return Examples(self.prompts + other.prompts, self.num_output_tokens + other.num_output_tokens)

    def __len__(self) -> int:
        return len(self.prompts)


def labels_of(lengths: Sequence[int], spec: BucketSpec) -> list[int]:
    """Bucket label of each output length."""
    return [spec.bucket_of(int(n)) for n in lengths]


def class_weights(labels: Sequence[int], num_buckets: int, *, smoothing: float = 1.0) -> list[float]:
    """Smoothed inverse-frequency weights, one per bucket, normalised to average 1 over the training samples.

    ``w_b ∝ 1 / (count_b + smoothing)``: the additive smoothing keeps empty or near-empty buckets from getting
    an unbounded weight. Normalising over samples keeps the weighted loss on the scale of the unweighted one.
    """
    if smoothing <= 0:
        raise ValueError(f"smoothing must be positive, got {smoothing}")
    counts = [0] * num_buckets
    for label in labels:
        counts[label] += 1
    raw = [1.0 / (c + smoothing) for c in counts]
    num_samples = sum(counts)
    if num_samples == 0:
        return [1.0] * num_buckets
    mean = sum(c * w for c, w in zip(counts, raw)) / num_samples
    return [w / mean for w in raw]


PromptTruncation = Literal["head", "head_tail"]
"""How a prompt longer than ``max_prompt_tokens`` is cut: ``head`` keeps its first tokens; ``head_tail`` keeps
the first quarter of the budget from its start and the rest from its end, where a long prompt usually puts its
request ("... My first request is ..."); the ratio of Sun et al. 2019, How to Fine-Tune BERT for Text
Classification, who found head + tail the best cut for long inputs."""


def encode(tokenizer, prompts: Sequence[str], *, max_prompt_tokens: int,
           input_names: Sequence[str] = ("input_ids", "attention_mask"),
           truncation: PromptTruncation = "head") -> dict[str, torch.Tensor]:
    """Tokenise a batch, padded to its longest prompt and cut to ``max_prompt_tokens`` (see PromptTruncation)."""
    if truncation == "head":
        enc = tokenizer(list(prompts), padding=True, truncation=True, max_length=max_prompt_tokens,
                        return_tensors="pt")
    elif truncation == "head_tail":
        full = tokenizer(list(prompts), truncation=False, verbose=False)
        enc = tokenizer.pad({k: [head_and_tail(row, max_prompt_tokens) for row in full[k]] for k in full.keys()},
                            return_tensors="pt")
    else:
        raise ValueError(f"truncation must be one of {get_args(PromptTruncation)}, got {truncation!r}")
    return {k: v for k, v in enc.items() if k in input_names}


def head_and_tail(ids: Sequence, limit: int) -> list:
    """The first ``limit // 4`` and last ``limit - limit // 4`` items of ``ids`` (all of it when it fits), so a
    tokenised sequence keeps its leading and trailing special tokens."""
    ids = list(ids)
    if len(ids) <= limit:
        return ids
    head = limit // 4
    return ids[:head] + ids[len(ids) - (limit - head):]


def batches(prompts: Sequence[str], labels: Sequence[int], tokenizer, *, batch_size: int, max_prompt_tokens: int,
            input_names: Sequence[str] = ("input_ids", "attention_mask"), shuffle_seed: int | None = None,
            shard: tuple[int, int] = (0, 1),
            truncation: PromptTruncation = "head") -> Iterator[dict[str, torch.Tensor]]:
    """Tokenised batches with a ``labels`` tensor; shuffled (reproducibly) when ``shuffle_seed`` is given.

    ``shard=(rank, world_size)`` keeps every world_size-th example of the shuffled order, all shards equally long,
    so data-parallel ranks take the same number of steps (a rank with one step more would hang in all-reduce).
    """
    order = list(range(len(prompts)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    rank, world_size = shard
    order = order[:len(order) - len(order) % world_size][rank::world_size]
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = encode(tokenizer, [prompts[i] for i in rows], max_prompt_tokens=max_prompt_tokens,
                       input_names=input_names, truncation=truncation)
        batch["labels"] = torch.tensor([labels[i] for i in rows], dtype=torch.long)
        yield batch


def num_batches(num_rows: int, batch_size: int, world_size: int = 1) -> int:
    """Batches per rank that :func:`batches` yields."""
    per_rank = num_rows // world_size
    return (per_rank + batch_size - 1) // batch_size
