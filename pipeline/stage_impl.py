"""What each pipeline stage does (pipeline/run.py decides whether it runs)."""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import time

from pipeline.tracking import start_run


def start_stage_run(pipeline, stage: str):
    config = pipeline.config
    return start_run(project=config.wandb_project, job_type=stage, group=config.run_id,
                     config=dataclasses.asdict(config), mode=config.wandb_mode)  # fmt: skip


def log_stage(run, stage: str, outputs: dict) -> None:
    """Scalars to the run summary; datasets and checkpoints as artifacts."""
    if run is None:
        return
    import wandb

    for record in outputs.get("history", []):  # per-epoch training curves
        run.log(record)
    run.summary.update({k: v for k, v in _flatten(outputs).items() if isinstance(v, (int, float, str))})
    for key, kind in (("data", "dataset"), ("checkpoint", "model"), ("feedback", "dataset")):
        path = outputs.get(key)
        if path and pathlib.Path(path).is_dir():
            artifact = wandb.Artifact(f"{stage}-{key}", type=kind)
            artifact.add_dir(str(path))
            run.log_artifact(artifact)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}/")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _fingerprint(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def run_generate(pipeline) -> dict:
    from pipeline.stages import labelled_data, run_generate as generate

    config = pipeline.config
    if config.regenerate:
        out = pipeline.stage_dir("generate") / "labelled"
        generate(dataclasses.replace(config.generate, output_dir=str(out), wandb_mode="disabled"), echo=pipeline.echo)
        folder = out
    else:
        folder = pathlib.Path(config.labelled_data)
        labelled_data(str(folder))  # fails clearly when the data is not there
        pipeline.echo(f"using the labelled data in {folder} (set regenerate=true to label again)")
    return {"data": str(folder), "fingerprint": _fingerprint(folder / "dataset")}


def _test_summary(metrics: dict) -> dict:
    keep = ("accuracy", "within_one_accuracy", "under_prediction_rate", "mae_tokens")
    return {method: {k: v for k, v in m.items() if k in keep} for method, m in metrics.items()}


def run_train(pipeline) -> dict:
    from pipeline.stages import run_train as train

    config = dataclasses.replace(pipeline.config.train, output_dir=str(pipeline.stage_dir("train") / "checkpoint"),
                                 wandb_mode="disabled")  # fmt: skip
    out = train(config, data=pipeline.outputs["generate"]["data"], echo=pipeline.echo)
    return {"checkpoint": str(out["checkpoint"]), "fingerprint": out["checkpoint_id"],
            "test": _test_summary(out["test_metrics"]), "history": out.get("history", [])}  # fmt: skip


def _serve_round(pipeline, checkpoint: str, *, with_max: bool, feedback_dir: pathlib.Path | None) -> dict:
    """The serving prompts under s3 with ``checkpoint`` (and `max` for the ratio); mispredictions to feedback."""
    from pipeline.run import serving_prompts
    from predictor_train.inference import LengthPredictor
    from pipeline.bench import run_policy
    from serve.engine.llm import EngineConfig
    from serve.engine.loader import load_model
    from serve.engine.plan import SamplingParams
    from serve.feedback import FeedbackWriter, feedback_record
    from pipeline.generate import format_prompt
    from pipeline.stages import labelled_data

    config = pipeline.config.serve
    dataset, _ = labelled_data(pipeline.outputs["generate"]["data"])
    import datasets

    texts = serving_prompts(config, exclude=set(datasets.load_from_disk(dataset)["prompt"]))
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
    runs = {}
    writer = FeedbackWriter(feedback_dir) if feedback_dir else None

    def on_finish(request) -> None:
        if writer is not None and request.mispredictions:
            writer.write(feedback_record(request, buckets, checkpoint_id=predictor.checkpoint_id))

    predictions = predictor.predict(texts)
    sampling = SamplingParams.from_decoding(predictor.decoding)  # as the labels were made
    for policy in (["max"] if with_max else []) + ["s3"]:
        pipeline.echo(f"  serving {len(prompts)} prompts under {policy}")
        result, _ = run_policy(policy, engine_config, model=model, tokenizer=tokenizer, prompts=prompts,
                               max_new_tokens=config.max_new_tokens, predictions=predictions, buckets=buckets,
                               sampling=sampling,
                               on_finish=on_finish if policy == "s3" else lambda r: None)  # fmt: skip
        runs[policy] = {"tokens_per_s": result.tokens_per_s, "preemptions": result.num_preemptions,
                        "mispredictions": result.num_mispredictions, "mean_running_batch": result.mean_running_batch,
                        "generated_tokens": result.generated_tokens}  # fmt: skip
    if writer is not None:
        writer.close()
        runs["s3"]["mispredicted_requests"] = writer.num_written
    runs["s3"]["checkpoint_id"] = predictor.checkpoint_id
    return runs


def run_collect(pipeline) -> dict:
    feedback = pipeline.stage_dir("collect") / "feedback"
    if feedback.exists():  # records of an earlier run of this stage: kept aside, not mixed into this round's
        feedback.rename(feedback.with_name(f"feedback.previous-{time.time_ns()}"))
    runs = _serve_round(pipeline, pipeline.outputs["train"]["checkpoint"], with_max=True, feedback_dir=feedback)
    return {"feedback": str(feedback), "fingerprint": _fingerprint(feedback) if feedback.exists() else "none", **runs}


def run_retrain(pipeline) -> dict:
    from pipeline.stages import run_train as train

    if not pipeline.outputs["collect"]["s3"].get("mispredicted_requests"):
        pipeline.echo("no mispredictions were collected: nothing to retrain on; keeping the trained predictor")
        return {"checkpoint": pipeline.outputs["train"]["checkpoint"], "fingerprint": "unchanged"}
    config = dataclasses.replace(pipeline.config.train, epochs=pipeline.config.retrain_epochs, wandb_mode="disabled",
                                 output_dir=str(pipeline.stage_dir("retrain") / "checkpoint"))  # fmt: skip
    out = train(config, data=pipeline.outputs["generate"]["data"], feedback=pipeline.outputs["collect"]["feedback"],
                previous=pipeline.outputs["train"]["checkpoint"], echo=pipeline.echo)  # fmt: skip
    report = out["retrain"]
    return {
        "checkpoint": str(out["checkpoint"]), "fingerprint": out["checkpoint_id"],
        "feedback_used": report.num_feedback_used,
        "before": {name: _test_summary(r.metrics)["predictor"] for name, r in report.before.items()},
        "after": {name: _test_summary(r.metrics)["predictor"] for name, r in report.after.items()},
    }  # fmt: skip


def run_bench(pipeline) -> dict:
    runs = _serve_round(pipeline, pipeline.outputs["retrain"]["checkpoint"], with_max=False, feedback_dir=None)
    return {"fingerprint": "bench", **runs}
