"""Stage runners: build what a stage needs from its config, run it with a progress bar, record it."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Callable

from tqdm import tqdm

from pipeline import generate as gen
from pipeline.labelled import write_dataset
from pipeline.tracking import start_run


def run_generate(config: gen.GenerateConfig, *, echo: Callable[[str], None] = print, engine=None) -> dict:
    """`s3 generate`: label what is not labelled yet, then write the dataset, card and histogram."""
    if engine is None:
        from serve.engine.llm import EngineConfig, LLMEngine

        engine = LLMEngine(EngineConfig(model=config.model, max_num_seqs=config.max_num_seqs,
                                        kv_cache_tokens=config.max_num_seqs * 1024))
    plan = gen.plan(config, engine)
    for skipped in plan.skipped:
        echo(f"skipped {skipped}")
    echo(f"{plan.num_done} prompts already labelled, {len(plan.todo)} to go ({len(plan.skipped)} skipped)")
    run = start_run(project=config.wandb_project, job_type="generate", config=dataclasses.asdict(config),
                    mode=config.wandb_mode)
    bar = tqdm(total=plan.num_done + len(plan.todo), initial=plan.num_done, unit="prompt", desc="generate")
    start, tokens = time.perf_counter(), 0

    def on_row(row: dict) -> None:
        nonlocal tokens
        tokens += sum(row["sample_output_tokens"])
        bar.update(1)
        bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.1f}")

    try:
        rows = gen.run(config, engine, plan.todo, on_row)
    finally:
        bar.close()
    recipe = json.loads((pathlib.Path(config.output_dir) / "recipe.json").read_text())
    stats = write_dataset(rows, plan.skipped, recipe, config.output_dir)
    echo(f"{stats['num_rows']} labelled prompts in {config.output_dir} "
         f"(mean {stats['mean_output_tokens']:.1f} output tokens, {stats['num_capped']} hit the cap)")
    if run is not None:
        import wandb

        lengths = [[r["num_output_tokens"]] for r in rows]
        run.log({"output_tokens": wandb.Histogram([r["num_output_tokens"] for r in rows]),
                 "lengths": wandb.Table(data=lengths, columns=["num_output_tokens"])})
        run.summary.update(stats | {"by_source": json.dumps(stats["by_source"])})
        run.finish()
    return stats
