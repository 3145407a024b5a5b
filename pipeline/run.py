"""`s3 pipeline run`: generate -> train -> collect (serve, mispredictions) -> retrain -> bench, in one folder.

Each stage reads the previous stages' outputs from `runs/<run-id>/<stage>/` and writes a `stage.json` with a
hash of its inputs (its config section and its upstream outputs). A stage whose `stage.json` is there with
the same input hash is skipped; otherwise it runs again (generate resumes where it stopped). Every stage is
one wandb run in the pipeline's group; the summary table goes to wandb and to the terminal.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import random
import time
from typing import Callable

from pipeline.generate import GenerateConfig
from predictor_train.train import TrainConfig

STAGES = ("generate", "train", "collect", "retrain", "bench")


@dataclasses.dataclass(frozen=True)
class ServeRoundConfig:
    """The offline serving rounds (collect, then bench after retraining) on the same fresh prompts."""

    inputs: tuple[str, ...] = ("data/prompts/gsm8k_train.json", "data/prompts/gpteacher_toolformer.json",
                               "data/prompts/gpteacher_roleplay.json")  # fmt: skip
    """Prompt files to draw serving traffic from (prompts already in the labelled data are left out)."""
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
    """offline (default unless WANDB_MODE is set), online or disabled."""


def _hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Pipeline:
    """Runs the stages in order, skipping those whose inputs are unchanged since they last finished."""

    def __init__(self, config: PipelineConfig, echo: Callable[[str], None] = print) -> None:
        self.config = config
        self.root = pathlib.Path(config.runs_dir) / config.run_id
        self.echo = echo
        self.outputs: dict[str, dict] = {}

    def stage_dir(self, stage: str) -> pathlib.Path:
        return self.root / stage

    def _inputs(self, stage: str) -> dict:
        sections = {"generate": ["labelled_data", "regenerate", "generate"], "train": ["train"],
                    "collect": ["serve"], "retrain": ["train", "retrain_epochs"], "bench": ["serve"]}  # fmt: skip
        config = dataclasses.asdict(self.config)
        upstream = {s: self.outputs.get(s, {}).get("fingerprint") for s in STAGES[: STAGES.index(stage)]}
        return {"config": {k: config[k] for k in sections[stage]}, "upstream": upstream}

    def run(self, *, start: str | None = None, only: str | None = None) -> dict:
        for name in (start, only):
            if name is not None and name not in STAGES:
                raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
        first = STAGES.index(only or start or STAGES[0])
        for index, stage in enumerate(STAGES):
            record = self.stage_dir(stage) / "stage.json"
            inputs_hash = _hash(self._inputs(stage))
            previous = json.loads(record.read_text()) if record.exists() else None
            forced = index >= first and (only is None or stage == only)
            if previous and previous["inputs_hash"] == inputs_hash and not (forced and (start or only)):
                self.echo(f"[{stage}] up to date, skipped")
                self.outputs[stage] = previous["outputs"]
                continue
            if not forced:
                if previous is None:
                    raise ValueError(f"stage {stage} has not run yet in {self.root}; run without --only/--from")
                self.outputs[stage] = previous["outputs"]  # kept as asked, though its inputs changed
                continue
            self.echo(f"[{stage}] running")
            started = time.perf_counter()
            outputs = self._run_stage(stage)
            outputs["seconds"] = round(time.perf_counter() - started, 1)
            self.outputs[stage] = outputs
            self.stage_dir(stage).mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"inputs_hash": inputs_hash, "outputs": outputs}, indent=2, default=str))
        return self.outputs

    def _run_stage(self, stage: str) -> dict:
        """Run one stage, then record it as one wandb run of the pipeline's group.

        The stage's own code runs with its tracking off, so that each stage is exactly one wandb run."""
        from pipeline import stage_impl

        outputs = getattr(stage_impl, f"run_{stage}")(self)
        run = stage_impl.start_stage_run(self, stage)
        if run is not None:
            stage_impl.log_stage(run, stage, outputs)
            run.finish()
        return outputs


def serving_prompts(config: ServeRoundConfig, exclude: set[str]) -> list[str]:
    """A seeded sample of prompts not in the labelled data, round-robin over the input files."""
    from pipeline.prompts import read_prompt_sets

    rows, _ = read_prompt_sets(list(config.inputs), prompt_field="instruction", input_field="input")
    by_source: dict[str, list[str]] = {}
    for row in rows:
        if row.prompt not in exclude:
            by_source.setdefault(row.source, []).append(row.prompt)
    rng = random.Random(config.seed)
    for prompts in by_source.values():
        rng.shuffle(prompts)
    sources = sorted(by_source)
    return [by_source[sources[i % len(sources)]][i // len(sources)] for i in range(config.num_prompts)]
