import pytest

from core.request import RequestStatus
from serve.policy_config import PolicyConfig
from tests.fakes import BUCKETS, FakeClock, ScriptedExecutor, make_request, make_scheduler, run_until_done


def test_lifecycle_and_reservation_of_a_correct_prediction():
    sched = make_scheduler("s3-reserve")
    sched.add_request(make_request("a", prompt_tokens=4, true_tokens=10))
    assert sched.waiting[0].reserved_output_tokens == 16  # bucket 0's upper edge
    out = sched.schedule()
    assert [s.request_id for s in out.seqs] == ["a"] and out.new_request_ids == ["a"]
    assert out.seqs[0].num_new_tokens == 4 and out.seqs[0].samples
    assert sched.pool.num_used_blocks == 5  # (4 prompt + 16 reserved) / 4 tokens per block
    finished = run_until_done(sched, {"a": 10})
    assert [r.request_id for r in finished] == ["a"]
    request = finished[0]
    assert request.status == RequestStatus.FINISHED_STOPPED and request.num_output_tokens == 10
    assert request.output_token_ids == list(range(1, 11))
    assert request.mispredictions == [] and sched.pool.num_free_blocks == 16


def test_max_tokens_ends_with_length():
    sched = make_scheduler("max")
    sched.add_request(make_request("a", max_new_tokens=5))
    (request,) = run_until_done(sched, {"a": 100})
    assert request.status == RequestStatus.FINISHED_LENGTH and request.finish_reason == "length"
    assert request.num_output_tokens == 5


def test_underprediction_grows_in_place_when_memory_is_free():
    sched = make_scheduler("s3-reserve", num_blocks=32)
    sched.add_request(make_request("a", bucket=0, max_new_tokens=64))
    (request,) = run_until_done(sched, {"a": 40})
    assert request.num_output_tokens == 40 and request.num_preemptions == 0
    events = request.mispredictions
    assert [e.reserved_output_tokens for e in events] == [16, 32]  # grew bucket by bucket
    assert [e.predicted_bucket for e in events] == [0, 1]
    assert all(e.final_output_tokens == 40 and not e.preempted and e.prompt == "prompt a" for e in events)
    assert sched.stats.num_mispredictions == 2


def test_underprediction_preempts_when_memory_is_short_and_recomputes():
    # 8 blocks of 4 = 32 tokens. "a" and "b" reserve 4 + 8 tokens each (bucket 0 of 8-token buckets).
    from core.buckets import BucketSpec

    buckets = BucketSpec.uniform(24, 3)
    sched = make_scheduler("s3-reserve", num_blocks=8, buckets=buckets)
    sched.add_request(make_request("a", bucket=0, max_new_tokens=24))
    sched.add_request(make_request("b", bucket=0, max_new_tokens=24))
    finished = run_until_done(sched, {"a": 20, "b": 20})
    by_id = {r.request_id: r for r in finished}
    # Both run out at 8 tokens; "a" grows into the last free blocks, "b" finds none and yields.
    a, b = by_id["a"], by_id["b"]
    assert a.num_preemptions == 0 and b.num_preemptions == 1
    assert b.num_recomputed_tokens == 4 + 8 - 1  # prompt + generated, less the token not yet computed
    assert [e.preempted for e in b.mispredictions] == [True, False]
    assert all(e.final_output_tokens == 20 for e in a.mispredictions + b.mispredictions)
    for r in (a, b):
        assert r.output_token_ids == list(range(1, 21)) and r.status == RequestStatus.FINISHED_STOPPED
    assert sched.stats.num_preemptions == 1


def test_paged_preempts_the_last_admitted():
    sched = make_scheduler("paged", num_blocks=6, watermark=0.0)
    for rid in "abc":
        sched.add_request(make_request(rid, max_new_tokens=16))
    preempted = []
    finished = run_until_done(sched, {"a": 12, "b": 12, "c": 12}, on_step=lambda o: preempted.extend(o.preempted_request_ids))
    assert sorted(r.request_id for r in finished) == ["a", "b", "c"]
    assert preempted and "a" not in preempted  # the oldest always keeps going
    assert all(r.num_output_tokens == 12 for r in finished)


def test_max_policy_never_preempts_and_oracle_never_mispredicts():
    lengths = {str(i): 3 + 5 * i for i in range(6)}
    for policy in ("max", "oracle"):
        sched = make_scheduler(policy, num_blocks=20)
        for rid, n in lengths.items():
            sched.add_request(make_request(rid, true_tokens=n))
        run_until_done(sched, lengths)
        assert sched.stats.num_preemptions == 0 and sched.stats.num_mispredictions == 0


def test_abort_frees_blocks_at_once():
    sched = make_scheduler("s3")
    sched.add_request(make_request("a", true_tokens=10))
    sched.add_request(make_request("b", true_tokens=10))
    sched.schedule()
    assert sched.abort("a").status == RequestStatus.ABORTED
    assert sched.abort("a") is None and sched.abort("nope") is None
    assert sched.pool.num_blocks_held("a") == 0
    assert sched.abort("b").finish_reason == "abort"
    assert sched.pool.num_free_blocks == sched.pool.num_blocks
    out = sched.schedule()
    assert set(out.finished_request_ids) == {"a", "b"} and not out.seqs


def test_abort_mid_step_drops_the_result():
    sched = make_scheduler("s3")
    sched.add_request(make_request("a", true_tokens=10))
    out = sched.schedule()
    sched.abort("a")
    from serve.sched_output import StepResult

    assert sched.update_from_output(out, StepResult({"a": 1})) == []
    assert sched.requests["a"].num_output_tokens == 0


def test_forget_drops_only_ended_requests():
    from serve.sched_output import StepResult

    sched = make_scheduler("s3")
    sched.add_request(make_request("a", true_tokens=10))
    sched.add_request(make_request("b", true_tokens=10))
    out = sched.schedule()
    sched.forget("a")  # live: kept
    assert "a" in sched.requests
    sched.abort("a")
    sched.forget("a")
    sched.forget("a")  # unknown: no error
    assert "a" not in sched.requests
    sched.update_from_output(out, StepResult({"a": 1, "b": 1}))  # the step that ran while "a" was forgotten
    assert sched.requests["b"].num_output_tokens == 1
    sched.add_request(make_request("a", true_tokens=10))  # its id is free again
    sched.check_invariants()


def test_requests_that_can_never_fit_are_refused():
    sched = make_scheduler("s3", num_blocks=4)
    with pytest.raises(ValueError, match="needs up to 36 tokens"):
        sched.add_request(make_request("big", prompt_tokens=4, max_new_tokens=32))
    sched.add_request(make_request("a", max_new_tokens=8))
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(make_request("a", max_new_tokens=8))


def test_long_prompts_are_chunked_within_the_token_budget():
    sched = make_scheduler("max", num_blocks=64, max_num_batched_tokens=8, max_num_seqs=8)
    sched.add_request(make_request("a", prompt_tokens=20, max_new_tokens=4))
    out = sched.schedule()
    assert out.seqs[0].num_new_tokens == 8 and not out.seqs[0].samples
    (request,) = run_until_done(sched, {"a": 3})
    assert request.num_output_tokens == 3


def test_s3_reserve_packs_largest_first_but_aged_requests_are_not_overtaken():
    clock = FakeClock()
    # 10 blocks of 4 tokens. "old" needs 4 + 32 = 9 blocks; the small ones need 5 each.
    sched = make_scheduler("s3-reserve", num_blocks=10, aging_s=2.0, clock=clock)
    sched.add_request(make_request("small0", bucket=0, max_new_tokens=32))
    sched.add_request(make_request("old", bucket=1, max_new_tokens=32, arrival_time=0.5))
    for i in range(1, 6):
        sched.add_request(make_request(f"small{i}", bucket=0, arrival_time=1.0 + i))
    lengths = {"old": 30, **{f"small{i}": 16 for i in range(6)}}
    admitted = []
    run_until_done(sched, lengths, clock=clock, on_step=lambda o: admitted.extend(o.new_request_ids))
    # Once "old" aged (t >= 2.5) nothing that arrived after it was admitted before it.
    old_at = admitted.index("old")
    later = [rid for rid in admitted[:old_at] if sched.requests[rid].arrival_time > 0.5]
    assert all(sched.requests[rid].first_scheduled_time < 2.5 for rid in later)


def test_quantile_reservation_uses_the_probabilities():
    from core.request import LengthPrediction

    sched = make_scheduler("s3-reserve", reserve_quantile=0.9)
    request = make_request("a")
    request.prediction = LengthPrediction(bucket=0, probs=(0.6, 0.2, 0.15, 0.05))
    sched.add_request(request)
    assert request.reserved_bucket == 2 and request.reserved_output_tokens == 32


def test_stats_sum_each_steps_batch_tokens_and_time():
    clock = FakeClock()
    sched = make_scheduler("paged", num_blocks=64, max_num_batched_tokens=8, max_num_seqs=8, clock=clock)
    sched.add_request(make_request("a", prompt_tokens=6, max_new_tokens=3))
    sched.add_request(make_request("b", prompt_tokens=4, max_new_tokens=3))
    executor = ScriptedExecutor({"a": 3, "b": 3})
    batches = []
    while sched.has_unfinished():
        out = sched.schedule()
        clock.now += 0.25  # the step runs
        sched.update_from_output(out, executor.execute(sched, out))
        batches.append(len(out.seqs))
    stats = sched.stats
    assert stats.num_steps == len(batches) and stats.num_batched_seqs == sum(batches)
    assert stats.mean_running_batch == pytest.approx(sum(batches) / len(batches))
    # both prompts (10 tokens, chunked at 8 a step) and each output token but the last, which ends the request
    assert stats.num_batched_tokens == 10 + 2 * 2
    assert stats.step_time_s == pytest.approx(0.25 * stats.num_steps)


def test_a_queue_scaled_aging_bound_follows_how_fast_requests_finish():
    from serve.policies import make_policy

    policy = make_policy(PolicyConfig(policy="s3", aging_s=30.0, aging_queue_factor=1.0), BUCKETS)
    # The queue in arrival order: long requests first (arrived at t = 0..3), then a short one (t = 9.5).
    waiting = [make_request(f"long{i}", bucket=3, arrival_time=float(i)) for i in range(4)]
    waiting.append(make_request("short", bucket=0, arrival_time=9.5))
    assert policy.aging_bound(len(waiting)) == 30.0  # nothing finished yet: the fixed bound
    assert list(policy.candidates(waiting, now=10.0))[0] == 4  # the short one overtakes all four
    for t in range(9):  # one request finished a second: 5 waiting take about 5 s to admit
        done = make_request(f"done{t}")
        done.first_scheduled_time, done.finish_time = float(t) - 1.0, float(t)
        policy.observe_finished(done)
    assert policy.aging_bound(len(waiting)) == pytest.approx(5.0)
    # At t = 7 the three that have waited 5 s or more go first, in arrival order; then the short one.
    order = list(policy.candidates(waiting, now=7.0))
    assert order[:3] == [0, 1, 2] and order[3] == 4
    with pytest.raises(ValueError, match="aging_queue_factor"):
        PolicyConfig(aging_queue_factor=-1.0)


@pytest.mark.parametrize("knob", [dict(aging_s=float("nan")), dict(aging_queue_factor=float("nan")),
                                  dict(bucket_prior=(float("nan"), 1.0)), dict(bucket_prior=(float("inf"), 1.0)),
                                  dict(bucket_shape=((float("nan"), 1.0),))])
def test_a_knob_that_is_not_a_number_is_refused(knob):
    """A NaN passed `min(...) < 0`: an aging bound of NaN never aged anyone, a NaN prior made every estimate the
    worst case, all silently."""
    with pytest.raises(ValueError):
        PolicyConfig(**knob)


def test_a_preempted_request_that_has_streamed_resumes_before_shorter_new_ones():
    from serve.policies import make_policy

    started = make_request("started", bucket=3, arrival_time=0.0)
    started.output_token_ids.extend([1, 2, 3])  # preempted mid-answer, waiting to be recomputed
    fresh = make_request("fresh", bucket=0, arrival_time=1.0)
    for name in ("s3", "paged-sjf"):
        assert list(make_policy(PolicyConfig(policy=name), BUCKETS).candidates([started, fresh], now=2.0)) == [0, 1]
        unpinned = make_policy(PolicyConfig(policy=name, resume_first=False), BUCKETS)
        assert list(unpinned.candidates([started, fresh], now=2.0)) == [1, 0]  # by predicted work alone


def test_longest_stall_is_the_longest_wait_between_two_of_a_requests_tokens():
    clock = FakeClock()
    sched = make_scheduler("paged", num_blocks=64, clock=clock)
    request = make_request("a", prompt_tokens=4, max_new_tokens=4)
    sched.add_request(request)
    executor = ScriptedExecutor({"a": 4})
    step_times = iter([5.0, 0.25, 1.0, 0.5])  # the prefill (to the first token), then three decodes
    while sched.has_unfinished():
        out = sched.schedule()
        clock.now += next(step_times)
        sched.update_from_output(out, executor.execute(sched, out))
    assert request.num_output_tokens == 4 and request.longest_stall_s == 1.0  # the wait to the first token is TTFT


def test_a_lone_request_that_fits_the_pool_but_not_the_watermark_is_admitted():
    # 7 blocks of 1 token, a 30% watermark (2 blocks): a 6-token prompt fits only once nothing runs.
    sched = make_scheduler("paged", num_blocks=7, block_size=1, watermark=0.3, max_num_batched_tokens=64)
    sched.add_request(make_request("a", prompt_tokens=6, max_new_tokens=1))
    (request,) = run_until_done(sched, {"a": 1})
    assert request.num_output_tokens == 1


def test_every_answer_that_outran_its_bucket_carries_a_misprediction_event():
    """The feedback store records a misprediction by its events. A request preempted as another's victim right at
    its bucket's edge, then resumed from the queue, used to write its next token past the edge unnoted."""
    import random

    missed = 0
    for seed in range(150):
        rng = random.Random(seed)
        sched = make_scheduler("s3", num_blocks=rng.choice([19, 20, 24]), block_size=4, max_num_seqs=8)
        lengths = {}
        for i in range(8):
            lengths[str(i)] = rng.choice([5, 16, 17, 32, 33, 40, 48, 49])
            sched.add_request(make_request(str(i), prompt_tokens=rng.randint(2, 8), max_new_tokens=64,
                                           bucket=rng.choice([0, 0, 1, 2])))
        missed += sum(BUCKETS.bucket_of(r.num_output_tokens) > r.prediction.bucket and not r.mispredictions
                      for r in run_until_done(sched, lengths))
    assert missed == 0


def test_paged_preempts_the_most_recently_admitted_after_a_chunked_prefill():
    """The step puts decoding sequences first: "b" (admitted before "c") ended its chunked prefill behind "c", and
    `paged` took "b", older and further along, as the last in running order."""
    from core.request import Request
    from serve.sched_output import StepResult

    sched = make_scheduler("paged", num_blocks=14, max_num_seqs=3, max_num_batched_tokens=16,
                           long_prefill_token_threshold=4, watermark=0.0)  # fmt: skip
    for rid, prompt, arrival in (("a", 4, 0.0), ("b", 16, 1.0), ("c", 4, 2.0)):
        sched.add_request(Request(rid, [1] * prompt, 40 if rid == "a" else 20, arrival_time=arrival))
    for _ in range(40):
        out = sched.schedule()
        if out.preempted_request_ids:
            break
        sched.update_from_output(out, StepResult(sampled_token_ids={s.request_id: 5 for s in out.seqs if s.samples}))
    assert [r.request_id for r in sched.running][-1] == "b"  # the running order, decodes first
    assert out.preempted_request_ids == ["c"]


def test_a_prompt_longer_than_the_pool_is_refused_for_what_it_is():
    sched = make_scheduler("paged", num_blocks=4)  # 16 tokens
    with pytest.raises(ValueError, match=r"'p''s prompt \(20 tokens, and one to generate\) does not fit the KV pool "
                                         r"\(16 tokens\): shorten the prompt"):
        sched.add_request(make_request("p", prompt_tokens=20, max_new_tokens=1))
    with pytest.raises(ValueError, match="lower max_new_tokens"):  # the prompt fits, its answer may not
        sched.add_request(make_request("q", prompt_tokens=8, max_new_tokens=16))


def test_requests_aborted_in_the_queue_do_not_count_in_the_finish_rate():
    """A burst of queued clients going away made the rate infinite and the queue-following aging bound 0."""
    clock = FakeClock()
    sched = make_scheduler("s3", num_blocks=64, max_num_seqs=1, clock=clock, aging_queue_factor=1.0)
    for i in range(40):
        sched.add_request(make_request(f"r{i}", bucket=0, max_new_tokens=8))
    finished = []
    executor = ScriptedExecutor({f"r{i}": 8 for i in range(40)})
    while len(finished) < 5:
        out = sched.schedule()
        finished += sched.update_from_output(out, executor.execute(sched, out))
        clock.now += 1.0
    rate = sched.policy.finish_rate.per_s()
    for request in list(sched.waiting)[:20]:
        sched.abort(request.request_id)
    assert sched.policy.finish_rate.per_s() == rate and sched.policy.aging_bound(sched.num_waiting) > 0
