"""Train the length classifier with DeepSpeed: weighted cross-entropy, early stopping, best checkpoint kept.

The DeepSpeed JSON file (``configs/deepspeed/predictor_{cpu,gpu}.json``) sets the engine: ZeRO stage, precision,
optimizer type, gradient accumulation and clipping. The TrainConfig sets the hyperparameters and wins where the two
overlap: ``batch_size`` becomes ``train_micro_batch_size_per_gpu`` and ``lr`` the optimizer's learning rate.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, get_args

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from predictor_train.backbone import (DEFAULT_BACKBONE, Backbone, check_prompt_tokens, load_classifier,
                                      model_input_names)
from core.buckets import BucketSpec, bucket_frequencies, within_bucket_shape
from core.tracking import epoch_metrics, finishing, start_run
from predictor_train.checkpoint import (
    CheckpointInfo, copy_checkpoint, publish_checkpoint, read_info, save_checkpoint, staging_folder,
)  # fmt: skip
from predictor_train.data import (Examples, PromptTruncation, batches, cap_per_source, check_sources, class_weights,
                                  drop_sources, labels_of, load_records, num_batches, split_records)
from predictor_train.distributed import build_deepspeed_config, rank_and_world_size, start_engine
from predictor_train.evaluate import bucket_metrics
from predictor_train.losses import LossKind, length_loss

log = logging.getLogger(__name__)

BucketScheme = Literal["uniform", "quantile"]
WandbMode = Literal["online", "offline", "disabled"]
Monitor = Literal["loss", "accuracy", "mae"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; recorded in the checkpoint's ``predictor.json``."""

    backbone: str = DEFAULT_BACKBONE
    """``minilm`` (default), ``tiny-random``, or a Hugging Face folder / cached hub name (see backbone.py)."""
    max_tokens: int = 512
    """Largest output length the buckets cover: the target LLM's generation cap used by ``generate``."""
    num_buckets: int = 10
    """Number of length buckets (classes)."""
    bucket_scheme: BucketScheme = "uniform"
    """``uniform``: equal-width buckets (the paper); ``quantile``: edges at training-length quantiles."""
    epochs: int = 3
    """Most passes over the training split; early stopping may end sooner."""
    lr: float = 5e-5
    """Peak learning rate; overrides the DeepSpeed file's optimizer ``lr``."""
    batch_size: int = 16
    """Prompts per micro-batch; overrides ``train_micro_batch_size_per_gpu`` in the DeepSpeed file."""
    max_prompt_tokens: int = 256
    """Prompts longer than this many tokens are cut (``prompt_truncation`` says where)."""
    prompt_truncation: PromptTruncation = "head"
    """``head`` keeps a long prompt's first ``max_prompt_tokens``; ``head_tail`` its first quarter of them and
    the rest from its end (see predictor_train/data.py)."""
    patience: int = 2
    """Epochs without improvement of the monitored validation metric before stopping."""
    monitor: Monitor = "loss"
    """Validation metric for early stopping and for picking the best checkpoint: ``loss``, ``accuracy`` (the exact
    bucket) or ``mae`` (the arg-max bucket's midpoint against the true length, in tokens)."""
    class_weight_smoothing: float = 1.0
    """Added to each bucket's count before inverting it into a class weight; larger is closer to unweighted."""
    loss: LossKind = "ce"
    """``ce`` (cross-entropy), ``soft`` (Gaussian soft labels over neighbouring buckets) or ``rps`` (cross-entropy
    plus the ranked probability score over the cumulative distribution); see losses.py."""
    label_sigma: float = 1.0
    """``soft``: width of the soft labels, in buckets."""
    rps_weight: float = 1.0
    """``rps``: weight of the ranked probability score next to the cross-entropy."""
    calibrate: bool = True
    """After training, fit a softmax temperature on the validation split and store it in the checkpoint."""
    familiarity_bank_size: int = 2048
    """After training, keep the embeddings of this many training prompts (a sample) in the checkpoint, so serving
    can tell prompts unlike any of them (predictor_train/familiarity.py; 3 MB at MiniLM's 384 dimensions); 0 keeps
    none."""
    familiarity_quantile: float = 0.05
    """The share of validation prompts that counts as unfamiliar: the threshold is their score at this quantile."""
    exclude_sources: tuple[str, ...] = ()
    """Sources left out of the train and validation splits (leave-one-source-out); the test split keeps them."""
    max_train_rows_per_source: int = 0
    """Train on at most this many rows of each source (first in prompt-hash order); 0 uses them all."""
    replay_ratio: float = 4.0
    """Retraining: labelled train rows replayed per feedback example seen (after ``feedback_repeat``), sampled
    stratified by source, so an epoch is mostly the old data and the model does not drift to the feedback."""
    feedback_holdout: float = 0.2
    """Retraining: share of the feedback records (by prompt hash) held out of training to measure on."""
    feedback_repeat: int = 10
    """Retraining (``s3 train --feedback``): each feedback record is seen this many times per epoch. A serving
    round yields few mispredictions against thousands of labelled rows; seen once, they barely move the model."""
    keep_parent_unless_matched: bool = True
    """Retraining: the checkpoint it starts from is scored on the validation split first (as epoch 0) and its
    weights are kept unless an epoch does at least as well on the monitored metric, so a round never ships a
    predictor that scores worse on the labelled validation rows than the one it replaces. False keeps the best
    epoch whatever it scores."""
    traffic_monitor: Monitor = "mae"
    """Retraining: the metric the guard compares on the held-out sample of served traffic, when the store holds
    one large enough (predictor_train/retrain.py); ``monitor`` still judges the labelled validation split."""
    replay_only: bool = False
    """Retraining, as a control: the same number of training examples per epoch, all replayed labelled rows, the
    feedback left out of training (still measured on). Says how much of a round's gain is the feedback's and how
    much is only more training on labelled data."""
    seed: int = 0
    """Seed for the classification head's initialisation and the batch order."""
    deepspeed_config: str = "auto"
    """DeepSpeed JSON file; ``auto`` picks predictor_gpu.json with CUDA, else predictor_cpu.json."""
    wandb_project: str = "s3-predictor"
    """wandb project name."""
    wandb_mode: WandbMode = "offline"
    """``offline`` (default, never uses the network), ``online`` or ``disabled``; the WANDB_MODE environment variable
    wins over it (core/tracking.py)."""
    output_dir: str = "runs/predictor"
    """Where the best checkpoint (and the wandb run folder) is written."""

    def __post_init__(self) -> None:
        positive = ("max_tokens", "num_buckets", "epochs", "batch_size", "max_prompt_tokens", "patience",
                    "feedback_repeat")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0 or self.class_weight_smoothing <= 0 or self.label_sigma <= 0:
            raise ValueError("lr, class_weight_smoothing and label_sigma must be positive")
        if min(self.max_train_rows_per_source, self.replay_ratio, self.familiarity_bank_size) < 0 \
                or not 0 <= self.feedback_holdout < 1 or not 0 < self.familiarity_quantile < 1:
            raise ValueError("max_train_rows_per_source, replay_ratio and familiarity_bank_size must be >= 0, "
                             "feedback_holdout in [0, 1), familiarity_quantile in (0, 1)")
        for name, choices in (("bucket_scheme", BucketScheme), ("wandb_mode", WandbMode), ("monitor", Monitor),
                              ("traffic_monitor", Monitor), ("loss", LossKind),
                              ("prompt_truncation", PromptTruncation)):
            if getattr(self, name) not in get_args(choices):
                raise ValueError(f"{name} must be one of {get_args(choices)}, got {getattr(self, name)!r}")
        if self.max_tokens < self.num_buckets:
            raise ValueError(f"max_tokens ({self.max_tokens}) must be at least num_buckets ({self.num_buckets})")


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a training run produced."""

    checkpoint_dir: Path
    """Folder of the best checkpoint (loadable by LengthPredictor.load)."""
    info: CheckpointInfo
    """Its ``predictor.json``."""
    best_epoch: int
    """1-based epoch whose weights were kept; 0 when retraining kept the starting weights (no epoch matched them on
    validation)."""
    history: list[dict[str, float]]
    """Per-epoch train loss and validation metrics."""


def make_buckets(config: TrainConfig, train_lengths: list[int] | tuple[int, ...]) -> BucketSpec:
    over = sum(n > config.max_tokens for n in train_lengths)
    if over:  # data without a recipe.json (the recipe's cap is checked against max_tokens before training)
        log.warning("%d of the %d training labels are longer than max_tokens=%d: they count as the last bucket; if "
                    "the data was labelled with a larger max_new_tokens, set max_tokens to it", over,
                    len(train_lengths), config.max_tokens)
    if config.bucket_scheme == "uniform":
        return BucketSpec.uniform(config.max_tokens, config.num_buckets)
    spec = BucketSpec.from_quantiles(list(train_lengths), config.max_tokens, config.num_buckets)
    if spec.num_buckets < config.num_buckets:
        log.warning("bucket_scheme=quantile: %d buckets, not %d: the training lengths repeat (a quantile falls on "
                    "the same length as the one before, e.g. many answers at the cap); edges %s",
                    spec.num_buckets, config.num_buckets, list(spec.upper_edges))
    return spec


def train_predictor(config: TrainConfig, data, *, target_model: str, decoding: Mapping[str, Any] | None = None,
                    progress: bool = True) -> TrainResult:
    """Train from labelled records (path or Dataset) and write the best checkpoint to ``config.output_dir``.

    ``target_model`` and ``decoding`` describe how the labels were generated; serving checks them on load.
    """
    splits = training_splits(config, data)
    train, validation = Examples.from_rows(splits["train"]), Examples.from_rows(splits["validation"])
    spec = make_buckets(config, train.num_output_tokens)
    backbone = load_classifier(config.backbone, spec, seed=config.seed)
    counts = {name: len(rows) for name, rows in splits.items()}
    counts["train_by_source"] = dict(sorted(Counter(splits["train"]["source"]).items())) \
        if "source" in splits["train"].column_names else {}
    return fit(config, train, validation, backbone=backbone, spec=spec, progress=progress,
               meta=dict(target_model=target_model, decoding=dict(decoding or {}), data=counts))


def training_splits(config: TrainConfig, data):
    """The stratified splits, with ``exclude_sources`` dropped from train and validation and the train split
    capped at ``max_train_rows_per_source``; the test split is the full one (it keeps the excluded sources)."""
    records = load_records(data)
    check_sources(records, config.exclude_sources)
    splits = split_records(records)
    train = cap_per_source(drop_sources(splits["train"], config.exclude_sources), config.max_train_rows_per_source)
    validation = drop_sources(splits["validation"], config.exclude_sources)
    if len(train) == 0:
        raise ValueError(f"no training rows left after excluding {list(config.exclude_sources)}")
    splits["train"], splits["validation"] = train, validation
    return splits


def fit(config: TrainConfig, train: Examples, validation: Examples, *, backbone: Backbone, spec: BucketSpec,
        meta: dict[str, Any], progress: bool = True, start_competes: bool = False,
        traffic: Examples | None = None, familiar: tuple[Sequence[str], Sequence[str]] | None = None,
        familiar_lengths: Mapping[str, int] | None = None, parent: str | Path | None = None,
        prior_lengths: Sequence[int] | None = None) -> TrainResult:
    """The training loop shared by training and retraining; ``meta`` fills the rest of CheckpointInfo.

    ``start_competes``: the starting weights are validated first, as epoch 0, and saved; an epoch replaces them
    only if it scores at least as well (retraining's guard against shipping a worse predictor). ``traffic``: a
    weighted sample of served requests (retraining); each epoch is scored on it too, under ``traffic`` in its
    record, and replaces the best so far only if it scores at least as well on both. ``familiar``: the prompts the
    familiarity bank samples and those it always keeps (default: the training examples', none kept); retraining
    passes the whole train split and its fed-back prompts, all that the weights have learned from, with their
    labels in ``familiar_lengths`` (default: the training examples'). ``parent``: the checkpoint the starting
    weights come from; where they win (epoch 0), that checkpoint is written out unchanged, its temperature, length
    prior and familiarity bank included, not the starting weights with metadata from this round's data.
    ``prior_lengths``: the lengths the length prior and shape are estimated from (default: the training examples',
    which retraining repeats and mixes).

    The checkpoint is written to a staging folder inside ``config.output_dir`` and moved in once complete
    (`publish_checkpoint`): a checkpoint already there survives a run that stops early."""
    if len(train) == 0 or len(validation) == 0:
        raise ValueError(f"need both training and validation examples, got {len(train)} and {len(validation)}; "
                         "the hash split puts ~10% of prompts in validation, so give at least a few dozen records")
    check_prompt_tokens(backbone.tokenizer, backbone.model, config.max_prompt_tokens)  # retraining's parent too
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    lengths = train.num_output_tokens if prior_lengths is None else prior_lengths
    meta = {**meta, "length_prior": bucket_frequencies(spec, lengths), "length_shape": within_bucket_shape(spec, lengths)}
    ds_config = build_deepspeed_config(config.deepspeed_config, batch_size=config.batch_size, lr=config.lr)
    engine = start_engine(backbone.model, ds_config)
    is_main = rank_and_world_size()[0] == 0  # every rank validates the same way; rank 0 alone writes
    train_labels = labels_of(train.num_output_tokens, spec)
    weights = torch.tensor(class_weights(train_labels, spec.num_buckets, smoothing=config.class_weight_smoothing),
                           device=engine.device)
    run = start_wandb(config, spec=spec, meta=meta) if is_main else None
    output = Path(config.output_dir)
    staging = staging_folder(output) if is_main else None
    history, best, best_epoch, stale, info = [], None, 0, 0, None
    first_epoch = 0 if start_competes else 1
    with finishing(run):
        for epoch in range(first_epoch, config.epochs + 1):
            train_loss = None
            if epoch > 0:
                train_loss = train_epoch(engine, backbone.tokenizer, train, train_labels, weights, config=config,
                                         epoch=epoch, progress=progress, run=run)
            metrics = validate(engine, backbone.tokenizer, validation, weights, spec=spec, config=config)
            if not math.isfinite(metrics["loss"]) or (train_loss is not None and not math.isfinite(train_loss)):
                raise ValueError(f"training diverged at epoch {epoch}: training loss {train_loss}, validation loss "
                                 f"{metrics['loss']}; lower lr (now {config.lr:g}). {output} keeps what it held")
            if traffic is not None:
                metrics["traffic"] = validate(engine, backbone.tokenizer, traffic, weights, spec=spec, config=config)
            history.append({"epoch": epoch, "train_loss": train_loss, **metrics})
            _log_epoch(run, history[-1])
            if _improved(metrics, best, config.monitor, ties=best_epoch == 0, traffic_monitor=config.traffic_monitor):
                best, best_epoch, stale = metrics, epoch, 0
                if is_main:
                    info = _save_best(config, staging, engine, backbone, spec=spec,
                                      metrics={"epoch": epoch, **metrics}, ds_config=ds_config, meta=meta)
            else:
                stale += 1
                if stale >= config.patience:
                    log.info("early stop after epoch %d: no %s improvement in %d epochs", epoch, config.monitor,
                             stale)
                    break
    if is_main:
        if best_epoch == 0 and parent is not None:  # the parent won: it is kept, as it was
            log.info("the starting weights scored best: %s is written out unchanged", parent)
            info = copy_checkpoint(parent, staging_folder(output))
        else:
            labels = familiar_lengths if familiar else dict(zip(train.prompts, train.num_output_tokens))
            info = _finish_checkpoint(config, staging, validation, familiar or (train.prompts, ()), labels) or info
        publish_checkpoint(staging, output)
    info = _checkpoint_info_on_all_ranks(info, config.output_dir)
    return TrainResult(checkpoint_dir=output, info=info, best_epoch=best_epoch, history=history)


def _finish_checkpoint(config: TrainConfig, folder: Path, validation: Examples,
                       familiar: tuple[Sequence[str], Sequence[str]],
                       lengths: Mapping[str, int] | None) -> CheckpointInfo | None:
    """Once the best epoch is saved in ``folder``: fit the temperature on the validation split and build the
    familiarity bank from ``familiar`` (the prompts to sample, those always kept), with the neighbours' blend where ``lengths`` labels
    them, as the config asks; the checkpoint's new info, or None when it asks for neither."""
    info = None
    if config.calibrate:
        from predictor_train.calibration import calibrate_checkpoint

        info = calibrate_checkpoint(folder, validation.prompts, validation.num_output_tokens,
                                    batch_size=2 * config.batch_size)
        if info.temperature == info.metrics["temperature_fitted"]:
            log.info("temperature %.3f: validation ECE %.3f -> %.3f", info.temperature,
                     info.metrics["ece_uncalibrated"], info.metrics["ece_calibrated"])
        else:
            log.info("temperature 1 kept: the fitted %.3f lowered validation NLL but raised its ECE (%.3f at T = 1)",
                     info.metrics["temperature_fitted"], info.metrics["ece_uncalibrated"])
    if config.familiarity_bank_size:
        from predictor_train.familiarity import build_familiarity
        from predictor_train.inference import LengthPredictor

        pool, keep = familiar
        info = build_familiarity(LengthPredictor.load(folder), folder, pool, validation.prompts,
                                 bank_size=config.familiarity_bank_size, quantile=config.familiarity_quantile,
                                 seed=config.seed, keep=keep, batch_size=2 * config.batch_size, lengths=lengths,
                                 validation_lengths=validation.num_output_tokens)
        log.info("familiarity: %d training prompts kept; below %.3f a prompt is unfamiliar (%.0f%% of validation); "
                 "blend with the %d most similar's lengths: weight %.2f", info.familiarity["bank_size"],
                 info.familiarity["threshold"], 100 * config.familiarity_quantile, info.familiarity["neighbours"],
                 info.familiarity["neighbour_weight"])
    return info


def _log_epoch(run, record: dict[str, Any]) -> None:
    """Logs one epoch's record; epoch 0 (the starting weights, retraining) has no training loss."""
    trained = "" if record["train_loss"] is None else f"train loss {record['train_loss']:.4f}, "
    traffic = record.get("traffic")
    served = "" if traffic is None else (f", served traffic loss {traffic['loss']:.4f}, acc {traffic['accuracy']:.3f}, "
                                         f"MAE {traffic['mae_tokens']:.1f}")
    log.info("epoch %d: %sval loss %.4f, val acc %.3f%s", record["epoch"], trained, record["loss"],
             record["accuracy"], served)
    if run is not None:
        run.log(epoch_metrics(record))


def _checkpoint_info_on_all_ranks(info: CheckpointInfo | None, output_dir: str) -> CheckpointInfo:
    """Rank 0 has written the best checkpoint; the other ranks wait for it and read its info."""
    import deepspeed.comm as dist

    rank, world_size = rank_and_world_size()
    if world_size > 1:
        dist.barrier()
    if rank > 0:
        return read_info(output_dir)
    assert info is not None  # the first epoch always improves on "no result yet"
    return info


def train_epoch(engine, tokenizer, train: Examples, labels: list[int], weights: torch.Tensor, *,
                config: TrainConfig, epoch: int, progress: bool, run=None) -> float:
    """One pass over the training examples in a seeded shuffled order; returns the mean batch loss."""
    engine.train()
    rank, world_size = rank_and_world_size()
    stream = batches(train.prompts, labels, tokenizer, batch_size=config.batch_size,
                     max_prompt_tokens=config.max_prompt_tokens, truncation=config.prompt_truncation,
                     input_names=model_input_names(engine.module),
                     shuffle_seed=config.seed + epoch, shard=(rank, world_size))
    total = num_batches(len(train), config.batch_size, world_size)
    bar = tqdm(stream, total=total, desc=f"epoch {epoch}/{config.epochs}", disable=not progress or rank > 0,
               leave=False)
    losses = []
    for batch in bar:
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        target = batch.pop("labels")
        logits = engine(**batch).logits  # (B, K)
        loss = length_loss(logits, target, weights, kind=config.loss, label_sigma=config.label_sigma,
                           rps_weight=config.rps_weight)
        engine.backward(loss)
        engine.step()  # steps the optimizer only at gradient-accumulation boundaries
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if run is not None:
            run.log({"train/step_loss": losses[-1]})
    return sum(losses) / max(len(losses), 1)


@torch.no_grad()
def validate(engine, tokenizer, validation: Examples, weights: torch.Tensor, *, spec: BucketSpec,
             config: TrainConfig) -> dict[str, float]:
    """Weighted loss (as in training, so the two compare) and bucket metrics on the validation examples (each also
    weighted by the example's ``weights``, when they have some)."""
    engine.eval()
    labels = labels_of(validation.num_output_tokens, spec)
    stream = batches(validation.prompts, labels, tokenizer, batch_size=2 * config.batch_size,
                     max_prompt_tokens=config.max_prompt_tokens, truncation=config.prompt_truncation,
                     input_names=model_input_names(engine.module))
    sample_weights = validation.weights or (1.0,) * len(validation)
    loss_sum, weight_sum, predicted = 0.0, 0.0, []
    for batch in stream:
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        target = batch.pop("labels")
        logits = engine(**batch).logits.float()  # (B, K)
        sample = torch.tensor(sample_weights[len(predicted):len(predicted) + len(target)], device=engine.device)
        loss_sum += (sample * F.cross_entropy(logits, target, weight=weights, reduction="none")).sum().item()
        weight_sum += (sample * weights[target]).sum().item()
        predicted += logits.argmax(dim=-1).tolist()
    metrics = bucket_metrics(validation.num_output_tokens, predicted, spec, weights=validation.weights)
    return {"loss": loss_sum / weight_sum, **metrics}


def _improved(metrics: dict[str, float], best: dict[str, float] | None, monitor: Monitor, *, ties: bool,
              traffic_monitor: Monitor | None = None) -> bool:
    """Whether ``metrics`` beats ``best`` on ``monitor`` (or equals it, with ``ties``), and, when both were scored
    on served traffic too, on that as well (on ``traffic_monitor``, ``monitor`` by default)."""
    if best is None:
        return True
    if "traffic" in metrics and "traffic" in best and not _improved(metrics["traffic"], best["traffic"],
                                                                    traffic_monitor or monitor, ties=ties):
        return False
    key, sign = {"loss": ("loss", -1), "accuracy": ("accuracy", 1), "mae": ("mae_tokens", -1)}[monitor]
    new, old = sign * metrics[key], sign * best[key]
    return new >= old if ties else new > old


def _save_best(config: TrainConfig, folder: Path, engine, backbone: Backbone, *, spec: BucketSpec,
               metrics: dict[str, float], ds_config: dict[str, Any], meta: dict[str, Any]) -> CheckpointInfo:
    info = CheckpointInfo(
        checkpoint_id="", buckets=spec, bucket_scheme=config.bucket_scheme, target_model=meta["target_model"],
        decoding=meta["decoding"], train_config=dataclasses.asdict(config), backbone_kind=backbone.kind,
        metrics=metrics, deepspeed_config=ds_config, data=meta["data"],
        parent_checkpoint_id=meta.get("parent_checkpoint_id"), length_prior=list(meta["length_prior"]),
        length_shape=[list(row) for row in meta["length_shape"]],
    )
    return save_checkpoint(folder, engine.module, backbone.tokenizer, info)


def start_wandb(config: TrainConfig, *, spec: BucketSpec, meta: dict[str, Any]):
    """A wandb run under the output folder, or None; the mode follows core/tracking.py (WANDB_MODE wins, then
    ``config.wandb_mode``; offline by default; none inside a pipeline stage, which records itself)."""
    return start_run(project=config.wandb_project, job_type="train-predictor", mode=config.wandb_mode,
                     dir=config.output_dir, config={**dataclasses.asdict(config), "buckets": list(spec.upper_edges),
                                                    "target_model": meta["target_model"], "data": meta["data"]})
