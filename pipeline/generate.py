"""Stage `generate`: run the target model over prompt sets and record each prompt's real output length.

Resumable: every finished prompt is appended at once to a JSON-lines shard under `<output>/shards/`;
a restarted run reads the shards, skips the prompts already done and goes on, so nothing is lost or
written twice. When every prompt is done, the shards become a `datasets` dataset (saved to disk and as
Parquet) with a dataset card and a length histogram.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
from typing import Any, Callable, Iterator, Protocol

from core.files import exclusive
from pipeline.prompts import PROMPT_SETS, PromptRow, Skipped, check_distinct_sources, format_prompt, read_prompt_sets

DEFAULT_INPUTS = PROMPT_SETS
"""`s3 generate`'s default inputs: the seven prompt sets."""


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """Settings of `s3 generate` (the decoding settings are recorded with the data: lengths depend on them)."""

    inputs: tuple[str, ...] = DEFAULT_INPUTS
    """Prompt files: .json, .jsonl, .csv, .parquet, or a `datasets` folder; no two with the same stem (a row's id
    is its file's stem and row)."""
    prompt_field: str = "instruction"
    """Field holding the prompt."""
    input_field: str | None = "input"
    """Optional field appended to the prompt after a blank line when non-empty (instruction/input sets)."""
    limit_per_source: int | None = None
    """Label only a seeded random subset of this many prompts per file. A larger limit later draws a new sample,
    not a superset of the old one; the prompts already labelled are kept, so a source can end above the limit."""
    model: str = "smollm2"
    """`smollm2` (the packaged SmolLM2-135M-Instruct GGUF) or a local Hugging Face causal-LM folder."""
    max_new_tokens: int = 512
    """Cap on generated tokens; outputs that reach it are recorded with finished=False."""
    temperature: float = 0.0
    """0 is greedy decoding."""
    top_p: float = 1.0
    presence_penalty: float = 0.0
    """OpenAI's presence penalty (in [-2, 2]); applies to greedy decoding too."""
    frequency_penalty: float = 0.5
    """OpenAI's frequency penalty (in [-2, 2]). SmolLM2-135M decoding greedily with none loops until the cap on 46%
    of the prompts (90% of the role-play ones); 0.5 ends all but a few. Serve with the same (the predictor's
    checkpoint records it, and the pipeline and load benchmark use it)."""
    num_samples: int = 1
    """Samples per prompt (with temperature > 0); each length is kept and num_output_tokens is their max."""
    seed: int = 0
    keep_text: bool = True
    """Store the generated text with each row."""
    max_num_seqs: int = 64
    """Sequences decoded together."""
    device: str = "cpu"
    """cpu (fp32) or cuda (bf16). Greedy lengths can differ a little between the two: label a folder on one."""
    output_dir: str = "data/labelled"
    wandb_project: str = "s3-serve"
    wandb_mode: str | None = None
    """offline (the default), online or disabled; the WANDB_MODE environment variable wins (core/tracking.py)."""

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.max_new_tokens < 1:
            raise ValueError("num_samples and max_new_tokens must be >= 1")
        if self.limit_per_source is not None and self.limit_per_source < 1:
            raise ValueError(f"limit_per_source must be >= 1 (or unset), got {self.limit_per_source}")
        if self.num_samples > 1 and self.temperature == 0:
            raise ValueError("num_samples > 1 needs temperature > 0 (greedy samples would all be the same)")
        check_distinct_sources(self.inputs)
        from serve.engine.plan import SamplingParams  # the engine's own checks, before the model loads

        SamplingParams(temperature=self.temperature, top_p=self.top_p, presence_penalty=self.presence_penalty,
                       frequency_penalty=self.frequency_penalty)


@dataclasses.dataclass
class Completion:
    """One finished generation, as an engine reports it."""

    request_id: str
    output_token_ids: list[int]
    finish_reason: str
    """stop (the model ended it) or length (max_new_tokens)."""


class Engine(Protocol):
    """What this stage needs of an engine (serve.engine.llm.LLMEngine provides it)."""

    tokenizer: Any
    model_id: str
    max_model_len: int
    kv_capacity_tokens: int

    def generate_ids(
        self, prompts: dict[str, list[int]], *, max_new_tokens: int, temperature: float, top_p: float, seed: int,
        presence_penalty: float, frequency_penalty: float,
    ) -> Iterator[Completion]: ...


def recipe(config: GenerateConfig, engine: Engine) -> dict:
    """What the lengths depend on; a resumed run must match it exactly."""
    return {
        "model": engine.model_id,
        "chat_template": getattr(engine.tokenizer, "chat_template", None),
        "add_generation_prompt": True,
        "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "presence_penalty": config.presence_penalty,
        "frequency_penalty": config.frequency_penalty,
        "num_samples": config.num_samples,
        "seed": config.seed,
        "prompt_field": config.prompt_field,
        "input_field": config.input_field,
        "device": config.device,  # cpu runs fp32, cuda bf16: greedy lengths differ a little
    }


class ShardWriter:
    """Append-only JSON lines, flushed per row and fsync'd every `sync_every` rows."""

    def __init__(self, directory: pathlib.Path, sync_every: int = 16) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        taken = [int(p.stem.removeprefix("part-")) for p in directory.glob("part-*.jsonl")
                 if p.stem.removeprefix("part-").isdigit()]
        # A new shard after the last (never one left behind with a torn line, whatever was deleted in between).
        self.path = directory / f"part-{max(taken, default=-1) + 1:05d}.jsonl"
        self._file = self.path.open("x", encoding="utf-8")
        self._pending = 0
        self.sync_every = sync_every

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()
        self._pending += 1
        if self._pending >= self.sync_every:
            self.sync()

    def sync(self) -> None:
        os.fsync(self._file.fileno())
        self._pending = 0

    def close(self) -> None:
        self.sync()
        self._file.close()


# A shard row's fields and their types (``output_text`` may be None: `keep_text` off).
_ROW_TYPES = {"id": str, "prompt": str, "source": str, "row": int, "num_prompt_tokens": int,
              "num_output_tokens": int, "finished": bool, "sample_output_tokens": list}


LOCK_FILE = ".generate.lock"


def output_lock(output_dir: str | pathlib.Path) -> contextlib.AbstractContextManager:
    """Held while a run labels into and writes ``output_dir``: a second run there at the same time is refused
    (both would label the same prompts, and write the dataset over each other)."""
    out = pathlib.Path(output_dir)
    return exclusive(out / LOCK_FILE, f"another `s3 generate` is writing {out} (it holds {out / LOCK_FILE}); wait "
                                      "for it to end or use another --output-dir")


def read_shards(directory: pathlib.Path, max_new_tokens: int | None = None) -> dict[str, dict]:
    """Rows of every shard by id (a later shard's row for an id replaces an earlier one). A shard's last line
    may be torn (a crash mid-write, cut anywhere, inside a character too): it is ignored and redone. Any other
    line that is not a valid row (`_checked_row`; lengths above ``max_new_tokens`` where given) is an error
    naming the shard and line, not a row dropped or trained on. Lines end at "\n" only: a prompt may hold U+2028
    or another character `str.splitlines` would also break at."""
    rows: dict[str, dict] = {}
    for path in sorted(directory.glob("part-*.jsonl")):
        *lines, last = path.read_bytes().split(b"\n")
        for number, line in enumerate(lines, 1):
            try:
                row = _checked_row(line, max_new_tokens)
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: {exc}; fix or delete the line (it is labelled again)") from None
            rows[row["id"]] = row
        try:  # written whole but for its newline
            row = _checked_row(last, max_new_tokens)
            rows[row["id"]] = row
        except ValueError:
            pass
    return rows


def _checked_row(line: bytes, max_new_tokens: int | None) -> dict:
    """One shard line as a row, or a ValueError saying what is wrong with it."""
    row = json.loads(line.decode("utf-8"))  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    wrong = [k for k, kind in _ROW_TYPES.items()
             if not isinstance(row.get(k), kind) or (kind is int and isinstance(row[k], bool))]
    if wrong:
        kinds = ", ".join(_ROW_TYPES[k].__name__ for k in wrong)
        raise ValueError(f"{', '.join(wrong)} missing or not of type {kinds}")
    if row["id"] != f"{row['source']}:{row['row']}":
        raise ValueError(f"id {row['id']!r} is not its source and row ({row['source']}:{row['row']})")
    cap = max_new_tokens if max_new_tokens is not None else float("inf")
    lengths = [row["num_output_tokens"], *row["sample_output_tokens"]]
    if not all(isinstance(n, int) and 0 <= n <= cap for n in lengths) or row["num_prompt_tokens"] < 1:
        raise ValueError(f"lengths out of range (output {lengths}, max_new_tokens {max_new_tokens}; prompt "
                         f"{row['num_prompt_tokens']})")
    return row


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@dataclasses.dataclass
class LabelPlan:
    """What a (resumed) run still has to do."""

    todo: list[tuple[PromptRow, list[int]]]
    """Prompts not yet labelled, with their chat-formatted token ids."""
    num_done: int
    """Prompts already in the shards from an earlier run."""
    skipped: list[Skipped]


def plan(config: GenerateConfig, engine: Engine) -> LabelPlan:
    """Read the inputs, drop what is done or cannot run, and check the recipe of an earlier run."""
    out = pathlib.Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_recipe(out / "recipe.json", recipe(config, engine))
    prompts, skipped = read_prompt_sets(
        list(config.inputs), prompt_field=config.prompt_field, input_field=config.input_field,
        limit_per_source=config.limit_per_source, seed=config.seed,
    )
    done = read_shards(out / "shards", config.max_new_tokens)
    changed = [row.id for row in prompts if row.id in done and done[row.id]["prompt"] != row.prompt]
    if changed:  # ids are file stem and row: an edited file would label some prompts twice and others never
        raise ValueError(f"{len(changed)} labelled rows of {out} hold other prompts than the input files now "
                         f"({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}): the files changed since "
                         "they were labelled; label them into another --output-dir")
    todo = []
    for row in prompts:
        if row.id in done:
            continue
        ids = format_prompt(engine.tokenizer, row.prompt)
        if len(ids) + config.max_new_tokens > engine.max_model_len:
            reason = f"prompt of {len(ids)} tokens + {config.max_new_tokens} new exceeds the {engine.max_model_len}-token context"
            skipped.append(Skipped(row.source, row.row, reason))
            continue
        if len(ids) + config.max_new_tokens > engine.kv_capacity_tokens:  # the pool: max_num_seqs x 1,024 tokens
            reason = (f"prompt of {len(ids)} tokens + {config.max_new_tokens} new exceeds the KV pool's "
                      f"{engine.kv_capacity_tokens} tokens (raise max_num_seqs)")
            skipped.append(Skipped(row.source, row.row, reason))
            continue
        todo.append((row, ids))
    return LabelPlan(_interleave(todo), len(done), skipped)


def _interleave(todo: list[tuple[PromptRow, list[int]]]) -> list[tuple[PromptRow, list[int]]]:
    """Round-robin over sources, so that an interrupted run has labelled every source alike."""
    by_source: dict[str, list] = {}
    for item in todo:
        by_source.setdefault(item[0].source, []).append(item)
    queues = list(by_source.values())
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


def run(config: GenerateConfig, engine: Engine, todo: list, on_row: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """Label ``todo``, appending each row to a new shard as it finishes; returns every row of every shard. The
    recipe is written with the first row: a run stopped (or failing) before it binds the folder to nothing."""
    shards = pathlib.Path(config.output_dir) / "shards"
    if not todo:
        return _every_row(shards, config.max_new_tokens)  # no shard folder yet: none
    writer, unbound = ShardWriter(shards), True
    try:
        for chunk in _chunks(todo, 4 * config.max_num_seqs):
            for row in _label_chunk(config, engine, chunk):
                if unbound:
                    _write_recipe(pathlib.Path(config.output_dir) / "recipe.json", recipe(config, engine))
                    unbound = False
                writer.write(row)
                on_row(row)
    finally:
        writer.close()
    return _every_row(shards, config.max_new_tokens)


def _every_row(shards: pathlib.Path, max_new_tokens: int) -> list[dict]:
    """Every row of every shard, by source and row."""
    return sorted(read_shards(shards, max_new_tokens).values(), key=lambda r: (r["source"], r["row"]))


def _label_chunk(config: GenerateConfig, engine: Engine, chunk: list[tuple[PromptRow, list[int]]]) -> Iterator[dict]:
    """Generate every sample of a chunk of prompts; yield a row as soon as all of a prompt's samples are in."""
    by_id = {row.id: (row, ids) for row, ids in chunk}
    samples: dict[str, list[Completion]] = {rid: [] for rid in by_id}
    for k in range(config.num_samples):
        prompts = {f"{rid}#{k}": ids for rid, (_, ids) in by_id.items()}
        completions = engine.generate_ids(
            prompts, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
            top_p=config.top_p, seed=config.seed + k, presence_penalty=config.presence_penalty,
            frequency_penalty=config.frequency_penalty,
        )
        for completion in completions:
            rid = completion.request_id.rsplit("#", 1)[0]
            samples[rid].append(completion)
            if len(samples[rid]) == config.num_samples:
                yield _row(config, engine, *by_id[rid], samples.pop(rid))


def _row(config: GenerateConfig, engine: Engine, prompt: PromptRow, ids: list[int], done: list[Completion]) -> dict:
    lengths = [len(c.output_token_ids) for c in done]
    longest = done[lengths.index(max(lengths))]
    text = engine.tokenizer.decode(longest.output_token_ids, skip_special_tokens=True) if config.keep_text else None
    return {
        "id": prompt.id,
        "prompt": prompt.prompt,
        "source": prompt.source,
        "row": prompt.row,
        "num_prompt_tokens": len(ids),
        "num_output_tokens": max(lengths),
        "finished": longest.finish_reason == "stop",
        "sample_output_tokens": lengths,
        "output_text": text,
    }


# Recipe keys added after the first data was labelled, with the value an older recipe without them meant.
_LATER_RECIPE_KEYS = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "device": "cpu"}


def _check_recipe(path: pathlib.Path, current: dict) -> None:
    """Refuse to add to a folder labelled with another recipe. The recipe is written with the first row
    (`_write_recipe`), so a run that labelled nothing binds the folder to nothing."""
    if path.exists():
        previous = _LATER_RECIPE_KEYS | json.loads(path.read_text())
        changed = sorted(k for k in current if previous.get(k) != current[k])
        if changed:
            raise ValueError(
                f"{path.parent} holds lengths made with other settings ({', '.join(changed)} differ); "
                "use another --output-dir or delete the old one"
            )


def _write_recipe(path: pathlib.Path, current: dict) -> None:
    if not path.exists():
        path.write_text(json.dumps(current, indent=2))

