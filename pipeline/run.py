"""`s3 pipeline run`: generate -> train -> collect (serve, mispredictions) -> retrain -> bench, in one folder.

Each stage (pipeline/stages.py, the `STAGES` table) reads the previous stages' outputs and writes its own under
`runs/<run-id>/<stage>/`, with a `stage.json` holding a hash of its inputs (its config sections, its version, its
upstream stages' fingerprints, and the contents of the files it reads from outside the run folder). A stage whose
`stage.json` has the same input hash is skipped; otherwise it runs again (generate resumes where it stopped). A
stage's `stage.json` is removed when it starts and written when it finishes, so a stage that failed or was
interrupted runs again, whatever it ran with before. Every stage that runs is one wandb run in the pipeline's group
(the code it calls opens none of its own); the summary table goes to wandb and to the terminal.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import time
from typing import Callable

from pipeline.stages import (
    STAGES, PipelineConfig, ServeRoundConfig, Stage, StageContext, fingerprint, serving_prompts,
)  # fmt: skip
from core.tracking import finishing, start_run, tracking_off
from pipeline.tracking import log_stage

__all__ = ["STAGE_NAMES", "Pipeline", "PipelineConfig", "ServeRoundConfig", "serving_prompts"]
# PipelineConfig, ServeRoundConfig and serving_prompts are imported from here by the CLI and benchmarks/load.py.

STAGE_NAMES = tuple(stage.name for stage in STAGES)


def _hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Pipeline:
    """Runs the stages in order, skipping those whose inputs are unchanged since they last finished."""

    def __init__(self, config: PipelineConfig, echo: Callable[[str], None] = print) -> None:
        self.config = config
        self.root = pathlib.Path(config.runs_dir) / config.run_id
        self.echo = echo
        self.outputs: dict[str, dict] = {}
        self.stale: list[str] = []
        """Stages kept as --from/--only asked although their inputs changed since they ran."""

    def _inputs(self, stage: Stage) -> dict:
        config = dataclasses.asdict(self.config)
        upstream = {name: self.outputs.get(name, {}).get("fingerprint") for name in STAGE_NAMES[: STAGE_NAMES.index(stage.name)]}
        read = {k: config[k] for k in stage.config_keys}
        for dotted in stage.unread_keys:
            section, key = dotted.split(".")
            del read[section][key]
        inputs = {"config": read, "version": stage.version, "upstream": upstream}
        files = {path: fingerprint(pathlib.Path(path)) for path in stage.reads(self.config)}
        return inputs | ({"files": files} if files else {})

    def run(self, *, start: str | None = None, only: str | None = None) -> dict:
        for name in (start, only):
            if name is not None and name not in STAGE_NAMES:
                raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGE_NAMES)}")
        if start and only:
            raise ValueError("give --from (this stage and those after it) or --only (this stage alone), not both")
        first = STAGE_NAMES.index(only or start or STAGE_NAMES[0])
        last = STAGE_NAMES.index(only) if only else len(STAGES) - 1
        for index, stage in enumerate(STAGES[:last + 1]):
            record = self.root / stage.name / "stage.json"
            inputs_hash = _hash(self._inputs(stage))
            previous = _read_record(record)
            forced = index >= first and (only is None or stage.name == only)
            if previous and previous["inputs_hash"] == inputs_hash and not (forced and (start or only)):
                self.echo(f"[{stage.name}] up to date, skipped")
                self.outputs[stage.name] = previous["outputs"]
                continue
            if not forced:
                if previous is None:
                    raise ValueError(f"stage {stage.name} has not run yet in {self.root} (or its last run did not "
                                     "finish); run without --only/--from")
                self.echo(f"[{stage.name}] inputs changed since it ran; kept as asked (--from/--only)")
                self.outputs[stage.name] = previous["outputs"]
                self.stale.append(stage.name)
                continue
            self.echo(f"[{stage.name}] running")
            record.unlink(missing_ok=True)  # its outputs change from now on: an interrupted stage is never up to date
            started = time.perf_counter()
            outputs = self._run_stage(stage)
            outputs["seconds"] = round(time.perf_counter() - started, 1)
            self.outputs[stage.name] = outputs
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"inputs_hash": inputs_hash, "outputs": outputs}, indent=2, default=str))
        return self.outputs

    def _run_stage(self, stage: Stage) -> dict:
        """Run one stage, then record it as one wandb run of the pipeline's group. The code the stage calls
        (training, labelling) runs with tracking off, so that each stage is exactly one wandb run."""
        ctx = StageContext(config=self.config, stage_dir=self.root / stage.name, upstream=dict(self.outputs),
                           echo=self.echo)  # fmt: skip
        with tracking_off():
            outputs = stage.run(ctx)
        run = start_run(project=self.config.wandb_project, job_type=stage.name, group=self.config.run_id,
                        config=dataclasses.asdict(self.config), mode=self.config.wandb_mode)  # fmt: skip
        with finishing(run):
            if run is not None:
                log_stage(run, stage.name, outputs)
        return outputs


def _read_record(record: pathlib.Path) -> dict | None:
    """A stage's record of its last finished run; None if it has none. One that does not read as a record (cut
    short by a full disk while it was written) is none either: the stage runs again."""
    try:
        previous = json.loads(record.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return previous if isinstance(previous, dict) and {"inputs_hash", "outputs"} <= set(previous) else None
