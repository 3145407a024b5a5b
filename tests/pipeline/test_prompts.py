"""Drawing serving and benchmark prompts: without replacement, round-robin by source, never a labelled one."""

import dataclasses
import json

import pytest

from pipeline.bench import BenchConfig, draw_prompts
from pipeline.labelled import labelled_prompts
from pipeline.prompts import PROMPT_SETS, sample_prompts


class FakeTokenizer:
    def apply_chat_template(self, messages, **_kwargs):
        return [len(m["content"]) % 97 + 1 for m in messages]


@pytest.fixture
def sets(tmp_path):
    files = []
    for name, n in (("a", 5), ("b", 2), ("c", 4)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps([{"instruction": f"{name} prompt {i}"} for i in range(n)]))
        files.append(str(path))
    # A text repeated inside a file and across files is still one prompt.
    (tmp_path / "d.json").write_text(json.dumps([{"instruction": "a prompt 0"}, {"instruction": "d"}, {"instruction": "d"}]))
    return [*files, str(tmp_path / "d.json")]


def test_sample_is_without_replacement_round_robin_and_seeded(sets):
    drawn = sample_prompts(sets, 10, seed=3)
    texts = [row.prompt for row in drawn]
    assert len(set(texts)) == len(texts) == 10
    assert [row.source for row in drawn[:4]] == ["a", "b", "c", "d"]  # one of each source per round
    assert [row.source for row in drawn[4:7]] == ["a", "b", "c"]  # d ran out (its one new prompt is drawn)
    assert sample_prompts(sets, 10, seed=3) == drawn and sample_prompts(sets, 10, seed=4) != drawn
    assert len(sample_prompts(sets, 12)) == 12  # every distinct prompt: 5 + 2 + 4 + 1


def test_sample_never_draws_an_excluded_prompt_and_says_when_too_few(sets):
    exclude = {"a prompt 1", "c prompt 0"}
    drawn = sample_prompts(sets, 10, exclude=exclude)
    assert not {row.prompt for row in drawn} & exclude
    with pytest.raises(ValueError, match="hold only 10"):
        sample_prompts(sets, 11, exclude=exclude)


def test_bench_draws_distinct_unlabelled_prompts_from_the_seven_sets():
    config = BenchConfig(num_prompts=300, warmup_prompts=5)
    timed, warmup = draw_prompts(config, FakeTokenizer())
    texts = [text for text, _ in timed + warmup]
    assert len(timed) == 300 and len(warmup) == 5 and len(set(texts)) == 305
    assert not set(texts) & labelled_prompts("data/labelled")
    assert len(config.prompts) == len(PROMPT_SETS) == 7


def test_bench_skips_prompts_that_do_not_fit_the_context(tmp_path):
    class CharTokenizer:
        def apply_chat_template(self, messages, **_kwargs):
            return [1] * len(messages[0]["content"])  # one id per character

    path = tmp_path / "mixed.json"
    path.write_text(json.dumps([{"instruction": text} for text in ("short", "tiny", "x" * 50, "y" * 40, "ok")]))
    config = BenchConfig(prompts=(str(path),), labelled_data=None, num_prompts=3, warmup_prompts=0, max_new_tokens=2)
    said = []
    timed, _ = draw_prompts(config, CharTokenizer(), context_tokens=7, progress=said.append)
    assert sorted(text for text, _ in timed) == ["ok", "short", "tiny"]
    assert all(len(ids) + 2 <= 7 for _, ids in timed) and all(line.startswith("skipped") for line in said)
    with pytest.raises(ValueError, match="fit the context"):
        draw_prompts(dataclasses.replace(config, num_prompts=4), CharTokenizer(), context_tokens=7)


def test_labelled_prompts_include_the_shards(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"prompt": ["in the dataset"]}).save_to_disk(str(tmp_path / "dataset"))
    (tmp_path / "recipe.json").write_text("{}")
    (tmp_path / "shards").mkdir()
    row = {"id": "x:1", "prompt": "only in a shard", "source": "x", "row": 1, "num_prompt_tokens": 4,
           "num_output_tokens": 2, "finished": True, "sample_output_tokens": [2], "output_text": "ok"}
    (tmp_path / "shards" / "part-00000.jsonl").write_text(json.dumps(row) + "\n")
    assert labelled_prompts(tmp_path) == {"in the dataset", "only in a shard"}
    with pytest.raises(FileNotFoundError):
        labelled_prompts(tmp_path / "missing")
