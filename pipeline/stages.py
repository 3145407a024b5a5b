"""The pipeline's stages: generate -> train -> collect -> retrain -> bench, listed in `STAGES`.

Each stage is a function of a `StageContext` (the pipeline's config, the stage's own folder, the outputs of the
stages before it) returning its outputs; pipeline/run.py decides which stages run and records them. The
serving rounds (collect, bench) serve fresh prompts, none of them labelled, under `max` and `s3` in one run, so
that every s3/max ratio divides two figures of the same run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import time
from typing import Callable, Mapping

from pipeline.generate import GenerateConfig
from pipeline.prompts import PROMPT_SETS, sample_prompts
from predictor_train.train import TrainConfig


@dataclasses.dataclass(frozen=True)
class ServeRoundConfig:
    """The offline serving rounds (collect, then bench after retraining) on the same fresh prompts."""

    inputs: tuple[str, ...] = PROMPT_SETS
    """Prompt files to draw serving traffic from (round-robin, without replacement; labelled prompts left out)."""
    num_prompts: int = 32
    """Requests per round."""
    model: str = "smollm2"
    """The served model: `smollm2`, a .gguf file or a Hugging Face folder (the one the data was labelled with)."""
    device: str = "cpu"
    max_new_tokens: int = 512
    """Output cap; must equal the predictor's max_tokens (its buckets span it)."""
    kv_worst_case_seqs: int = 8
    """KV budget: room for this many worst-case (longest prompt + max_new_tokens) sequences."""
    max_num_seqs: int = 64
    feedback_sample_rate: float = 0.1
    """Share of the collect round's well-predicted requests recorded as feedback too (`s3 serve`'s
    ``feedback_sample_rate``)."""
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """The whole loop. Sections are the stages' own configs; `--set train.epochs=1` overrides one field."""

    run_id: str = "default"
    """Folder name under runs_dir (and the wandb group)."""
    runs_dir: str = "runs"
    labelled_data: str = "data/labelled"
    """Labelled data committed with the project; used as is unless `regenerate` is true."""
    regenerate: bool = False
    """Run `generate` into the run folder instead of using `labelled_data`."""
    generate: GenerateConfig = GenerateConfig()
    train: TrainConfig = TrainConfig()
    retrain_epochs: int = 1
    """Epochs of the retraining round (from the trained checkpoint, with the feedback added)."""
    serve: ServeRoundConfig = ServeRoundConfig()
    wandb_project: str = "s3-serve"
    wandb_mode: str | None = None
    """offline (the default), online or disabled; the WANDB_MODE environment variable wins (core/tracking.py)."""


@dataclasses.dataclass(frozen=True)
class StageContext:
    """What a stage gets."""

    config: PipelineConfig
    stage_dir: pathlib.Path
    """The stage's own folder, runs/<run-id>/<stage>/."""
    upstream: Mapping[str, dict]
    """Outputs of the stages before it, by stage name."""
    echo: Callable[[str], None] = print


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[StageContext], dict]
    config_keys: tuple[str, ...]
    """PipelineConfig fields the stage reads: with the upstream stages' fingerprints, its inputs."""
    version: int = 1
    """Bumped when the stage's outputs change meaning, so that a recorded run of the old code is not reused."""
    unread_keys: tuple[str, ...] = ()
    """`section.field`s of those sections the stage never reads, left out of its inputs: changing them reruns
    nothing."""
    reads: Callable[[PipelineConfig], tuple[str, ...]] = lambda config: ()
    """Files and folders outside the run folder the stage reads (the committed labelled data, prompt files):
    their contents are part of its inputs, so that editing them reruns it."""


def serving_prompts(config: ServeRoundConfig, exclude: set[str]) -> list[str]:
    """The serving round's prompt texts: drawn without replacement, round-robin by file, none in ``exclude``."""
    rows = sample_prompts(config.inputs, config.num_prompts, exclude=exclude, seed=config.seed)
    return [row.prompt for row in rows]


def fingerprint(path: pathlib.Path) -> str:
    """A hash of a file's, or a folder's files', contents and names; "missing" where there is nothing."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        return "missing"
    for file in files:
        digest.update((file.name if file == path else file.relative_to(path).as_posix()).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def _test_summary(metrics: dict) -> dict:
    keep = ("accuracy", "within_one_accuracy", "under_prediction_rate", "mae_tokens")
    return {method: {k: v for k, v in m.items() if k in keep} for method, m in metrics.items()}


# -- the stages -------------------------------------------------------------------------------------------------


def generate_stage(ctx: StageContext) -> dict:
    """The labelled data: the committed folder, or (regenerate) `s3 generate` into the run folder."""
    from pipeline.commands import label_and_save
    from pipeline.labelled import labelled_data

    config = ctx.config
    if config.regenerate:
        folder = ctx.stage_dir / "labelled"
        label_and_save(dataclasses.replace(config.generate, output_dir=str(folder)), echo=ctx.echo)
    else:
        folder = pathlib.Path(config.labelled_data)
        labelled_data(str(folder))  # fails clearly when the data is not there
        ctx.echo(f"using the labelled data in {folder} (set regenerate=true to label again)")
    return {"data": str(folder), "fingerprint": fingerprint(folder / "dataset")}


def train_stage(ctx: StageContext) -> dict:
    from pipeline.commands import train_and_evaluate

    config = dataclasses.replace(ctx.config.train, output_dir=str(ctx.stage_dir / "checkpoint"))
    out = train_and_evaluate(config, data=ctx.upstream["generate"]["data"], echo=ctx.echo)
    return {"checkpoint": str(out["checkpoint"]), "fingerprint": out["checkpoint_id"],
            "test": _test_summary(out["test_metrics"]), "history": out.get("history", [])}  # fmt: skip


def collect_stage(ctx: StageContext) -> dict:
    """Serve fresh prompts under max and s3 with the trained predictor; s3's mispredictions to a feedback store."""
    feedback = ctx.stage_dir / "feedback"
    if feedback.exists():  # records of an earlier run of this stage: kept aside, not mixed into this round's
        feedback.rename(feedback.with_name(f"feedback.previous-{time.time_ns()}"))
    runs = serve_round(ctx, ctx.upstream["train"]["checkpoint"], feedback_dir=feedback)
    return {"feedback": str(feedback), "fingerprint": fingerprint(feedback) if feedback.exists() else "none", **runs}


def retrain_stage(ctx: StageContext) -> dict:
    from pipeline.commands import train_and_evaluate

    trained = ctx.upstream["train"]
    if not ctx.upstream["collect"]["s3"].get("mispredicted_requests"):
        ctx.echo("no mispredictions were collected: nothing to retrain on; keeping the trained predictor")
        return {"checkpoint": trained["checkpoint"], "fingerprint": "unchanged"}
    config = dataclasses.replace(ctx.config.train, epochs=ctx.config.retrain_epochs,
                                 output_dir=str(ctx.stage_dir / "checkpoint"))  # fmt: skip
    out = train_and_evaluate(config, data=ctx.upstream["generate"]["data"], feedback=ctx.upstream["collect"]["feedback"],
                             previous=trained["checkpoint"], echo=ctx.echo)  # fmt: skip
    report = out["retrain"]
    return {
        "checkpoint": str(out["checkpoint"]), "fingerprint": out["checkpoint_id"],
        "feedback_used": report.num_feedback_used, "feedback_held_out": report.num_feedback_held_out,
        "kept_parent_weights": report.kept_parent, "judged_on": report.traffic, "history": report.result.history,
        "before": {name: _test_summary(r.metrics)["predictor"] for name, r in report.before.items()},
        "after": {name: _test_summary(r.metrics)["predictor"] for name, r in report.after.items()},
    }  # fmt: skip


def bench_stage(ctx: StageContext) -> dict:
    """The same prompts as collect, under max and s3 with the retrained predictor, in one run."""
    return {"fingerprint": "bench", **serve_round(ctx, ctx.upstream["retrain"]["checkpoint"], feedback_dir=None)}


# The train section's fields no stage reads: the stages set output_dir, and run with tracking off.
_UNREAD_TRAIN = ("output_dir", "wandb_project", "wandb_mode")
# Those only retraining reads (predictor_train/retrain.py).
_RETRAIN_ONLY = ("replay_ratio", "feedback_holdout", "feedback_repeat", "keep_parent_unless_matched",
                 "traffic_monitor", "replay_only")


def _generate_reads(config: PipelineConfig) -> tuple[str, ...]:
    if config.regenerate:
        return config.generate.inputs
    return (str(pathlib.Path(config.labelled_data) / "dataset"),)


STAGES: tuple[Stage, ...] = (
    Stage("generate", generate_stage, ("labelled_data", "regenerate", "generate"), reads=_generate_reads),
    Stage("train", train_stage, ("train",),
          unread_keys=tuple(f"train.{key}" for key in _UNREAD_TRAIN + _RETRAIN_ONLY)),
    Stage("collect", collect_stage, ("serve",), version=2, reads=lambda config: config.serve.inputs),
    Stage("retrain", retrain_stage, ("train", "retrain_epochs"), version=3,
          unread_keys=tuple(f"train.{key}" for key in _UNREAD_TRAIN)),
    Stage("bench", bench_stage, ("serve",), version=2, reads=lambda config: config.serve.inputs),
)
"""Every stage, in the order they run."""


# -- serving rounds ---------------------------------------------------------------------------------------------


def serve_round(ctx: StageContext, checkpoint: str, *, feedback_dir: pathlib.Path | None,
                policies: tuple[str, ...] = ("max", "s3")) -> dict:
    """The serving prompts under each of ``policies`` (max first) with ``checkpoint`` as the bucket predictor;
    s3's mispredictions go to ``feedback_dir``. One record per policy, all from this one run."""
    from pipeline.bench import answers_unlike, predictions_for, run_policy
    from pipeline.labelled import labelled_prompts
    from pipeline.prompts import format_prompt
    from predictor_train.inference import LengthPredictor
    from serve.engine.llm import EngineConfig
    from serve.engine.loader import load_model
    from serve.engine.plan import SamplingParams
    from serve.feedback import FeedbackLog, FeedbackWriter
    from serve.policy_config import PolicyConfig, with_length_profile

    config = ctx.config.serve
    texts = serving_prompts(config, exclude=labelled_prompts(ctx.upstream["generate"]["data"]))
    model, tokenizer = load_model(None if config.model == "smollm2" else config.model, device=config.device)
    prompts = [(text, format_prompt(tokenizer, text)) for text in texts]
    predictor = LengthPredictor.load(checkpoint, device=config.device)
    buckets = predictor.buckets
    if buckets.max_tokens != config.max_new_tokens:
        raise ValueError(f"the predictor's buckets span {buckets.max_tokens} tokens but serve.max_new_tokens is "
                         f"{config.max_new_tokens}; make them equal")
    longest = max(len(ids) for _, ids in prompts) + config.max_new_tokens
    engine_config = EngineConfig(model=config.model, device=config.device, max_num_seqs=config.max_num_seqs,
                                 kv_cache_tokens=config.kv_worst_case_seqs * longest)
    feedback = None
    if feedback_dir:
        feedback = FeedbackLog(FeedbackWriter(feedback_dir), buckets, predictor.checkpoint_id,
                               sample_rate=config.feedback_sample_rate)

    predicted = predictor.predict(texts)
    sampling = SamplingParams.from_decoding(predictor.decoding)  # as the labels were made
    runs, max_answers = {}, []
    for policy in ["max", *[p for p in policies if p != "max"]]:
        ctx.echo(f"  serving {len(prompts)} prompts under {policy}")
        true_lengths = [len(answer) for answer in max_answers]
        given = None if policy == "max" else predictions_for(policy, predicted=predicted, true_lengths=true_lengths,
                                                                buckets=buckets)  # fmt: skip
        result, answers = run_policy(policy, engine_config, model=model, tokenizer=tokenizer, prompts=prompts,
                                     max_new_tokens=config.max_new_tokens, predictions=given, buckets=buckets,
                                     sampling=sampling, knobs=with_length_profile(PolicyConfig(), predictor),
                                     on_finish=feedback.record if feedback and policy == "s3" else lambda r: None)
        max_answers = max_answers or answers
        differing = answers_unlike(answers, max_answers)
        if differing:
            ctx.echo(f"  warning: {policy} answered {differing} prompts unlike max (same prompts and decoding)")
        record = result.record()
        runs[policy] = {"tokens_per_s": result.tokens_per_s, "preemptions": result.num_preemptions,
                        "mispredictions": result.num_mispredictions, "mean_running_batch": result.mean_running_batch,
                        "generated_tokens": result.generated_tokens, "mean_ttft_s": record["mean_ttft_s"],
                        "p99_latency_s": record["p99_latency_s"], "answers_differing": differing}  # fmt: skip
    if feedback is not None:
        feedback.close()
        runs["s3"]["mispredicted_requests"] = feedback.num_mispredicted
        runs["s3"]["sampled_requests"] = feedback.num_sampled
    runs["s3"]["checkpoint_id"] = predictor.checkpoint_id
    if predictor.familiarity is not None:  # how many of the served prompts looked like none it was trained on
        runs["s3"] |= {"unfamiliar_prompts": sum(bool(p.unfamiliar) for p in predicted), "num_prompts": len(texts)}
    return runs
