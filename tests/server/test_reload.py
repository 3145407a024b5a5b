"""Swapping the length predictor of a running server (`serve.server.reload`, SIGHUP to `s3 serve`): the next
requests are classified by the new checkpoint, everything that names the checkpoint follows, and a checkpoint that
does not fit is refused with the old one kept."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from core.buckets import BucketSpec
from serve.server.launch import BackgroundServer, _sighup_reloads, build_stack
from serve.server.reload import ReloadError, reload_predictor
from tests.engine.engine_driver import tiny_llama
from tests.fakes import make_scheduler
from tests.server.conftest import API_KEY, client
from tests.server.fakes import EOS_ID, CharTokenizer, FakePredictor, serve_config


def _serve(tmp_path, checkpoints: list, **config) -> BackgroundServer:
    """A server whose `--predictor ckpt` loads the next of ``checkpoints`` each time (an exception is raised)."""
    def load(path: str):
        assert path == "ckpt"
        found = checkpoints.pop(0)
        if isinstance(found, Exception):
            raise found
        return found

    model = tiny_llama()
    model.generation_config.eos_token_id = EOS_ID
    stack = build_stack(serve_config(tmp_path, predictor="ckpt", **config), model=model, tokenizer=CharTokenizer(),
                        load_checkpoint=load)
    return BackgroundServer(stack).start()


def _metrics(srv) -> str:
    return httpx.get(f"{srv.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text


def test_a_reloaded_predictor_classifies_the_next_requests_and_names_them(tmp_path):
    first = FakePredictor(bucket=0, checkpoint_id="first")
    second = FakePredictor(bucket=2, checkpoint_id="second", expected_within_one=0.6)
    srv = _serve(tmp_path, [first, second])
    try:
        assert "s3_prediction_expected_within_one" not in _metrics(srv)  # the first states none
        api = client(srv)
        before = api.completions.create(model="tiny", prompt="before", max_tokens=32, temperature=0)
        assert ["before"] in first.calls
        assert reload_predictor(srv.stack) == "second"
        after = api.completions.create(model="tiny", prompt="after", max_tokens=32, temperature=0)
        assert ["after"] in second.calls and ["after"] not in first.calls
        assert before.system_fingerprint != after.system_fingerprint
        text = _metrics(srv)
        assert 's3_admission_info{checkpoint_id="first",policy="s3"} 0.0' in text
        assert 's3_admission_info{checkpoint_id="second",policy="s3"} 1.0' in text
        assert "s3_prediction_expected_within_one 0.6" in text and "s3_predictor_stale 0.0" in text
        outcomes = srv.stack.engine_loop.outcomes
        assert outcomes.num_observed <= 1  # counted again from the swap: at most "after"
        assert srv.stack.engine_loop.feedback.checkpoint_id == "second"
        again = FakePredictor(bucket=3, checkpoint_id="second")  # the same checkpoint: nothing to swap
        srv.stack.load_checkpoint = lambda path: again
        assert reload_predictor(srv.stack) == "second" and srv.stack.classifier.predictor is second
    finally:
        srv.stop()


def test_a_checkpoint_that_does_not_fit_is_refused_and_the_old_one_kept(tmp_path):
    first = FakePredictor(bucket=0, checkpoint_id="first")
    other = FakePredictor(bucket=0, checkpoint_id="other", buckets=BucketSpec.uniform(64, 4))
    srv = _serve(tmp_path, [first, other, FileNotFoundError("no checkpoint there")])
    try:
        with pytest.raises(ReloadError, match="buckets"):
            reload_predictor(srv.stack)
        with pytest.raises(ReloadError, match="no checkpoint there"):
            reload_predictor(srv.stack)
        assert srv.stack.classifier.predictor is first
        client(srv).completions.create(model="tiny", prompt="still", max_tokens=2)
        assert ["still"] in first.calls
    finally:
        srv.stop()


def test_a_server_without_a_predictor_has_none_to_reload(tmp_path):
    srv = _serve(tmp_path, [], policy="paged")
    try:
        with pytest.raises(ReloadError, match="without a length predictor"):
            reload_predictor(srv.stack)
    finally:
        srv.stop()


def test_sighup_reloads_in_the_background(tmp_path):
    first, second = FakePredictor(bucket=0, checkpoint_id="first"), FakePredictor(bucket=1, checkpoint_id="second")
    srv = _serve(tmp_path, [first, second])
    try:
        with _sighup_reloads(srv.stack):
            os.kill(os.getpid(), signal.SIGHUP)
            deadline = time.monotonic() + 30
            while srv.stack.classifier.predictor is not second and time.monotonic() < deadline:
                time.sleep(0.05)
        assert srv.stack.classifier.predictor is second
    finally:
        srv.stop()


def test_the_estimator_takes_the_new_label_profile_for_requests_estimated_from_then_on():
    policy = make_scheduler("s3").policy
    policy.use_length_profile((1.0, 1.0, 2.0, 0.0), None)
    assert policy.estimator._prior == (0.25, 0.25, 0.5, 0.0)
    make_scheduler("paged").policy.use_length_profile((1.0,) * 4, None)  # no estimator: nothing to change
