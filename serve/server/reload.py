"""Swapping the length predictor of a running server (SIGHUP to `s3 serve`), so that a retraining round is served
without a restart: no request is dropped and the model stays loaded.

The checkpoint is loaded again from the folder the server was started with (`ServeConfig.predictor`, where `s3
train --feedback --output-dir` writes the next round), off the engine's thread. It must predict the same buckets
(the scheduler's arithmetic is in them) and, unless told otherwise, have learned this server's model. Then, between
two engine steps: requests classified from then on get the new predictions and the `s3` estimator the new
checkpoint's label profile (requests already running keep theirs), the feedback store names the new checkpoint
(the records of requests in flight keep the old one's name), and the live accuracy (`/metrics`
``s3_prediction_outcomes_total``) starts again for it (the requests in flight not counted), the old one's logged. The
answers' ``system_fingerprint`` and ``s3_admission_info`` follow. A checkpoint that fails any check is refused
and the server goes on with the predictor it had.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging

from serve.policy_config import with_length_profile
from serve.server.admission import check_target_model, default_frequency_penalty
from serve.server.bodies import fingerprint

log = logging.getLogger(__name__)


class ReloadError(ValueError):
    """The predictor could not be swapped; the server keeps the one it has."""


def reload_predictor(stack, *, timeout_s: float = 60.0) -> str:
    """Load ``stack``'s predictor checkpoint again and serve with it (see the module docstring); the new
    checkpoint's id. Raises ReloadError (the old predictor kept) when there is nothing to reload or it does not
    fit. ``stack``: a `serve.server.launch.ServingStack`."""
    config, old = stack.config, stack.admission.predictor
    if old is None or stack.classifier is None:
        raise ReloadError(f"this server runs the {stack.admission.policy.policy} policy without a length predictor: "
                          "there is none to reload")
    if not config.predictor or stack.load_checkpoint is None:
        raise ReloadError("this server's predictor was not loaded from a checkpoint folder (oracle lengths, or a "
                          "predictor handed in): there is none to load again")
    try:
        new = stack.load_checkpoint(config.predictor)
        if config.check_target_model:
            check_target_model(new, stack.engine.model_id)
    except (OSError, ValueError) as exc:
        raise ReloadError(f"could not load {config.predictor}: {exc}") from None
    if new.buckets != old.buckets:
        raise ReloadError(f"{config.predictor} predicts buckets with edges {list(new.buckets.upper_edges)}, but this "
                          f"server schedules with {list(old.buckets.upper_edges)}; restart the server to change them")
    checkpoint_id = getattr(new, "checkpoint_id", None)
    if checkpoint_id is not None and checkpoint_id == getattr(old, "checkpoint_id", None):
        log.info("predictor %s in %s is the one this server runs: nothing to swap", checkpoint_id, config.predictor)
        return checkpoint_id
    profile = with_length_profile(config.engine.policy, new)

    def swap(engine) -> str | None:  # in the engine thread, between two steps: all of it or none
        engine.scheduler.policy.use_length_profile(profile.bucket_prior, profile.bucket_shape)
        stack.classifier.predictor = new
        loop, state = stack.engine_loop, stack.state  # the requests predicted before keep their checkpoint
        if loop.feedback is not None:
            loop.feedback.use_checkpoint(checkpoint_id)
        stack.admission = dataclasses.replace(stack.admission, predictor=new)
        state.metrics.use_checkpoint(checkpoint_id)
        state.system_fingerprint = fingerprint(stack.engine.model_id, stack.admission.policy.policy, checkpoint_id)
        state.default_frequency_penalty = default_frequency_penalty(config, new)  # as its labels were generated
        state.label_decoding = getattr(new, "decoding", None)
        if loop.outcomes is None:
            return None
        summary = loop.outcomes.summary()
        loop.outcomes.reset(getattr(new, "expected_within_one", None), checkpoint_id)
        return summary

    future = stack.engine_loop.call(swap)
    try:
        before = future.result(timeout_s)
    except concurrent.futures.TimeoutError:
        if future.cancel():  # not begun: it never will
            raise ReloadError(f"the engine thread did not reach a step boundary in {timeout_s:g} s; the predictor "
                              "was not swapped (send SIGHUP again)") from None
        before = future.result()  # begun meanwhile: it ends in a moment, whole
    log.info("predictor %s replaced by %s from %s%s", getattr(old, "checkpoint_id", None), checkpoint_id,
             config.predictor, f"; the old one on this server's traffic: {before}" if before else "")
    return checkpoint_id
