"""The bodies of the `s3 generate` and `s3 train` commands: build what they need from their config, run with a
progress bar, record the run. The pipeline's stages (pipeline/stages.py) call these too."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Callable

from tqdm import tqdm

from pipeline import generate as gen
from pipeline.labelled import labelled_data, write_dataset
from pipeline.prompts import source_name
from core.tracking import finishing, start_run


def label_and_save(
    config: gen.GenerateConfig, *, echo: Callable[[str], None] = print, engine=None, write_only: bool = False
) -> dict:
    """`s3 generate`: label what is not labelled yet, then write the dataset, card and histogram.

    ``write_only`` labels nothing: it writes the dataset from the rows labelled so far (a long run can be
    used before it ends, and resumed later)."""
    missing = [path for path in config.inputs if not pathlib.Path(path).exists()]
    if missing and not write_only:  # before the model loads
        raise FileNotFoundError(f"no such prompt file or folder: {', '.join(missing)}")
    with gen.output_lock(config.output_dir):
        return _label_and_save(config, echo=echo, engine=engine, write_only=write_only)


def _label_and_save(config: gen.GenerateConfig, *, echo: Callable[[str], None], engine, write_only: bool) -> dict:
    if engine is None:
        from serve.engine.llm import EngineConfig, LLMEngine

        engine = LLMEngine(EngineConfig(model=config.model, device=config.device, max_num_seqs=config.max_num_seqs,
                                        kv_cache_tokens=config.max_num_seqs * 1024))
    plan = gen.plan(config, engine)
    for skipped in plan.skipped:
        echo(f"skipped {skipped}")
    if write_only:
        echo(f"{plan.num_done} prompts labelled ({len(plan.todo)} not yet, {len(plan.skipped)} skipped); labelling none")
        plan.todo = []
    else:
        echo(f"{plan.num_done} prompts already labelled, {len(plan.todo)} to go ({len(plan.skipped)} skipped)")
    run = start_run(project=config.wandb_project, job_type="generate", config=dataclasses.asdict(config),
                    mode=config.wandb_mode)
    with finishing(run):
        bar = tqdm(total=plan.num_done + len(plan.todo), initial=plan.num_done, unit="prompt", desc="generate")
        start, tokens = time.perf_counter(), 0

        def on_row(row: dict) -> None:
            nonlocal tokens
            tokens += sum(row["sample_output_tokens"])
            # Count tokens as they are generated where the engine says (rows finish late, in bursts).
            live = getattr(engine, "num_generated_tokens", tokens)
            bar.update(1)
            bar.set_postfix(tok_s=f"{live / (time.perf_counter() - start):.1f}")

        try:
            rows = gen.run(config, engine, plan.todo, on_row)
        finally:
            bar.close()
        if not rows:  # a dataset of nothing: `s3 train` could not load it
            raise ValueError(f"nothing is labelled in {config.output_dir}: no prompt to label"
                             + (" (--write-only labels none)" if write_only else ""))
        recipe = json.loads((pathlib.Path(config.output_dir) / "recipe.json").read_text())
        stats = write_dataset(rows, plan.skipped, recipe, config.output_dir,
                              read_sources={source_name(path) for path in config.inputs})
        echo(f"{stats['num_rows']} labelled prompts in {config.output_dir} "
             f"(mean {stats['mean_output_tokens']:.1f} output tokens, {stats['num_capped']} hit the cap)")
        over = over_limit(config, stats["by_source"])
        if over:
            echo(f"note: {over} hold more labelled prompts than limit_per_source {config.limit_per_source}: a run with "
                 "another limit drew another sample (a larger limit is not a superset of a smaller one's), and the "
                 "prompts labelled before are kept")
        if run is not None:
            import wandb

            lengths = [[r["num_output_tokens"]] for r in rows]
            run.log({"output_tokens": wandb.Histogram([r["num_output_tokens"] for r in rows]),
                     "lengths": wandb.Table(data=lengths, columns=["num_output_tokens"])})
            run.summary.update(stats | {"by_source": json.dumps(stats["by_source"])})
    return stats


def over_limit(config: gen.GenerateConfig, by_source: dict[str, int]) -> str:
    """The input sources holding more labelled rows than ``limit_per_source``, with their counts ("" if none)."""
    if config.limit_per_source is None:
        return ""
    inputs = {source_name(path) for path in config.inputs}
    return ", ".join(f"{source} ({count})" for source, count in by_source.items()
                     if source in inputs and count > config.limit_per_source)


def feedback_records(directory: str) -> tuple[list[dict], str]:
    """The feedback store's usable records that carry a prompt (what retraining can train on), and a line on what
    was left out ("" if nothing): lines the reader could not use, records without a prompt."""
    import collections

    from serve.feedback import read_feedback

    skipped: collections.Counter = collections.Counter()
    usable = list(read_feedback(directory, skipped=skipped))
    records = [r for r in usable if r.get("prompt")]
    if not records:
        raise ValueError(f"the feedback store {directory} holds no records with a prompt")
    left = [f"{n} {kind.replace('_', ' ')} lines" for kind, n in sorted(skipped.items())]
    if len(usable) > len(records):
        left.append(f"{len(usable) - len(records)} records without a prompt")
    return records, f"left out of {directory}: {', '.join(left)}" if left else ""


def store_provenance(records: list[dict], previous) -> str:
    """A warning ("" if none) when records were written while serving checkpoints other than ``previous`` (the one
    retrained from) and its parent: a store shared by servers of another model or other buckets mixes their
    lengths in, and nothing in a record says which model wrote it."""
    import collections

    known = {previous.checkpoint_id, previous.parent_checkpoint_id}
    others = collections.Counter(r.get("checkpoint_id") for r in records if r.get("checkpoint_id") not in known)
    if not others:
        return ""
    named = ", ".join(f"{name} ({n})" for name, n in others.most_common(5))
    return (f"warning: {sum(others.values())} of the {len(records)} records were written while serving other "
            f"checkpoints than {previous.checkpoint_id} and its parent: {named}; if those served another model or "
            "other buckets, retrain on a store of this model's records (each server's --set feedback_dir)")


def feedback_dataset(records: list[dict]):
    """Feedback records as a `datasets` Dataset with the labelled data's columns, whether each record was
    ``sampled`` among the well-predicted requests, and its ``traffic_weight`` (how many served requests it stands
    for; 0 when its server sampled nothing)."""
    import datasets

    from serve.feedback import traffic_weight

    columns = ("prompt", "source", "num_prompt_tokens", "num_output_tokens", "finished")
    return datasets.Dataset.from_dict({**{c: [r[c] for r in records] for c in columns},
                                       "sampled": [bool(r.get("sampled")) for r in records],
                                       "traffic_weight": [traffic_weight(r) for r in records]})


def store_directions(records: list[dict]) -> str:
    """One line on which way the records missed: a store of under-predictions alone teaches only "longer"."""
    from serve.feedback import summarize

    summary = summarize(records)
    line = (f"the store's records: {summary['under_predicted']} under-predicted, {summary['over_predicted']} "
            f"over-predicted, {summary['exact']} in their predicted bucket ({summary['num_sampled']} of them sampled "
            "well-predicted requests)")
    if summary["under_predicted"] and not summary["over_predicted"]:
        line += (" (no over-predictions: servers before 2026-12-06 recorded only answers that outran their bucket, "
                 "and a round on those alone learns only that answers are longer; see docs/predictor.md)")
    return line


# What of an `s3 generate` recipe a checkpoint keeps: the lengths depend on it, and serving samples with it.
DECODING_KEYS = ("max_new_tokens", "temperature", "top_p", "presence_penalty", "frequency_penalty", "chat_template")


def train_and_evaluate(config, *, data: str, target_model: str | None = None, feedback: str | None = None,
              previous: str | None = None, echo: Callable[[str], None] = print) -> dict:
    """`s3 train`: train (or retrain on feedback from ``previous``), then evaluate on the test split.

    Returns the checkpoint folder and id, the test-split metrics, and (retraining) the before/after report."""
    from predictor_train.checkpoint import read_info
    from predictor_train.retrain import retrain_predictor
    from predictor_train.train import train_predictor

    dataset, recipe = labelled_data(data)
    if previous and not feedback:
        raise ValueError("--from CHECKPOINT retrains on feedback and needs --feedback FOLDER; to start training "
                         "from a checkpoint's weights, pass it as the backbone: --set backbone=CHECKPOINT")
    if feedback:
        if not previous:
            raise ValueError("--feedback needs --from CHECKPOINT: retraining starts from the previous predictor")
        records, left_out = feedback_records(feedback)  # read once: trained on, and described below
        report = retrain_predictor(config, dataset, feedback_dataset(records), previous_checkpoint=previous)
        lines = [f"retrained {report.parent_checkpoint_id} -> {report.result.info.checkpoint_id} with "
                 f"{report.num_feedback_used} feedback records ({report.num_feedback_held_out} more held out to "
                 f"measure on, {report.num_feedback_dropped} left out: their prompt is in the validation or test split, "
                 f"{report.num_feedback_cut} cut by a client's lower max_tokens or stop string)"
                 + (" and replayed rows in their place (replay_only, the control)" if config.replay_only else ""),
                 store_directions(records), report.verdict(), report.table()]
        lines[1:1] = [line for line in (left_out, store_provenance(records, read_info(previous))) if line]
        checkpoint, summary = report.result.checkpoint_dir, {"retrain": report}
    else:
        target = target_model or recipe.get("model")
        if not target:
            raise ValueError(f"{data} has no recipe.json naming the target model; pass --target-model")
        check_label_cap(recipe, config.max_tokens, data)
        decoding = {k: recipe[k] for k in DECODING_KEYS if k in recipe}
        result = train_predictor(config, dataset, target_model=target, decoding=decoding)
        checkpoint, summary = result.checkpoint_dir, {"history": result.history}
        lines = [f"best epoch {result.best_epoch}; checkpoint {result.info.checkpoint_id} in {checkpoint}"]
    if _rank() > 0:  # under the deepspeed launcher rank 0 alone evaluates, reports and writes the figures
        return summary | {"checkpoint": pathlib.Path(checkpoint)}
    for line in lines:
        echo(line)
    from predictor_train.evaluate import evaluate_checkpoint

    # the whole test split (the sources it was kept from too), baselines fitted on the rows it trained on
    evaluation = evaluate_checkpoint(checkpoint, dataset, out_dir=checkpoint)
    echo("test split:\n" + evaluation.table)
    echo(f"confusion matrix: {evaluation.confusion_png}")
    from predictor_train.checkpoint import read_info

    return summary | {"checkpoint": pathlib.Path(checkpoint), "checkpoint_id": read_info(checkpoint).checkpoint_id,
                      "test_metrics": evaluation.metrics}


def check_label_cap(recipe: dict, max_tokens: int, data: str) -> None:
    """The buckets must span the lengths the labels were capped at (the recipe's ``max_new_tokens``): longer
    buckets are never reached, shorter ones lump every longer answer into the last, and the server, whose
    ``max_new_tokens`` the buckets must equal, would cut answers the labels let run."""
    cap = recipe.get("max_new_tokens")
    if cap is not None and cap != max_tokens:
        raise ValueError(f"{data} was labelled with max_new_tokens={cap} but the predictor's buckets span "
                         f"max_tokens={max_tokens}; set max_tokens={cap} (--set max_tokens={cap})")


def _rank() -> int:
    from predictor_train.distributed import rank_and_world_size

    return rank_and_world_size()[0]
