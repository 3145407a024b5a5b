"""`s3 generate` on a fake engine: formats, bad input, resume, sampling mode, dataset card."""

import dataclasses
import json

import datasets
import pytest

from pipeline.generate import Completion, GenerateConfig, ShardWriter, read_shards
from pipeline.prompts import read_prompts
from pipeline.commands import label_and_save


class FakeTokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and tokenize and messages[0]["role"] == "user"
        return [1] + [ord(c) % 50 + 2 for c in messages[0]["content"]] + [1]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


class FakeEngine:
    """Output length is a function of the prompt (and the sample seed); can die after N completions."""

    model_id = "fake-model"
    max_model_len = 200
    kv_capacity_tokens = 10_000

    def __init__(self, die_after=None):
        self.tokenizer = FakeTokenizer()
        self.die_after = die_after
        self.seen = []

    def generate_ids(self, prompts, *, max_new_tokens, temperature, top_p, seed, **penalties):
        for rid, ids in prompts.items():
            if self.die_after is not None and len(self.seen) >= self.die_after:
                raise KeyboardInterrupt
            self.seen.append(rid)
            n = min(len(ids) % 13 + 1 + seed % 3, max_new_tokens)
            yield Completion(rid, list(range(n)), "length" if n == max_new_tokens else "stop")


def _row(source: str, row: int, **fields) -> dict:
    """A valid shard row."""
    return {"id": f"{source}:{row}", "prompt": f"prompt {row}", "source": source, "row": row, "num_prompt_tokens": 3,
            "num_output_tokens": 2, "finished": True, "sample_output_tokens": [2], "output_text": "0 1", **fields}


def _write_inputs(tmp_path):
    rows = [{"instruction": f"question number {i} " + "x" * i, "input": "ctx" if i % 2 else ""} for i in range(12)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.jsonl").write_text(
        '{"instruction": "hello"}\n{"instruction": ""}\nnot json\n{"other": 1}\n{"instruction": "' + "y" * 300 + '"}\n'
    )
    (tmp_path / "c.csv").write_text("instruction,input\nfrom csv,\n")
    (tmp_path / "nofield.jsonl").write_text('{"question": "q"}\n')
    return [str(tmp_path / n) for n in ("a.json", "b.jsonl", "c.csv", "nofield.jsonl")]


def _config(tmp_path, **kw):
    return GenerateConfig(inputs=tuple(_write_inputs(tmp_path)), output_dir=str(tmp_path / "out"),
                          max_new_tokens=10, wandb_mode="disabled", **kw)  # fmt: skip


def test_labels_everything_and_lists_what_it_skipped(tmp_path):
    messages = []
    stats = label_and_save(_config(tmp_path), engine=FakeEngine(), echo=messages.append)
    assert stats["num_rows"] == 12 + 1 + 1  # a.json, "hello", "from csv"
    assert stats["by_source"] == {"a": 12, "b": 1, "c": 1}
    text = "\n".join(messages)
    for expected in ["b.jsonl, row 1: empty prompt", "b.jsonl, row 2: unreadable row", "b.jsonl, row 3: no field",
                     "row 4: prompt of 302 tokens", "nofield.jsonl: no field 'instruction'"]:  # fmt: skip
        assert expected in text
    out = tmp_path / "out"
    ds = datasets.load_from_disk(str(out / "dataset"))
    assert len(ds) == 14 and {"prompt", "source", "num_prompt_tokens", "num_output_tokens", "finished"} <= set(ds.column_names)
    assert datasets.Dataset.from_parquet(str(out / "labelled.parquet")).num_rows == 14
    row = next(r for r in ds if r["source"] == "a" and r["row"] == 1)
    assert row["prompt"] == "question number 1 x\n\nctx"  # instruction + blank line + input
    card = (out / "README.md").read_text()
    assert "fake-model" in card and "max_new_tokens 10" in card and "length_histogram.png" in card
    assert (out / "length_histogram.png").stat().st_size > 5000
    assert len((out / "skipped.jsonl").read_text().splitlines()) == 5


def test_a_prompt_the_kv_pool_cannot_hold_is_skipped_not_fatal(tmp_path):
    # It fits the context; before, the engine refused it and the run stopped there, resume after resume.
    engine = FakeEngine()
    engine.kv_capacity_tokens = 40
    messages = []
    stats = label_and_save(_config(tmp_path), engine=engine, echo=messages.append)
    pool = [m for m in messages if m.endswith("new exceeds the KV pool's 40 tokens (raise max_num_seqs)")]
    assert pool and stats["num_rows"] == 14 - len(pool)  # the rest labelled


def test_a_missing_input_is_an_error_before_anything_runs(tmp_path):
    config = _config(tmp_path)
    config = GenerateConfig(**{**config.__dict__, "inputs": (*config.inputs, str(tmp_path / "missing.json"))})
    engine = FakeEngine()
    with pytest.raises(FileNotFoundError, match="missing.json"):
        label_and_save(config, engine=engine, echo=lambda m: None)
    assert not engine.seen and not (tmp_path / "out").exists()


def test_interrupted_run_resumes_without_loss_or_duplicates(tmp_path):
    config = _config(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        label_and_save(config, engine=FakeEngine(die_after=5), echo=lambda m: None)
    assert len(read_shards(tmp_path / "out" / "shards")) == 5
    # A crash mid-write leaves a torn line: it is ignored and that prompt is redone.
    shard = sorted((tmp_path / "out" / "shards").glob("part-*.jsonl"))[0]
    shard.write_text(shard.read_text() + '{"id": "a:9", "prom')
    second = FakeEngine()
    stats = label_and_save(config, engine=second, echo=lambda m: None)
    assert len(second.seen) == 14 - 5 and stats["num_rows"] == 14
    ids = [json.loads(l)["id"] for p in (tmp_path / "out" / "shards").glob("*.jsonl") for l in p.read_text().splitlines() if l.endswith("}")]  # noqa: E501
    assert len(ids) == len(set(ids)) == 14


def test_shard_rows_holding_unicode_line_separators_read_back(tmp_path):
    # str.splitlines() also breaks at U+2028, U+0085 and the like: such a row read back torn was relabelled on
    # every resumed run (one chat_bench_mix prompt was labelled four times).
    writer = ShardWriter(tmp_path)
    rows = [_row("a", i, prompt=f"code :\u2028x = 1\x85y = 2\u2029{i}") for i in range(2)]
    for row in rows:
        writer.write(row)
    writer.close()
    assert read_shards(tmp_path) == {row["id"]: row for row in rows}


def test_changed_recipe_is_refused(tmp_path):
    label_and_save(_config(tmp_path), engine=FakeEngine(), echo=lambda m: None)
    with pytest.raises(ValueError, match="max_new_tokens differ"):
        label_and_save(_config(tmp_path) .__class__(**{**_config(tmp_path).__dict__, "max_new_tokens": 11}),
                     engine=FakeEngine(), echo=lambda m: None)


def test_sampling_mode_keeps_every_length_and_their_max(tmp_path):
    config = _config(tmp_path, num_samples=3, temperature=0.8)
    label_and_save(config, engine=FakeEngine(), echo=lambda m: None)
    ds = datasets.load_from_disk(str(tmp_path / "out" / "dataset"))
    for r in ds:
        assert len(r["sample_output_tokens"]) == 3 and r["num_output_tokens"] == max(r["sample_output_tokens"])
    with pytest.raises(ValueError, match="temperature"):
        GenerateConfig(num_samples=2)


def test_parquet_and_datasets_folder_inputs(tmp_path):
    ds = datasets.Dataset.from_dict({"prompt": ["one", "two"]})
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.save_to_disk(str(tmp_path / "folder"))
    for path in (tmp_path / "p.parquet", tmp_path / "folder"):
        rows, skipped = read_prompts(path, prompt_field="prompt", input_field=None)
        assert [r.prompt for r in rows] == ["one", "two"] and not skipped


def test_write_only_makes_a_dataset_from_the_rows_so_far(tmp_path):
    config = _config(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        label_and_save(config, engine=FakeEngine(die_after=4), echo=lambda m: None)
    untouched = FakeEngine()
    stats = label_and_save(config, engine=untouched, echo=lambda m: None, write_only=True)
    assert stats["num_rows"] == 4 and untouched.seen == []
    assert datasets.load_from_disk(str(tmp_path / "out" / "dataset")).num_rows == 4


def test_inputs_that_share_a_file_name_are_refused_naming_both(tmp_path):
    # Ids are "<file stem>:<row>": x/train.json and y/train.jsonl would share them, and one file's rows would
    # silently replace the other's.
    for folder, name in (("x", "train.json"), ("y", "train.jsonl")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_text(json.dumps([{"instruction": f"{folder} prompt"}]))
    inputs = (str(tmp_path / "x" / "train.json"), str(tmp_path / "y" / "train.jsonl"))
    with pytest.raises(ValueError, match=r"x/train\.json and .*y/train\.jsonl would both be source 'train'"):
        GenerateConfig(inputs=inputs, output_dir=str(tmp_path / "out"))
    GenerateConfig(inputs=(inputs[0], str(tmp_path / "x" / ".." / "x" / "train.json")))  # the same file twice


def test_a_source_above_its_limit_is_reported(tmp_path):
    label_and_save(_config(tmp_path, limit_per_source=8), engine=FakeEngine(), echo=lambda m: None)
    messages = []
    stats = label_and_save(_config(tmp_path, limit_per_source=5), engine=FakeEngine(), echo=messages.append)
    assert stats["by_source"]["a"] == 8  # what was labelled is kept
    assert any(m.startswith("note: a (8) hold more labelled prompts than limit_per_source 5") for m in messages)
    messages.clear()
    label_and_save(_config(tmp_path, limit_per_source=8), engine=FakeEngine(), echo=messages.append)
    assert not any(m.startswith("note:") for m in messages)


def test_prompt_files_people_actually_have(tmp_path):
    """A byte-order mark, a CSV field past the csv module's 128 KiB limit, a first record without the field, a
    dataset dict, a prompt that is not text or not valid Unicode, a prompt field also named as the input field,
    an empty file: each read, or skipped with its reason, and never a traceback."""
    def read(name, text, **kw):
        (tmp_path / name).write_text(text, encoding="utf-8")
        return read_prompts(tmp_path / name, **({"prompt_field": "instruction"} | kw))

    for name, text in (("bom.json", '\ufeff[{"instruction": "hi"}]'), ("bom.jsonl", '\ufeff{"instruction": "hi"}\n'),
                       ("bom.csv", "\ufeffinstruction\nhi\n")):
        assert [r.prompt for r in read(name, text)[0]] == ["hi"], name
    rows, skipped = read("long.csv", "instruction\n" + "z" * 200_000 + "\nshort\n")
    assert [len(r.prompt) for r in rows] == [200_000, 5] and not skipped  # too long for the model: skipped later
    rows, skipped = read("first.jsonl", '{"other": 1}\n{"instruction": "good"}\n')
    assert [r.prompt for r in rows] == ["good"] and [s.row for s in skipped] == [0]
    rows, skipped = read("types.json", json.dumps([{"instruction": ["a", "list"]}, {"instruction": 0},
                                                   {"instruction": {"role": "user"}}, {"instruction": "ok"}]))
    assert [r.prompt for r in rows] == ["ok"] and [s.reason for s in skipped] == [
        "not text: a list", "not text: a int", "not text: a dict"]
    rows, skipped = read("surrogate.jsonl", '{"instruction": "broken \\ud83d emoji"}\n{"instruction": "fine"}\n')
    assert [r.prompt for r in rows] == ["fine"] and "not valid Unicode" in skipped[0].reason
    rows, _ = read("same.json", json.dumps([{"input": "What is 2+2?"}]), prompt_field="input", input_field="input")
    assert [r.prompt for r in rows] == ["What is 2+2?"]  # not the question twice
    assert read("empty.jsonl", "")[1][0].reason == "no prompts in it"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"instruction": ["t"]}),
                          "test": datasets.Dataset.from_dict({"instruction": ["u"]})}).save_to_disk(str(tmp_path / "dd"))
    assert sorted(r.prompt for r in read_prompts(tmp_path / "dd")[0]) == ["t", "u"]


def test_resuming_over_edited_prompt_files_is_refused(tmp_path):
    """Ids are file stem and row: a prompt inserted at the top would leave it unlabelled and the last one twice."""
    config = _config(tmp_path)
    label_and_save(config, engine=FakeEngine(), echo=lambda m: None)
    rows = json.loads((tmp_path / "a.json").read_text())
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "NEW"}, *rows]))
    with pytest.raises(ValueError, match="hold other prompts than the input files now"):
        label_and_save(dataclasses.replace(config, inputs=(str(tmp_path / "a.json"),)), engine=FakeEngine(),
                       echo=lambda m: None)


def test_a_run_that_labels_nothing_binds_the_folder_to_nothing(tmp_path):
    """`--write-only` on a new folder, or inputs with no prompt, wrote an empty dataset `s3 train` could not load
    and a recipe.json that refused the next, real run's settings."""
    (tmp_path / "empty.jsonl").write_text("")
    config = GenerateConfig(inputs=(str(tmp_path / "empty.jsonl"),), output_dir=str(tmp_path / "out"),
                            max_new_tokens=10, wandb_mode="disabled")
    with pytest.raises(ValueError, match="nothing is labelled"):
        label_and_save(config, engine=FakeEngine(), echo=lambda m: None)
    with pytest.raises(ValueError, match="nothing is labelled"):
        label_and_save(_config(tmp_path), engine=FakeEngine(), echo=lambda m: None, write_only=True)
    assert not (tmp_path / "out" / "recipe.json").exists() and not list((tmp_path / "out").glob("shards/*"))
    other = dataclasses.replace(_config(tmp_path), max_new_tokens=11)
    label_and_save(other, engine=FakeEngine(), echo=lambda m: None)  # not refused: nothing bound the folder
    shards = tmp_path / "out" / "shards"
    before = sorted(shards.iterdir())
    label_and_save(other, engine=FakeEngine(), echo=lambda m: None)  # all done
    assert sorted(shards.iterdir()) == before  # no empty shard left behind
    with pytest.raises(ValueError, match="device differ"):
        label_and_save(dataclasses.replace(other, device="cuda"), engine=FakeEngine(), echo=lambda m: None)


def test_a_new_shard_never_appends_to_an_old_one(tmp_path):
    """The shard index was the number of shards: with part-00001 deleted, the next run appended to part-00002,
    after its torn last line."""
    for index in (0, 2):
        (tmp_path / f"part-{index:05d}.jsonl").write_text(json.dumps(_row("a", 0)) + '\n{"id": "a:1", "pro')
    writer = ShardWriter(tmp_path)
    writer.write(_row("b", 0))
    writer.close()
    assert writer.path.name == "part-00003.jsonl" and set(read_shards(tmp_path)) == {"a:0", "b:0"}


def test_the_card_lists_what_every_run_skipped(tmp_path):
    """A run over another file rewrote skipped.jsonl and the card with its own skips only, while the dataset kept
    the first file's rows (the committed card said 0 skipped; docs/data.md, one 8,507-token prompt)."""
    first = _config(tmp_path)
    label_and_save(first, engine=FakeEngine(), echo=lambda m: None)
    before = (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()
    (tmp_path / "more.json").write_text(json.dumps([{"instruction": "another"}]))
    label_and_save(dataclasses.replace(first, inputs=(str(tmp_path / "more.json"),)), engine=FakeEngine(),
                   echo=lambda m: None)
    assert (tmp_path / "out" / "skipped.jsonl").read_text().splitlines() == before
    assert f"Skipped inputs ({len(before)}" in (tmp_path / "out" / "README.md").read_text()
    label_and_save(first, engine=FakeEngine(), echo=lambda m: None)  # the same files again: not listed twice
    assert len((tmp_path / "out" / "skipped.jsonl").read_text().splitlines()) == len(before)


def test_a_line_torn_inside_a_character_is_redone(tmp_path):
    """The shard was decoded whole before its lines were parsed: a crash that cut a multi-byte character stopped
    every later run (and `--write-only`) with a bare UnicodeDecodeError."""
    shard = tmp_path / "part-00000.jsonl"
    whole = json.dumps(_row("a", 0), ensure_ascii=False) + "\n"
    torn = json.dumps(_row("a", 1, prompt="日本"), ensure_ascii=False).encode()
    shard.write_bytes(whole.encode() + torn[: torn.index("日".encode()) + 1])  # one byte of three
    assert set(read_shards(tmp_path)) == {"a:0"}
    shard.write_bytes(whole.encode() + json.dumps(_row("a", 1), ensure_ascii=False).encode())  # all but its newline
    assert set(read_shards(tmp_path)) == {"a:0", "a:1"}


@pytest.mark.parametrize("line, says", [
    ('{"id": "a:1"}', "prompt, source, row"),
    ("123", "not a JSON object"),
    ("not json", "Expecting value"),
    (json.dumps(_row("a", 1, finished="yes")), "finished missing or not of type bool"),
    (json.dumps(_row("a", 1, id="b:7")), "is not its source and row"),
    (json.dumps(_row("a", 1, num_output_tokens=9999)), "lengths out of range"),
])
def test_a_damaged_line_is_an_error_naming_its_shard_and_line(tmp_path, line, says):
    """Such lines gave a traceback (KeyError, TypeError) or went silently into the training data (a length of 9,999
    under max_new_tokens 96, a row filed under another source)."""
    (tmp_path / "part-00000.jsonl").write_text(json.dumps(_row("a", 0)) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=f"part-00000.jsonl:2: .*{says}"):
        read_shards(tmp_path, max_new_tokens=96)


def test_bad_sampling_settings_are_refused_before_the_folder_is_bound(tmp_path):
    with pytest.raises(ValueError, match="frequency_penalty must be in"):
        _config(tmp_path, frequency_penalty=3.0)
    with pytest.raises(ValueError, match="top_p must be in"):
        _config(tmp_path, top_p=0.0)
    # A run stopped before its first row wrote no recipe: the next run, with other settings, is not refused.
    with pytest.raises(KeyboardInterrupt):
        label_and_save(_config(tmp_path), engine=FakeEngine(die_after=0), echo=lambda m: None)
    assert not (tmp_path / "out" / "recipe.json").exists()
    label_and_save(_config(tmp_path, frequency_penalty=0.0), engine=FakeEngine(), echo=lambda m: None)


def test_a_cap_under_ten_tokens_writes_its_dataset_and_card(tmp_path):
    """The histogram's bucket lines took a step of max_new_tokens // 10: 0 under 10, after labelling everything."""
    config = dataclasses.replace(_config(tmp_path), max_new_tokens=8)
    label_and_save(config, engine=FakeEngine(), echo=lambda m: None)
    assert (tmp_path / "out" / "README.md").exists() and (tmp_path / "out" / "length_histogram.png").exists()


def test_a_failed_write_leaves_the_previous_dataset_and_card(tmp_path, monkeypatch):
    config = _config(tmp_path)
    label_and_save(dataclasses.replace(config, inputs=config.inputs[:1]), engine=FakeEngine(), echo=lambda m: None)
    out = tmp_path / "out"
    card, rows = (out / "README.md").read_text(), len(datasets.load_from_disk(str(out / "dataset")))

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(datasets.Dataset, "to_parquet", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        label_and_save(config, engine=FakeEngine(), echo=lambda m: None)
    assert (out / "README.md").read_text() == card and len(datasets.load_from_disk(str(out / "dataset"))) == rows


def test_a_second_run_into_the_same_folder_is_refused(tmp_path):
    """Two runs at once would both pass the recipe check, label the same prompts and write the dataset over each
    other."""
    from pipeline.generate import output_lock

    config = _config(tmp_path)
    with output_lock(config.output_dir):
        with pytest.raises(ValueError, match="another `s3 generate` is writing"):
            label_and_save(config, engine=FakeEngine(), echo=lambda m: None)
    assert label_and_save(config, engine=FakeEngine(), echo=lambda m: None)["num_rows"] == 14  # let go at the end
