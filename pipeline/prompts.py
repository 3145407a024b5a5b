"""Prompts: reading prompt sets, the chat formatting every stage uses, and sampling serving prompts.

The lowest module of the pipeline (it imports nothing of the project but core/): `s3 generate`, `s3 bench` and the
pipeline's serving rounds all read, format and draw prompts here, so the three cannot drift apart.

Reading: JSON, JSONL, CSV, Parquet or a `datasets` folder (a dataset or a dataset dict, its splits in turn), with
configurable field names; a UTF-8 byte-order mark is allowed. Bad input never stops a run: a missing file, a file
without the prompt field, an unreadable row, a prompt that is not text (a number, a list, a chat's messages) or not
valid Unicode (a lone surrogate), or an empty prompt becomes a `Skipped` entry naming the file and row, and the rest
goes on.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
import random
import sys
from typing import Callable, Collection, Iterator

from core.records import utf8_encodable

PROMPT_SETS = (
    "data/prompts/gsm8k_train.json",
    "data/prompts/gpteacher_toolformer.json",
    "data/prompts/gpteacher_roleplay.json",
    "data/prompts/chat_bench_mix.json",
    "data/prompts/awesome_chatgpt_prompts.json",
    "data/prompts/nq_open.json",
    "data/prompts/hh_rlhf_harmless_test.json",
)
"""The seven prompt sets in data/prompts (data/README.md): what `s3 generate` labels by default and what
`s3 bench` and the pipeline's serving rounds draw from (less the labelled prompts)."""


@dataclasses.dataclass(frozen=True)
class PromptRow:
    source: str
    """The file's stem (e.g. `gsm8k_train`)."""
    row: int
    """0-based row index in its file."""
    prompt: str

    @property
    def id(self) -> str:
        return f"{self.source}:{self.row}"


@dataclasses.dataclass(frozen=True)
class Skipped:
    path: str
    row: int | None
    """0-based row, or None when the whole file was skipped."""
    reason: str

    def __str__(self) -> str:
        where = self.path if self.row is None else f"{self.path}, row {self.row}"
        return f"{where}: {self.reason}"


def _records(path: pathlib.Path) -> Iterator[tuple[int, dict | Exception]]:
    """(row, record) pairs; a row that cannot be parsed comes as (row, exception)."""
    if path.is_dir():
        import datasets

        data = datasets.load_from_disk(str(path))
        splits = [data[name] for name in data] if isinstance(data, datasets.DatasetDict) else [data]
        yield from enumerate(record for split in splits for record in split)
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8-sig") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield i, exc
    elif path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8-sig"))
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError("a .json prompt file must hold a list of objects (or {'data': [...]})")
        yield from enumerate(data)
    elif path.suffix == ".csv":
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # a long prompt is skipped later, by its tokens
        with path.open(newline="", encoding="utf-8-sig") as f:
            yield from enumerate(csv.DictReader(f))
    elif path.suffix == ".parquet":
        import datasets

        yield from enumerate(datasets.Dataset.from_parquet(str(path)))
    else:
        raise ValueError(f"unsupported prompt file type {path.suffix!r} (use .json, .jsonl, .csv, .parquet or a folder)")


def source_name(path: str | pathlib.Path) -> str:
    """The source a file's prompts are labelled with: its stem (a folder: its name); ids are `source:row`."""
    path = pathlib.Path(path)
    return path.name if path.is_dir() else path.stem


def check_distinct_sources(paths: Collection[str]) -> None:
    """Refuse input files that share a source name: their rows would share ids, and one would replace the other."""
    seen: dict[str, str] = {}
    for path in paths:
        first = seen.setdefault(source_name(path), str(path))
        if pathlib.Path(first).resolve() != pathlib.Path(path).resolve():
            raise ValueError(f"{first} and {path} would both be source {source_name(path)!r} (a prompt's id is "
                             "its file's stem and row): give one of them another file name")


def read_prompts(
    path: str | pathlib.Path, *, prompt_field: str = "instruction", input_field: str | None = "input"
) -> tuple[list[PromptRow], list[Skipped]]:
    """Prompts of one file: ``prompt_field`` plus, when present and non-empty, a blank line and ``input_field``
    (the same field named twice is read once)."""
    path = pathlib.Path(path)
    if not path.exists():
        return [], [Skipped(str(path), None, "file does not exist")]
    input_field = None if input_field == prompt_field else input_field
    rows: list[PromptRow] = []
    skipped: list[Skipped] = []
    fields: object = None  # what a record without the prompt field had, for the message
    try:
        for i, record in _records(path):
            if isinstance(record, Exception):
                skipped.append(Skipped(str(path), i, f"unreadable row ({record})"))
                continue
            if not isinstance(record, dict) or prompt_field not in record:
                fields = fields or (sorted(record) if isinstance(record, dict) else type(record).__name__)
                skipped.append(Skipped(str(path), i, f"no field {prompt_field!r}"))
                continue
            text, extra = record[prompt_field], record.get(input_field) if input_field else None
            wrong = next((v for v in (text, extra) if v is not None and not isinstance(v, str)), None)
            if wrong is not None:
                skipped.append(Skipped(str(path), i, f"not text: a {type(wrong).__name__}"))
                continue
            text, extra = (text or "").strip(), (extra or "").strip()
            if extra:
                text = f"{text}\n\n{extra}" if text else extra
            if not text:
                skipped.append(Skipped(str(path), i, "empty prompt"))
                continue
            if not utf8_encodable(text):
                skipped.append(Skipped(str(path), i, "not valid Unicode (a lone surrogate)"))
                continue
            rows.append(PromptRow(source_name(path), i, text))
    except (OSError, ValueError, csv.Error) as exc:
        return rows, [*skipped, Skipped(str(path), None, f"cannot read: {exc}")]
    if not rows and fields is not None and all(s.reason == f"no field {prompt_field!r}" for s in skipped):
        return [], [Skipped(str(path), None, f"no field {prompt_field!r} (it has {fields})")]  # said once
    if not rows and not skipped:
        return [], [Skipped(str(path), None, "no prompts in it")]
    return rows, skipped


def read_prompt_sets(
    paths: list[str], *, prompt_field: str, input_field: str | None, limit_per_source: int | None = None, seed: int = 0
) -> tuple[list[PromptRow], list[Skipped]]:
    """All prompts of several files; ``limit_per_source`` takes a seeded random subset of each file."""
    rows: list[PromptRow] = []
    skipped: list[Skipped] = []
    seen: set[pathlib.Path] = set()
    for path in paths:
        if pathlib.Path(path).resolve() in seen:
            continue  # the same file named twice is read once
        seen.add(pathlib.Path(path).resolve())
        file_rows, file_skipped = read_prompts(path, prompt_field=prompt_field, input_field=input_field)
        if limit_per_source is not None and len(file_rows) > limit_per_source:
            file_rows = sorted(random.Random(seed).sample(file_rows, limit_per_source), key=lambda r: r.row)
        rows += file_rows
        skipped += file_skipped
    return rows, skipped


def format_prompt(tokenizer, prompt: str) -> list[int]:
    """The tokenizer's chat template, the prompt as one user message, with the generation prompt.

    How `s3 generate` made the labels, so serving and benchmarks format prompts the same way."""
    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def sample_prompts(
    paths: list[str] | tuple[str, ...], num_prompts: int, *, exclude: Collection[str] = (), seed: int = 0,
    prompt_field: str = "instruction", input_field: str | None = "input",
    accept: Callable[[PromptRow], bool] | None = None,
) -> list[PromptRow]:
    """``num_prompts`` distinct prompts drawn without replacement, none of them in ``exclude``, each passing
    ``accept`` when given (e.g. fits the model's context).

    Round-robin over the files (sorted by name), each file in a seeded random order; a file that runs out
    leaves the rotation. A prompt text that occurs twice (in one file or two) is drawn at most once. Asking
    for more prompts than there are is an error that says how many there are."""
    rows, _ = read_prompt_sets(list(paths), prompt_field=prompt_field, input_field=input_field)
    seen = set(exclude)
    by_source: dict[str, list[PromptRow]] = {}
    for row in rows:
        if row.prompt not in seen:
            seen.add(row.prompt)
            by_source.setdefault(row.source, []).append(row)
    rng = random.Random(seed)
    for queue in by_source.values():
        rng.shuffle(queue)
    available = sum(map(len, by_source.values()))
    if num_prompts > available:
        raise ValueError(f"asked for {num_prompts} prompts but {', '.join(paths)} hold only {available} that are "
                         f"not excluded (labelled or repeated); lower num_prompts or add prompt files")
    queues = [by_source[source] for source in sorted(by_source)]
    picked: list[PromptRow] = []
    for i in range(max(map(len, queues), default=0)):
        for queue in queues:
            if i < len(queue) and len(picked) < num_prompts and (accept is None or accept(queue[i])):
                picked.append(queue[i])
    if len(picked) < num_prompts:
        raise ValueError(f"asked for {num_prompts} prompts but only {len(picked)} of those not excluded are "
                         "accepted (fit the context); lower num_prompts")
    return picked
