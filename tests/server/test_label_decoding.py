"""Only requests asked as the predictor's labels were made count as labels: scored in the live accuracy and recorded
for retraining. A request sampled at the default temperature, with another penalty, a system prompt or an earlier
turn, or a completion that skips the chat template, gets another length from the same prompt."""

from __future__ import annotations

import dataclasses
import time

import pytest

from core.buckets import BucketSpec
from serve.server.launch import build_stack
from serve.server.reload import ReloadError, reload_predictor
from tests.engine.engine_driver import tiny_llama
from tests.server.conftest import client
from tests.server.fakes import EOS_ID, MAX_NEW_TOKENS, CharTokenizer, FakePredictor, serve_config, start_server

RECIPE = {"temperature": 0.0, "top_p": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.5,
          "chat_template": "<{role}>{content}", "max_new_tokens": MAX_NEW_TOKENS}


@dataclasses.dataclass
class RecipePredictor(FakePredictor):
    decoding: dict = dataclasses.field(default_factory=lambda: dict(RECIPE))


def test_only_requests_decoded_as_the_labels_count(tmp_path):
    srv = start_server(serve_config(tmp_path), predictor=RecipePredictor(bucket=0))
    try:
        api, outcomes = client(srv), srv.stack.engine_loop.outcomes
        user = [{"role": "user", "content": "count me"}]

        def scored(**request) -> int:
            before = outcomes.num_observed
            if "messages" in request:
                api.chat.completions.create(model="tiny", max_tokens=MAX_NEW_TOKENS, **request)
            else:
                api.completions.create(model="tiny", max_tokens=MAX_NEW_TOKENS, **request)
            srv.stack.engine_loop.call(lambda engine: None).result(10)  # scored before this runs
            return outcomes.num_observed - before

        assert scored(messages=user, temperature=0) == 1  # greedy, the labels' penalty by default
        assert scored(messages=user, temperature=0, frequency_penalty=0.5) == 1
        assert scored(messages=user) == 0  # the default temperature, 1.0: a sample, not the greedy label
        assert scored(messages=user, temperature=0, frequency_penalty=0.0) == 0
        assert scored(messages=[{"role": "system", "content": "Be brief."}, *user], temperature=0) == 0
        assert scored(messages=[*user, {"role": "assistant", "content": "ok"}, *user], temperature=0) == 0
        assert scored(prompt="count me", temperature=0) == 0  # no chat template
    finally:
        srv.stop()


def test_without_a_recipe_every_natural_length_counts(tmp_path):
    srv = start_server(serve_config(tmp_path), predictor=FakePredictor(bucket=0))
    try:
        client(srv).completions.create(model="tiny", prompt="count me", max_tokens=MAX_NEW_TOKENS)
        srv.stack.engine_loop.call(lambda engine: None).result(10)
        assert srv.stack.engine_loop.outcomes.num_observed == 1
    finally:
        srv.stop()


def test_a_predictor_for_another_length_cap_is_named_at_start(tmp_path, caplog):
    """Nothing said so: with a cap under the predictor's span, no capped answer is ever scored or recorded (the live
    accuracy is the short answers'). A short cap can be the operator's wish (a quick check), so it is a warning."""
    wide = FakePredictor(buckets=BucketSpec.uniform(2 * MAX_NEW_TOKENS, 4))
    model = tiny_llama()
    model.generation_config.eos_token_id = EOS_ID
    build_stack(serve_config(tmp_path), model=model, tokenizer=CharTokenizer(), predictor=wide)
    assert f"serve with --set max_new_tokens={2 * MAX_NEW_TOKENS}" in caplog.text and "short ones" in caplog.text


def test_a_reload_the_engine_cannot_take_in_time_is_not_applied_at_all(tmp_path):
    """The swap stayed queued after the timeout and ran later, half of it: the classifier predicted with the new
    checkpoint while the metrics, fingerprint and default penalty named the old one, and the log said "not
    reloaded"."""
    first, second = RecipePredictor(bucket=0, checkpoint_id="first"), RecipePredictor(bucket=2, checkpoint_id="second")
    model = tiny_llama()
    model.generation_config.eos_token_id = EOS_ID
    stack = build_stack(serve_config(tmp_path, predictor="ckpt"), model=model, tokenizer=CharTokenizer(),
                        load_checkpoint=lambda path: first)
    stack.start()
    try:
        stack.load_checkpoint = lambda path: second
        busy = stack.engine_loop.call(lambda engine: time.sleep(1.5))  # the engine thread in a long step
        fingerprint = stack.state.system_fingerprint
        with pytest.raises(ReloadError, match="did not reach a step boundary"):
            reload_predictor(stack, timeout_s=0.3)
        busy.result(10)
        stack.engine_loop.call(lambda engine: None).result(10)
        assert stack.classifier.predictor is first and stack.admission.predictor is first
        assert stack.state.system_fingerprint == fingerprint and stack.engine_loop.outcomes.checkpoint_id == "first"
        assert reload_predictor(stack) == "second" and stack.state.system_fingerprint != fingerprint
    finally:
        stack.stop()
