"""Retraining: a previous checkpoint plus serving feedback (mispredicted prompts with their true lengths, and a
sample of the well-predicted ones).

Feedback records have the training-data columns plus ``predicted_bucket``, so retraining is training with more
data. Against forgetting, an epoch is the feedback (each record ``feedback_repeat`` times) mixed with a replay
sample of the labelled train split (``replay_ratio`` replayed rows per feedback example, stratified by source),
rather than the feedback alone or the whole train split again. The validation and test splits of the original
data stay as they were, and a feedback prompt that occurs in them is dropped, so they stay unseen. A share
``feedback_holdout`` of the mispredicted records (by a salted prompt hash), and every sampled well-predicted one,
are held out of training: the "after" figures on them are on served requests the new model never saw. Training
starts from the previous checkpoint's weights and keeps its exact BucketSpec. The config's ``exclude_sources`` and
``max_train_rows_per_source`` select the replayed train rows and the validation rows as they do in training; the
test split is always the full one. A config asking for another bucket scheme is refused.

The guard (``keep_parent_unless_matched``): the previous weights are validated first and kept unless an epoch
scores at least as well on the labelled validation split, so a round cannot ship a worse predictor. That split
holds none of a kind of traffic the predictor never saw, and the mispredictions are no sample of anything (a round
that fixes them looks better on them whatever it does to the rest). So when the store holds a sample of the served
traffic (a server's ``feedback_sample_rate``: the well-predicted requests sampled, each record weighted back by
its ``traffic_weight``), the held-out records, weighted back into a sample of the traffic (`traffic_sample`), are
a second judge once they are enough (`MIN_TRAFFIC_SAMPLE`): an epoch must also score at least as well on them, on
``traffic_monitor`` (MAE by default: of the metrics measured, the one that moved as the new kind's test rows did in
every round, docs/predictor.md).
``replay_only`` trains the same number of examples with replayed rows in place of the feedback: the control that
says what the feedback itself adds.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path

import datasets

from core.feedback import MIN_TRAFFIC_SAMPLE
from predictor_train.backbone import load_classifier
from predictor_train.checkpoint import CheckpointInfo, describe_buckets, read_info
from predictor_train.data import Examples, check_columns, load_records, sources_of, split_of, split_records
from predictor_train.evaluate import EvalReport, evaluate_rows, format_table
from predictor_train.inference import LengthPredictor
from predictor_train.train import TrainConfig, TrainResult, fit, training_splits

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RetrainReport:
    """Before/after metrics of a retraining run."""

    result: TrainResult
    """The new checkpoint and its training history."""
    parent_checkpoint_id: str
    """The checkpoint retraining started from."""
    num_feedback_used: int
    """Feedback records added to the train split."""
    num_feedback_dropped: int
    """Feedback records left out because their prompt is in the validation or test split."""
    num_feedback_cut: int
    """Feedback records left out because the client cut the answer (its lower max_tokens or a stop string): its
    length is no label."""
    num_feedback_held_out: int
    """Feedback records held out of training (``feedback_holdout``) to measure on."""
    num_replayed: int
    """Labelled train rows replayed per epoch next to the feedback."""
    before: dict[str, EvalReport]
    """The previous checkpoint on ``feedback`` (the trained-on mispredicted prompts), ``feedback_held_out``
    (when any) and ``test``."""
    after: dict[str, EvalReport]
    """The new checkpoint on the same two sets."""
    traffic: str
    """What the round was judged on besides the labelled validation split: the held-out sample of served traffic,
    or why there was none."""

    @property
    def kept_parent(self) -> bool:
        """No retrained epoch matched the previous weights on validation, so the new checkpoint carries them."""
        return self.result.best_epoch == 0

    def verdict(self) -> str:
        """One line: which weights the new checkpoint carries, with the validation scores that decided it."""
        history = self.result.history
        kept = next(record for record in history if record["epoch"] == self.result.best_epoch)
        if not self.kept_parent:
            return f"kept epoch {kept['epoch']}{_scores(kept)}; judged on {self.traffic}"
        retrained = "; ".join(f"epoch {record['epoch']}{_scores(record)}" for record in history if record["epoch"])
        return (f"kept the previous weights{_scores(kept)}: no retrained epoch did as well ({retrained}); judged on "
                f"{self.traffic}")

    def table(self) -> str:
        """Predictor rows before and after, per evaluation set, as one printable table."""
        blocks = []
        for name in self.before:
            rows = {"before": self.before[name].metrics["predictor"], "after": self.after[name].metrics["predictor"]}
            blocks.append(f"{name}:\n{format_table(rows)}")
        return "\n\n".join(blocks)


def check_same_buckets(config: TrainConfig, previous: CheckpointInfo, where: str | Path) -> None:
    """Refuse to retrain when the config's bucket settings differ from the previous checkpoint's."""
    wanted = (config.bucket_scheme, config.max_tokens, config.num_buckets)
    prev_cfg = previous.train_config
    had = (previous.bucket_scheme, prev_cfg.get("max_tokens"), prev_cfg.get("num_buckets"))
    if wanted != had:
        raise ValueError(
            f"cannot retrain {where}: it predicts {describe_buckets(previous)} (scheme {had[0]}, max_tokens "
            f"{had[1]}, num_buckets {had[2]}) but this run asks for scheme {wanted[0]}, max_tokens {wanted[1]}, "
            f"num_buckets {wanted[2]}; use the checkpoint's bucket settings or train a new predictor from scratch"
        )


def feedback_for_training(feedback: datasets.Dataset, held_out_prompts: set[str],
                          max_tokens: int) -> tuple[datasets.Dataset, int, int]:
    """The feedback rows fit to train on; how many were left out because their prompt is held out (validation or
    test), and how many because their length is not the answer's own: a client's lower ``max_tokens`` cut it
    (unfinished below the labels' limit ``max_tokens``), so its label is unknown, only above what it wrote."""
    in_splits = [prompt in held_out_prompts for prompt in feedback["prompt"]]
    finished = feedback["finished"] if "finished" in feedback.column_names else [True] * len(feedback)
    cut = [not _own_length(ended, length, max_tokens)
           for ended, length in zip(finished, feedback["num_output_tokens"])]
    keep = [i for i, (held, short) in enumerate(zip(in_splits, cut)) if not held and not short]
    return feedback.select(keep), sum(in_splits), sum(short and not held for held, short in zip(in_splits, cut))


def _own_length(finished: bool, length: int, max_tokens: int) -> bool:
    """Whether a record's length is its answer's own: it ended of itself or at the labels' limit ``max_tokens``, not
    at a client's lower one or a stop string (then its label is unknown, only above what it wrote)."""
    return finished or length >= max_tokens


def is_held_out(prompt: str, share: float) -> bool:
    """Whether a feedback prompt is held out: a hash of it, salted so that the choice is independent of the labelled
    data's split (the same prompt hash), falls in the first ``share`` of [0, 1)."""
    return share > 0 and split_of("feedback holdout\0" + prompt, (share, 0.0, 1.0 - share)) == "train"


def hold_out_feedback(feedback: datasets.Dataset, share: float) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(trained on, held out): mispredicted records by `is_held_out`; every record sampled among the well-predicted
    requests (column ``sampled``) is held out, to judge the round on: trained on, they change nothing measurable
    (docs/predictor.md), while they are the only view of the traffic the predictor already gets right. A prompt's
    records go together: one held out holds out every record of its prompt."""
    # by prompt: a prompt served twice, once sampled, is held out whole, so the round is not judged on what it learned
    held_prompts = {p for p, s in zip(feedback["prompt"], _sampled(feedback)) if s or is_held_out(p, share)}
    held = [p in held_prompts for p in feedback["prompt"]]
    return (feedback.select([i for i, h in enumerate(held) if not h]),
            feedback.select([i for i, h in enumerate(held) if h]))


def traffic_sample(held_out: datasets.Dataset, max_tokens: int, share: float) -> tuple[datasets.Dataset, list[float]]:
    """The held-out records that belong to a sample of served traffic (``traffic_weight`` > 0) and whose length is
    the answer's own (`_own_length`), and
    how many served requests each stands for: its ``traffic_weight`` over its chance of being held out (``share``
    for a mispredicted record, 1 for a sampled one)."""
    if "traffic_weight" not in held_out.column_names:
        return held_out.select([]), []
    keep, weights = [], []
    for i, (weight, was_sampled, finished, length) in enumerate(zip(
            held_out["traffic_weight"], _sampled(held_out), held_out["finished"], held_out["num_output_tokens"])):
        if weight > 0 and _own_length(finished, length, max_tokens) and (was_sampled or share > 0):
            keep.append(i)
            weights.append(weight / (1.0 if was_sampled else share))
    return held_out.select(keep), weights


def effective_size(weights) -> float:
    """Kish's effective sample size of a weighted sample, (sum w)^2 / sum w^2: the number of equally weighted
    records that would measure as precisely (40 records, one of them weighted 10: 17.3). 0 for none."""
    weights = [float(w) for w in weights]
    return sum(weights) ** 2 / sum(w * w for w in weights) if weights else 0.0


def replay_sample(train: datasets.Dataset, num_rows: int, *, seed: int) -> datasets.Dataset:
    """``num_rows`` rows of ``train`` (all of it if fewer), each source in proportion, seeded."""
    if num_rows >= len(train):
        return train
    rng = random.Random(seed)
    by_source: dict[str, list[int]] = {}
    for i, source in enumerate(sources_of(train)):
        by_source.setdefault(source, []).append(i)
    keep = []
    for members in by_source.values():
        keep += rng.sample(members, round(num_rows * len(members) / len(train)))
    return train.select(sorted(keep))


def retrain_predictor(config: TrainConfig, data, feedback, *, previous_checkpoint: str | Path,
                      progress: bool = True) -> RetrainReport:
    """Fine-tune ``previous_checkpoint`` on ``feedback`` mixed with a replay sample of the original train split;
    report before and after on the trained-on feedback, the held-out feedback and the test split.

    ``config.backbone``, ``max_prompt_tokens`` and ``prompt_truncation`` are the previous checkpoint's
    (`inherit_encoding`: it is the starting point, and its weights read prompts that way); ``config.output_dir`` receives
    the new checkpoint and must differ from ``previous_checkpoint``. The target model and decoding settings are
    inherited from the previous checkpoint.
    """
    previous = read_info(previous_checkpoint)
    check_same_buckets(config, previous, previous_checkpoint)
    config = inherit_encoding(config, previous)
    if Path(config.output_dir).resolve() == Path(previous_checkpoint).resolve():
        raise ValueError(f"output_dir {config.output_dir} is the previous checkpoint; write the retrained one "
                         "elsewhere so the before/after comparison stays possible")
    records = load_records(data)
    full = split_records(records)
    splits = training_splits(config, records)  # exclude_sources and max_train_rows_per_source, as in training
    feedback_rows = load_records(feedback)
    check_columns(feedback_rows, where="the feedback records")
    held_out = set(full["validation"]["prompt"]) | set(full["test"]["prompt"])
    usable, dropped, cut = feedback_for_training(feedback_rows, held_out, previous.buckets.max_tokens)
    extra, feedback_test = hold_out_feedback(usable, config.feedback_holdout)
    if len(extra) == 0:
        raise ValueError("no usable feedback: every feedback prompt is in the validation or test split or held "
                         "out (feedback_holdout)")
    eval_sets = {"feedback": extra, **({"feedback_held_out": feedback_test} if len(feedback_test) else {}),
                 "test": splits["test"]}
    before = _evaluate_all(LengthPredictor.load(previous_checkpoint), eval_sets, train=splits["train"])
    served, weights = traffic_sample(feedback_test, previous.buckets.max_tokens, config.feedback_holdout)
    traffic, traffic_note = None, _traffic_note(served, weights, config)
    if config.keep_parent_unless_matched and _judges(served, weights):
        traffic = dataclasses.replace(Examples.from_rows(served), weights=tuple(weights))

    backbone = load_classifier(str(previous_checkpoint), previous.buckets, seed=config.seed)
    backbone = dataclasses.replace(backbone, kind=previous.backbone_kind)  # what it was, not how it was reloaded
    num_seen = len(extra) * config.feedback_repeat  # feedback examples an epoch sees (replay_only: replaced)
    num_replayed = round(config.replay_ratio * num_seen) + (num_seen if config.replay_only else 0)
    replay = replay_sample(splits["train"], num_replayed, seed=config.seed)
    examples = Examples.from_rows(replay)
    if not config.replay_only:
        feedback_examples = Examples.from_rows(extra)
        examples += Examples(feedback_examples.prompts * config.feedback_repeat,
                             feedback_examples.num_output_tokens * config.feedback_repeat)
    trained_on = 0 if config.replay_only else len(extra)
    counts = {**{name: len(rows) for name, rows in splits.items()}, "feedback": trained_on,
              "feedback_held_out": len(feedback_test), "replay": len(replay)}
    meta = dict(target_model=previous.target_model, decoding=previous.decoding, data=counts,
                parent_checkpoint_id=previous.checkpoint_id)
    result = fit(config, examples, Examples.from_rows(splits["validation"]),
                 backbone=backbone, spec=previous.buckets, meta=meta, progress=progress,
                 start_competes=config.keep_parent_unless_matched, traffic=traffic,
                 familiar=(list(splits["train"]["prompt"]), [] if config.replay_only else list(extra["prompt"])),
                 familiar_lengths={**dict(zip(splits["train"]["prompt"], splits["train"]["num_output_tokens"])),
                                   **dict(zip(extra["prompt"], extra["num_output_tokens"]))},
                 parent=previous_checkpoint if config.keep_parent_unless_matched else None,
                 # the train split and each fed-back answer once, not the repeated and replayed training stream
                 prior_lengths=list(splits["train"]["num_output_tokens"])
                 + ([] if config.replay_only else list(extra["num_output_tokens"])))
    after = _evaluate_all(LengthPredictor.load(result.checkpoint_dir), eval_sets, train=splits["train"])
    return RetrainReport(result=result, parent_checkpoint_id=previous.checkpoint_id, num_feedback_used=trained_on,
                         num_feedback_dropped=dropped, num_feedback_cut=cut, num_feedback_held_out=len(feedback_test),
                         num_replayed=len(replay), before=before, after=after, traffic=traffic_note)


INHERITED = ("backbone", "max_prompt_tokens", "prompt_truncation")
"""What a retrained checkpoint takes from its parent whatever the config says: its weights were trained to read
prompts this way (and recorded so), and a reload reads them so."""


def inherit_encoding(config: TrainConfig, previous: CheckpointInfo) -> TrainConfig:
    """``config`` with the parent's `INHERITED` settings (a warning for each the config set otherwise)."""
    parent = {name: previous.train_config[name] for name in INHERITED if name in (previous.train_config or {})}
    for name, value in parent.items():
        if getattr(config, name) != value:
            log.warning("retraining keeps the parent's %s=%r (the config says %r)", name, value, getattr(config, name))
    return dataclasses.replace(config, **parent)


def _evaluate_all(predictor: LengthPredictor, sets: dict, *, train) -> dict[str, EvalReport]:
    return {name: evaluate_rows(predictor, rows, train=train, title=name) for name, rows in sets.items()}


def _traffic_note(served: datasets.Dataset, weights: list[float], config: TrainConfig) -> str:
    if not config.keep_parent_unless_matched:
        return "the labelled validation split alone, among the retrained epochs: keep_parent_unless_matched is off"
    if not len(served):
        return ("the labelled validation split alone: no sample of served traffic in the store (the server's "
                "feedback_sample_rate was 0, or the store predates sampling)")
    sample = (f"{len(served)} held-out records of served traffic ({_num_sampled(served)} of them sampled "
              f"well-predicted requests; standing for {round(sum(weights))} requests, effective sample size "
              f"{effective_size(weights):.1f})")
    if _judges(served, weights):
        return f"the labelled validation split and {sample}"
    return (f"the labelled validation split alone: {sample}, too few to judge on (it takes at least "
            f"{MIN_TRAFFIC_SAMPLE} sampled records and an effective size of {MIN_TRAFFIC_SAMPLE})")


def _sampled(rows: datasets.Dataset) -> list[bool]:
    """Each record's ``sampled`` flag; all False for records without the column (a store from before sampling)."""
    return rows["sampled"] if "sampled" in rows.column_names else [False] * len(rows)


def _num_sampled(served: datasets.Dataset) -> int:
    return sum(_sampled(served))


def _judges(served: datasets.Dataset, weights: list[float]) -> bool:
    """Whether the held-out sample of served traffic is large enough to be a guard (`MIN_TRAFFIC_SAMPLE`)."""
    return _num_sampled(served) >= MIN_TRAFFIC_SAMPLE and effective_size(weights) >= MIN_TRAFFIC_SAMPLE


def _scores(record: dict) -> str:
    traffic = record.get("traffic")
    served = "" if traffic is None else (f"; served traffic accuracy {traffic['accuracy']:.1%}, "
                                         f"MAE {traffic['mae_tokens']:.1f} tokens, loss {traffic['loss']:.3f}")
    return f" (validation accuracy {record['accuracy']:.1%}, loss {record['loss']:.3f}{served})"
