"""Request priorities (vLLM's ``priority``, lower first): waiting requests are tried by priority, then in the policy's
order; victims come from the least urgent running sequences."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fakes import make_request, make_scheduler, run_until_done


def _request(request_id, priority=0, **kwargs):
    request = make_request(request_id, **kwargs)
    request.priority = priority
    return request


@pytest.mark.parametrize("policy", ["max", "paged", "s3", "s3-reserve", "s3-oracle"])
def test_the_most_urgent_waiting_request_goes_first(policy):
    sched = make_scheduler(policy, num_blocks=64, max_num_seqs=1)
    sched.add_request(_request("early", arrival_time=0.0, bucket=0, true_tokens=4, max_new_tokens=64))
    sched.add_request(_request("urgent", priority=-1, arrival_time=1.0, bucket=3, true_tokens=60, max_new_tokens=64))
    assert sched.schedule().new_request_ids == ["urgent"]


def test_within_a_priority_the_policy_orders():
    # s3 takes the shortest predicted work first inside each class: "short" before "long" at priority 0,
    # and both after the urgent class.
    sched = make_scheduler("s3", num_blocks=64, max_num_seqs=1)
    sched.add_request(_request("long", bucket=3, max_new_tokens=64))
    sched.add_request(_request("short", bucket=0, max_new_tokens=64))
    sched.add_request(_request("urgent-long", priority=-5, bucket=3, max_new_tokens=64, arrival_time=2.0))
    order = []
    run_until_done(sched, {"long": 40, "short": 5, "urgent-long": 40},
                   on_step=lambda out: order.extend(out.new_request_ids))
    assert order == ["urgent-long", "short", "long"]


@pytest.mark.parametrize("policy", ["paged", "s3"])
def test_a_victim_is_taken_from_the_least_urgent(policy):
    # A pool of 8 blocks of 4 tokens: "background" (priority 1) is admitted first, "urgent" (priority 0) after it.
    # Both grow until the pool runs out; `paged` would preempt the last admitted ("urgent"), `s3` the one with
    # the least computed; with priorities the background request yields.
    sched = make_scheduler(policy, num_blocks=8, max_num_seqs=2, watermark=0.0, quantile=0.0)
    sched.add_request(_request("background", priority=1, prompt_tokens=4, max_new_tokens=24))
    sched.schedule()
    sched.add_request(_request("urgent", priority=0, prompt_tokens=4, max_new_tokens=24, arrival_time=1.0))
    finished = run_until_done(sched, {"background": 24, "urgent": 24})
    requests = {r.request_id: r for r in finished}
    assert requests["urgent"].num_preemptions == 0 and requests["background"].num_preemptions > 0


def test_a_request_yields_only_to_one_at_least_as_urgent():
    # The urgent request is alone in its class: short of memory itself, it takes a victim from the other class;
    # a background request short of memory never takes the urgent one's blocks.
    sched = make_scheduler("paged", num_blocks=8, max_num_seqs=2, watermark=0.0)
    sched.add_request(_request("urgent", priority=-1, prompt_tokens=4, max_new_tokens=24))
    sched.add_request(_request("background", priority=0, prompt_tokens=4, max_new_tokens=24))
    finished = run_until_done(sched, {"background": 24, "urgent": 24})
    assert {r.request_id: r.num_preemptions for r in finished}["urgent"] == 0


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), policy=st.sampled_from(["max", "paged", "s3", "s3-reserve"]))
def test_mixed_priorities_under_memory_pressure_all_finish(seed, policy):
    """Random priorities, a pool small enough to preempt, prefills chunked or not: the invariants hold every step, every request ends at
    its length, and the most urgent class is never preempted by a less urgent one (it may yield to its own)."""
    rng = random.Random(seed)
    sched = make_scheduler(policy, num_blocks=rng.randint(10, 20), block_size=4, max_num_seqs=4,
                           max_num_batched_tokens=16, long_prefill_token_threshold=rng.choice([0, 4]))
    lengths = {}
    for i in range(12):
        request = _request(str(i), priority=rng.choice([-1, 0, 0, 2]), prompt_tokens=rng.randint(1, 12),
                           max_new_tokens=16, arrival_time=float(i), bucket=rng.randint(0, 2))
        lengths[str(i)] = rng.randint(1, 16)
        sched.add_request(request)
    finished = run_until_done(sched, lengths)
    assert sorted(r.request_id for r in finished) == sorted(lengths)
    assert all(r.num_output_tokens == lengths[r.request_id] for r in finished)
    urgent = [r for r in finished if r.priority == -1]
    if len(urgent) == 1:
        assert urgent[0].num_preemptions == 0


@pytest.mark.parametrize("policy, priorities", [("s3", (0, 0)), ("s3", (-1, 0)), ("paged", (-1, 0))])
def test_a_sequence_still_prefilling_takes_its_victim_among_those_decoding(policy, priorities):
    """A 48-token prompt prefilled 8 tokens a step beside one decoding answer, in a pool of 14 blocks: short of a
    block with 40 tokens computed, it preempts the decoding answer (14 computed; already scheduled this step, so
    taken back out of it), which is both `s3`'s least computed and, where the prompt is more urgent, the least
    urgent. It used to preempt itself (victims came only from the sequences after it in the step's order)."""
    sched = make_scheduler(policy, num_blocks=14, max_num_seqs=2, max_num_batched_tokens=16,
                           long_prefill_token_threshold=8, quantile=0.0, wait_steps=0, watermark=0.0)
    sched.add_request(_request("decoding", priority=priorities[1], prompt_tokens=4, max_new_tokens=40, bucket=3))
    steps = []

    def arrive(out):
        steps.append(out)
        if len(steps) == 6:
            sched.add_request(_request("prefilling", priority=priorities[0], prompt_tokens=48, max_new_tokens=4,
                                       bucket=0, arrival_time=6.0))

    finished = run_until_done(sched, {"decoding": 40, "prefilling": 4}, on_step=arrive)
    preempted = [out.preempted_request_ids for out in steps if out.preempted_request_ids]
    assert preempted[0] == ["decoding"]
    assert {r.request_id: r.num_preemptions for r in finished}["prefilling"] == 0
    step = next(out for out in steps if out.preempted_request_ids)
    assert "decoding" not in {seq.request_id for seq in step.seqs}  # taken back out of the step it was in
