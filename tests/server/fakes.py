"""Test doubles for the server: a character tokenizer over tiny_llama's 128-token vocabulary, a fake length
predictor, and a server built on them in a background thread."""

from __future__ import annotations

import dataclasses

from core.buckets import BucketSpec
from serve.engine.llm import EngineConfig
from serve.policy_config import PolicyConfig
from core.request import LengthPrediction
from serve.server.config import ServeConfig
from serve.server.launch import BackgroundServer, build_stack
from tests.engine.engine_driver import tiny_llama

EOS_ID = 1
MAX_NEW_TOKENS = 32
BUCKETS = BucketSpec.uniform(MAX_NEW_TOKENS, 4)  # (0, 8], (8, 16], (16, 24], (24, 32]


def _char(token_id: int) -> str:
    """Printable ASCII stands for itself; the other ids get one Latin letter each, so any output is text."""
    return chr(token_id) if 32 <= token_id < 127 else chr(0x100 + token_id)


class CharTokenizer:
    """One character per token; id 1 is EOS (skipped when decoding special tokens)."""

    chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
    eos_token_id = EOS_ID
    pad_token_id = 0

    def __init__(self) -> None:
        self._ids = {_char(i): i for i in range(2, 128)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [self._ids.get(c, ord("?")) for c in text]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        special = {EOS_ID}
        return "".join("" if (i in special and skip_special_tokens) else _char(i) for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = True,
                            preamble: str = "", **_):
        """``preamble``: a template variable of this template's own (as a model's ``enable_thinking``)."""
        if any(m["role"] == "system" and "refuse" in m["content"] for m in messages):
            raise ValueError("this template takes no system message asking to refuse")  # a template error
        text = preamble + "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        text += "<assistant>" if add_generation_prompt else ""
        return {"input_ids": self.encode(text)} if tokenize else text


@dataclasses.dataclass
class FakePredictor:
    """Predicts one bucket for every prompt (bucket 0 makes most s3 requests mispredict) and records its calls."""

    bucket: int = 0
    buckets: BucketSpec = BUCKETS
    checkpoint_id: str = "fake-checkpoint"
    expected_within_one: float | None = None
    """Within-one accuracy on its validation split, as a trained checkpoint states it."""
    calls: list[list[str]] = dataclasses.field(default_factory=list)

    def predict(self, prompts: list[str]) -> list[LengthPrediction]:
        self.calls.append(list(prompts))
        probs = tuple(1.0 if i == self.bucket else 0.0 for i in range(self.buckets.num_buckets))
        return [LengthPrediction(bucket=self.bucket, probs=probs, checkpoint_id=self.checkpoint_id) for _ in prompts]


def serve_config(tmp_path, *, policy: str = "s3", kv_cache_tokens: int = 1024, max_num_seqs: int = 16,
                 **overrides) -> ServeConfig:
    engine = EngineConfig(
        model="tiny-llama", kv_cache_tokens=kv_cache_tokens, block_size=4, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=256, policy=PolicyConfig(policy=policy, watermark=0.0),
    )  # fmt: skip
    fields = dict(engine=engine, max_new_tokens=MAX_NEW_TOKENS, feedback_dir=str(tmp_path / "feedback"),
                  served_model_name="tiny", api_key="test-key", feedback_sync_every=1)
    return ServeConfig(**(fields | overrides))


def start_server(config: ServeConfig, *, predictor=None, eos: bool = True) -> BackgroundServer:
    """A live server on tiny_llama (EOS = token 1 when ``eos``, so some answers stop early); HTTPS when ``config``
    names a certificate."""
    model = tiny_llama()
    if eos:
        model.generation_config.eos_token_id = EOS_ID
    tokenizer = CharTokenizer()
    if not eos:
        tokenizer.eos_token_id = None
    from pipeline.cli import load_predictor_checkpoint  # as `s3 serve` hands it in

    stack = build_stack(config, model=model, tokenizer=tokenizer, predictor=predictor,
                        load_checkpoint=load_predictor_checkpoint)
    return BackgroundServer(stack, tls=config.tls).start()
