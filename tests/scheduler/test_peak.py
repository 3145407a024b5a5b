"""The predictive paged policies: the projected-peak test, and the `s3` policy in the scheduler (its order, victims
and waits); the estimators are in test_estimate.py."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.buckets import BucketSpec, within_bucket_shape
from core.request import LengthPrediction, Request
from serve.policy_config import PolicyConfig
from serve.estimate import BucketEstimator, ExactEstimator
from serve.peak import PeakGate, Projection, peak_tokens
from serve.kv import blocks_for
from serve.policies import StepLimits
from tests.fakes import FakeClock, make_request, make_scheduler, run_until_done

BUCKETS = BucketSpec.uniform(40, 4)  # (0,10], (10,20], (20,30], (30,40]

probs_st = st.lists(st.floats(0, 1, allow_subnormal=False), min_size=4, max_size=4).filter(lambda p: sum(p) > 1e-3)


# -- the peak test ---------------------------------------------------------------------------------------------

seq_st = st.fixed_dictionaries({
    "prompt": st.integers(1, 30), "written": st.integers(0, 30), "extra": st.integers(1, 40),
    "prefilled": st.booleans(),
})


def _sequence(i: int, spec: dict) -> Request:
    request = Request(f"r{i}", [1] * spec["prompt"], max_new_tokens=spec["written"] + spec["extra"])
    request.output_token_ids = [1] * spec["written"]
    request.prediction = LengthPrediction(bucket=0, num_tokens=spec["written"] + spec["extra"])
    # Decoding (all but the last sampled token cached) or not started (admitted again after a preemption).
    request.num_computed_tokens = request.num_tokens - 1 if spec["prefilled"] else 0
    return request


@settings(max_examples=300, deadline=None)
@given(st.lists(seq_st, min_size=1, max_size=12), seq_st, st.integers(1, 8), st.integers(1, 64))
def test_exact_lengths_never_admit_less_than_exact_reservation(running_specs, candidate_spec, block_size, rate):
    running = [_sequence(i, spec) for i, spec in enumerate(running_specs)]
    candidate = _sequence(len(running), {**candidate_spec, "prefilled": False})
    # What reserving each exact length would hold: prompt + every output token.
    exact = sum(blocks_for(r.num_prompt_tokens + r.prediction.num_tokens, block_size) for r in running + [candidate])
    estimator = ExactEstimator()
    gate = PeakGate(estimator.estimate, capacity_tokens=exact * block_size,
                    block_size=block_size, prefill_rate=rate, prefill_share=rate)
    for request in running:
        gate.add(request)
    assert gate.fits(candidate)


@settings(max_examples=200, deadline=None)
@given(st.lists(seq_st, min_size=1, max_size=10), st.lists(st.tuples(seq_st, probs_st), min_size=1, max_size=10),
       st.integers(1, 8), st.integers(40, 1200), st.floats(0, 2))
def test_the_gate_answers_as_the_peak_of_everyone_says(running_specs, candidates, block_size, capacity, z):
    """The gate skips the peak's evaluation while everyone's end at once would fit (an upper bound of the peak),
    and keeps the peak it computed for the request it admits: its answers stay those of the full evaluation."""
    estimator = BucketEstimator(BUCKETS, quantile=0.7, prior_weight=0.05)
    gate = PeakGate(estimator.estimate, capacity_tokens=capacity, block_size=block_size, prefill_rate=16,
                    prefill_share=16, z=z)
    for i, spec in enumerate(running_specs):
        gate.add(_sequence(i, spec))
    for j, (spec, probs) in enumerate(candidates):
        candidate = _sequence(100 + j, {**spec, "prefilled": False})
        candidate.prediction = LengthPrediction(bucket=0, probs=tuple(probs))
        mine, variance = gate.projection(candidate)
        margin = z * (gate._variance + variance) ** 0.5
        expected = peak_tokens(_sorted(gate.entries + mine)) + margin <= capacity
        assert gate.fits(candidate) == expected
        if expected:
            gate.add(candidate)
            assert gate._peak_bound >= peak_tokens(_sorted(gate.entries)) - 1e-9


proj_st = st.builds(lambda t, g, extra: (t, g, g + 1 + extra), st.integers(1, 60), st.integers(0, 60),
                    st.integers(0, 20))


def _sorted(entries):
    return sorted(entries, key=lambda e: -e.steps)


@given(st.lists(st.lists(proj_st, min_size=1, max_size=4), min_size=1, max_size=8))
def test_peak_of_slices_lies_between_the_peaks_of_their_extremes(sequences):
    """A sequence counted as four equal-probability slices: its expected memory. Splitting an exact length
    into identical slices changes nothing; the expected peak lies between charging every sequence its
    shortest slice and its longest."""
    exact = [Projection(t, g, s) for (t, g, s), *_ in sequences]
    split = [Projection(t, g, s, 0.25) for (t, g, s), *_ in sequences for _ in range(4)]
    assert peak_tokens(_sorted(split)) == peak_tokens(_sorted(exact))
    sliced = [Projection(t, g, s, 1 / len(seq)) for seq in sequences for t, g, s in seq]
    low = [min((Projection(*p) for p in seq), key=lambda e: e.steps) for seq in sequences]
    high = [max((Projection(*p) for p in seq), key=lambda e: e.steps) for seq in sequences]
    middle = peak_tokens(_sorted(sliced))
    # each sequence's memory curve lies between its shortest and longest slice's only when they share tokens
    if all(len({t for t, _, _ in seq}) == 1 and all(g + 1 == st_ for _, g, st_ in seq) for seq in sequences):
        assert peak_tokens(_sorted(low)) - 1e-9 <= middle <= peak_tokens(_sorted(high)) + 1e-9


def test_a_higher_q_admits_no_more_and_q_half_is_the_expected_peak():
    # Two running sequences predicted in bucket 1 (10-20 tokens): the margin grows with q.
    def admitted(q):
        sched = make_scheduler("s3", num_blocks=14, block_size=4, quantile=q, prior_weight=0.0)
        for rid in "abcd":
            sched.add_request(make_request(rid, bucket=1, max_new_tokens=40))
        return len(sched.schedule().new_request_ids)

    counts = [admitted(q) for q in (0.0, 0.5, 0.9, 0.999)]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]


workload_st = st.fixed_dictionaries({
    "requests": st.lists(st.fixed_dictionaries({
        "prompt": st.integers(1, 24), "max_new": st.integers(1, 40), "true": st.integers(1, 50),
        "arrival": st.integers(0, 20),
    }), min_size=1, max_size=25),
    "block_size": st.integers(1, 8),
    "extra_blocks": st.integers(0, 40),
    "max_num_seqs": st.integers(1, 8),
    "extra_budget": st.integers(0, 30),
    "prefill_cap": st.integers(0, 12),
    "prefix_caching": st.booleans(),
    "prefix_kinds": st.integers(1, 3),
})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workload_st)
def test_s3_oracle_never_preempts(w):
    """With exact lengths the projected peak is an upper bound of what the pool will hold: no preemption, under
    chunked prefill, per-request prefill caps, tight budgets and staggered arrivals; with prefix caching too,
    over prompts that share prefixes (a shared block is charged to the holder that ends last)."""
    largest = max(blocks_for(r["prompt"] + r["max_new"], w["block_size"]) for r in w["requests"])
    clock = FakeClock()
    from serve.scheduler import Scheduler, SchedulerConfig
    from serve.policy_config import PolicyConfig

    config = SchedulerConfig(
        num_blocks=largest + w["extra_blocks"], block_size=w["block_size"], max_num_seqs=w["max_num_seqs"],
        max_num_batched_tokens=w["max_num_seqs"] + w["extra_budget"],
        long_prefill_token_threshold=w["prefill_cap"], policy=PolicyConfig(policy="s3-oracle"),
        enable_prefix_caching=w["prefix_caching"],
    )
    sched = Scheduler(config, buckets=BUCKETS, clock=clock)
    lengths = {}
    pending = []
    for i, r in enumerate(w["requests"]):
        true = min(r["true"], r["max_new"])
        lengths[f"r{i}"] = true
        prompt = [1 + i % w["prefix_kinds"]] * r["prompt"]  # prompts of one kind share their prefixes
        pending.append(Request(f"r{i}", prompt, max_new_tokens=r["max_new"], arrival_time=r["arrival"],
                               prediction=LengthPrediction(bucket=0, num_tokens=true)))
    pending.sort(key=lambda r: r.arrival_time)
    from tests.fakes import ScriptedExecutor

    executor = ScriptedExecutor(lengths)
    for _ in range(5000):
        while pending and pending[0].arrival_time <= clock.now:
            sched.add_request(pending.pop(0))
        if not pending and not sched.has_unfinished():
            break
        out = sched.schedule()
        sched.update_from_output(out, executor.execute(sched, out))
        sched.check_invariants()
        clock.now += 1.0
    else:
        raise AssertionError("the workload did not finish")
    assert sched.stats.num_preemptions == 0


# -- the s3 policy in the scheduler ----------------------------------------------------------------------------


def test_s3_admits_short_predicted_work_first():
    sched = make_scheduler("s3", num_blocks=64, max_num_seqs=1)
    sched.add_request(make_request("long", bucket=3, max_new_tokens=64))
    sched.add_request(make_request("short", bucket=0, max_new_tokens=64))
    assert sched.schedule().new_request_ids == ["short"]


def test_s3_notes_a_misprediction_per_bucket_passed_without_preempting():
    sched = make_scheduler("s3", num_blocks=32)
    sched.add_request(make_request("a", bucket=0, max_new_tokens=64))
    (request,) = run_until_done(sched, {"a": 40})
    assert request.num_preemptions == 0
    assert [e.predicted_bucket for e in request.mispredictions] == [0, 1]
    assert [e.reserved_output_tokens for e in request.mispredictions] == [16, 32]
    assert all(not e.preempted and e.final_output_tokens == 40 for e in request.mispredictions)
    assert sched.stats.num_mispredictions == 2


def test_s3_holds_back_what_would_overflow_at_its_peak():
    # 12 blocks of 4 = 48 tokens. Each request: 4 prompt tokens, predicted bucket 1 (up to 32 tokens).
    # `paged` admits all three at once (each needs one block now); s3 sees their peaks would not fit. The
    # lengths (30) sit at the top of the predicted bucket: a careful q keeps s3 from ever preempting.
    lengths = {rid: 30 for rid in "abc"}
    admitted_first = {}
    for policy in ("paged", "s3"):
        sched = make_scheduler(policy, num_blocks=12, watermark=0.0, quantile=0.999, prior_weight=0.0,
                               short_queue=0)
        for rid in "abc":
            sched.add_request(make_request(rid, bucket=1, max_new_tokens=32))
        admitted_first[policy] = len(sched.schedule().new_request_ids)
        run_until_done(sched, lengths)
        admitted_first[policy, "preemptions"] = sched.stats.num_preemptions
    assert admitted_first["paged"] == 3 and admitted_first["paged", "preemptions"] > 0
    assert admitted_first["s3"] == 1 and admitted_first["s3", "preemptions"] == 0


def test_without_the_last_blocks_room_the_peak_test_admits_what_the_pool_really_holds():
    # Blocks of 4 tokens, a pool of 12. `a` (5 prompt tokens, 1 written, 1 to come) holds 2 blocks and finishes
    # this step; `b` (4 prompt tokens, 2 to write) needs 1 block now and 2 once `a` is gone: 12 tokens at most.
    # Charged its last block's room, each looks a block fuller (8 + 7 tokens now): refused. Without it: admitted.
    def fits(block_room: bool) -> bool:
        gate = PeakGate(ExactEstimator().estimate, capacity_tokens=12, block_size=4, prefill_rate=64,
                        prefill_share=64, block_room=block_room)
        a = make_request("a", prompt_tokens=5, true_tokens=2)
        a.output_token_ids, a.num_computed_tokens = [1], 5
        gate.add(a)
        return gate.fits(make_request("b", prompt_tokens=4, true_tokens=2))

    assert not fits(block_room=True) and fits(block_room=False)


def test_s3_charges_the_room_once_a_queue_builds_and_s3_oracle_always():
    limits = StepLimits(capacity_tokens=64, block_size=4, prefill_rate=64, max_num_batched_tokens=64, max_num_seqs=8)
    s3 = make_scheduler("s3", short_queue=3).policy
    assert not s3.admission_gate([], limits, num_waiting=2).block_room  # a short queue: about as `paged` admits
    assert s3.admission_gate([], limits, num_waiting=3).block_room  # a queue: the room's margin again
    oracle = make_scheduler("s3-oracle", short_queue=3).policy
    assert oracle.admission_gate([], limits, num_waiting=0).block_room  # exact lengths keep the exact test


def test_s3_victim_is_the_least_computed():
    sched = make_scheduler("s3")
    a, b, c = (make_request(rid, bucket=0) for rid in "abc")
    a.num_computed_tokens, b.num_computed_tokens, c.num_computed_tokens = 9, 3, 6
    assert sched.choose_victim([a, b, c], a) is b


def _two_sharing_a_pool(wait_steps: int, *, lengths: dict[str, int]) -> tuple[list, object]:
    """"a" and "b" (4-token prompts, predicted at most 16 tokens) in a pool of 9 blocks of 4: both need a fifth
    block after 13 tokens, and only one is left."""
    sched = make_scheduler("s3", num_blocks=9, short_queue=0, wait_steps=wait_steps)
    for rid in "ab":
        sched.add_request(make_request(rid, bucket=0, max_new_tokens=32))
    steps = []
    run_until_done(sched, lengths, on_step=steps.append)
    return steps, sched


def test_s3_lets_a_sequence_short_of_a_block_wait_for_one_about_to_finish():
    # "a" (14 tokens) is expected to end within a few steps: "b" sits out one step instead of being preempted.
    steps, sched = _two_sharing_a_pool(16, lengths={"a": 14, "b": 30})
    assert sched.stats.num_preemptions == 0 and sched.stats.num_recomputed_tokens == 0
    assert [out.waited_request_ids for out in steps if out.waited_request_ids] == [["b"]]
    waited = next(out for out in steps if out.waited_request_ids)
    assert not waited.new_requests  # nobody is admitted while a sequence waits for memory
    # wait_steps = 0 is the old behaviour: the needy sequence yields at once and is recomputed.
    steps, sched = _two_sharing_a_pool(0, lengths={"a": 14, "b": 30})
    assert sched.stats.num_preemptions == 1 and not any(out.waited_request_ids for out in steps)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(probs_st, st.integers(0, 39), st.integers(0, 7)), min_size=2, max_size=40),
       st.lists(st.tuples(st.integers(0, 39), st.booleans()), min_size=1, max_size=20),
       st.sampled_from([0.1, 0.5, 0.9]))
def test_waiting_is_decided_as_the_product_over_the_others_says(sequences, asks, quantile):
    """Within a step every sequence short of a block asks whether another running one is likely to end soon; the
    policy answers most from one product over everyone, and each answer is the one the product over the others
    gives (victims leaving the running set between the questions)."""
    from serve.policies import make_policy

    policy = make_policy(PolicyConfig(policy="s3", quantile=quantile, wait_steps=8), BUCKETS)
    running = []
    for i, (probs, written, waited) in enumerate(sequences):
        request = make_request(str(i), bucket=0, max_new_tokens=40)
        request.prediction = LengthPrediction(bucket=0, probs=tuple(probs))
        request.output_token_ids = [1] * written
        request.num_waited_steps = waited
        running.append(request)
    policy.begin_step()
    for index, preempt in asks:
        if len(running) < 2:
            break
        needy = running[index % len(running)]
        steps_left = 8 - needy.num_waited_steps
        none_ends = 1.0
        for other in running:
            if other is not needy and not other.num_waited_steps:  # one sitting out makes no progress
                none_ends *= 1.0 - policy.estimator.finish_within(other, steps_left)
        assert policy.may_wait(needy, running) == (1.0 - none_ends >= quantile)
        if preempt:  # a victim leaves the running set
            running.remove(running[-1] if running[-1] is not needy else running[0])


def test_a_sequence_does_not_wait_on_one_that_is_itself_sitting_out():
    """Two sequences each about to end sat out waiting for the other: neither could end, and both stalled until
    wait_steps ran out."""
    from serve.policies import make_policy

    policy = make_policy(PolicyConfig(policy="s3", quantile=0.5, wait_steps=8), BUCKETS)
    a, b = (make_request(rid, bucket=0, true_tokens=5) for rid in "ab")
    for request in (a, b):
        request.prediction = LengthPrediction(bucket=0, probs=(1.0, 0.0, 0.0, 0.0))
        request.output_token_ids = [1] * 4
    policy.begin_step()
    assert policy.may_wait(b, [a, b])  # "a" is likely to end within the wait
    a.num_waited_steps = 1  # but "a" sits out too: it cannot end while it waits
    policy.begin_step()
    assert not policy.may_wait(b, [a, b])


def test_waiting_needs_a_chance_that_another_ends_even_at_quantile_zero():
    """q = 0 waited every time a block was short, also when no running sequence could end within the wait (exact
    lengths), and preempted after wait_steps anyway."""
    from serve.policies import make_policy

    for quantile in (0.0, 0.5):
        policy = make_policy(PolicyConfig(policy="s3-oracle", quantile=quantile, wait_steps=8), BUCKETS)
        far, near, needy = (make_request(rid, true_tokens=n) for rid, n in (("far", 30), ("near", 3), ("n", 30)))
        policy.begin_step()
        assert not policy.may_wait(needy, [far, needy])  # nobody can end within 8 steps
        policy.begin_step()
        assert policy.may_wait(needy, [near, needy])


def test_s3_stops_waiting_when_nobody_is_expected_to_finish_in_time():
    # "a" outruns its predicted bucket: after a few steps of waiting the chance it ends soon falls below q, and
    # "b" is preempted after all; it never waits longer than wait_steps in a row.
    steps, sched = _two_sharing_a_pool(16, lengths={"a": 30, "b": 30})
    assert sched.stats.num_preemptions == 1
    waits = sum(1 for out in steps if out.waited_request_ids)
    assert 0 < waits < 16
    steps, sched = _two_sharing_a_pool(2, lengths={"a": 30, "b": 30})
    assert sum(1 for out in steps if out.waited_request_ids) <= 2 and sched.stats.num_preemptions == 1


def test_when_every_running_sequence_would_wait_victims_are_taken():
    # Both need a fifth block in the same step of a pool of 8 and each expects the other to end: waiting would
    # leave the step empty, so one is preempted instead.
    sched = make_scheduler("s3", num_blocks=8, short_queue=0, wait_steps=16)
    for rid in "ab":
        sched.add_request(make_request(rid, bucket=0, max_new_tokens=28))
    steps = []
    run_until_done(sched, {"a": 20, "b": 20}, on_step=steps.append)
    assert all(out.seqs for out in steps) and sched.stats.num_preemptions >= 1


def test_quantile_zero_admits_what_fits_now_like_paged():
    # With any prior mass the shortest length still possible is one more token: q = 0 charges nothing ahead.
    for policy, kwargs in (("paged", {"watermark": 0.0}), ("s3", {"quantile": 0.0, "prior_weight": 0.05})):
        sched = make_scheduler(policy, num_blocks=12, **kwargs)
        for rid in "abc":
            sched.add_request(make_request(rid, bucket=1, max_new_tokens=32))
        assert len(sched.schedule().new_request_ids) == 3, policy


def test_a_trained_predictors_length_profile_fills_the_policy_knobs_it_leaves_unset():
    from types import SimpleNamespace

    from serve.policy_config import PolicyConfig, with_length_profile

    shape = within_bucket_shape(BUCKETS, [1, 2, 3], bins=2)
    trained = SimpleNamespace(length_prior=(0.7, 0.1, 0.1, 0.1), length_shape=shape)
    filled = with_length_profile(PolicyConfig(), trained)
    assert filled.bucket_prior == (0.7, 0.1, 0.1, 0.1) and filled.bucket_shape == shape
    own = PolicyConfig(bucket_prior=(1, 1, 1, 1))
    assert with_length_profile(own, trained).bucket_prior == (1.0, 1.0, 1.0, 1.0)
    assert with_length_profile(PolicyConfig(), object()) == PolicyConfig()  # a baseline predictor has none
