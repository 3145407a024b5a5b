"""Prefix caching: full KV blocks filed under their content, shared by requests whose tokens begin alike, kept
after their last holder ends until their memory is needed."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.request import Request
from serve.kv import BlockPool
from tests.fakes import make_scheduler, run_until_done


def _filled(pool: BlockPool, request_id: str, tokens: list[int]) -> list[int]:
    """A request that computed ``tokens``: its blocks allocated and the full ones filed."""
    pool.allocate(request_id, len(tokens))
    pool.cache_full_blocks(request_id, tokens, len(tokens))
    return pool.block_table(request_id)


def test_full_blocks_are_found_by_the_prefix_they_hold():
    pool = BlockPool(num_blocks=8, block_size=4, prefix_caching=True)
    tokens = list(range(10))  # two full blocks and a partial one
    table = _filled(pool, "a", tokens)
    assert pool.num_cached_blocks == 2
    assert pool.cached_prefix("a", tokens) == table[:2]
    assert pool.cached_prefix("seven", tokens[:7]) == table[:1]  # only whole blocks match
    assert pool.cached_prefix("look1", [0, 1, 2, 3, 9, 9, 9, 9]) == table[:1]  # the second block differs
    assert pool.cached_prefix("look2", [9, 1, 2, 3, 4, 5, 6, 7]) == []
    # A block's key is its content and everything before it: the same four tokens after another block differ.
    assert pool.cached_prefix("look3", [4, 5, 6, 7]) == []
    pool.check()


def test_a_salt_keys_blocks_apart():
    pool = BlockPool(num_blocks=8, block_size=4, prefix_caching=True)
    tokens = list(range(8))
    table = _filled(pool, "plain", tokens)
    pool.salt("a1", "tenant-a")
    assert pool.cached_prefix("a1", tokens) == []  # salted: the unsalted blocks are not found
    pool.salt("a2", "tenant-a")
    salted = _filled(pool, "a2", tokens)
    pool.salt("a3", "tenant-a")
    pool.salt("b", "tenant-b")
    assert pool.cached_prefix("a3", tokens) == salted[:2] and pool.cached_prefix("b", tokens) == []
    assert pool.cached_prefix("again", tokens) == table[:2]
    pool.check()


def test_shared_blocks_are_counted_once_and_outlive_their_holders_until_needed():
    pool = BlockPool(num_blocks=6, block_size=4, prefix_caching=True)
    tokens = list(range(9))
    table = _filled(pool, "a", tokens)  # 3 blocks, 2 filed
    cached = pool.cached_prefix("a", tokens)
    assert pool.num_reclaimed(cached) == 0  # "a" holds them
    pool.share("b", cached)
    assert pool.allocate("b", 9) == [pool.block_table("b")[2]] and pool.block_table("b")[:2] == table[:2]
    assert [pool.num_holders(b) for b in table[:2]] == [2, 2] and pool.num_used_blocks == 4
    pool.check()
    pool.free("a")
    assert pool.num_used_blocks == 3  # a's private last block went back; the shared two stay with "b"
    pool.free("b")
    assert pool.num_free_blocks == 6 and pool.num_used_blocks == 0  # cached blocks nobody holds count as free
    assert pool.cached_prefix("a", tokens) == table[:2]  # ... and are still found
    assert pool.num_reclaimed(table[:2]) == 2
    pool.check()
    # Taking the whole pool evicts them: the last block of a request first, the least recently released first.
    assert pool.allocate("c", 20) is not None and pool.cached_prefix("a", tokens) == table[:1]
    assert pool.allocate("d", 4) is not None and pool.cached_prefix("a", tokens) == [] and pool.num_cached_blocks == 0
    pool.check()


def test_a_block_computed_twice_stays_private():
    pool = BlockPool(num_blocks=4, block_size=4, prefix_caching=True)
    a, b = _filled(pool, "a", [1, 2, 3, 4]), _filled(pool, "b", [1, 2, 3, 4])
    assert pool.cached_prefix("look4", [1, 2, 3, 4]) == a and a != b
    pool.free("b")
    assert pool.num_cached_blocks == 1 and pool.num_free_blocks == 3
    pool.check()


def test_without_prefix_caching_nothing_is_filed():
    pool = BlockPool(num_blocks=4, block_size=4)
    _filled(pool, "a", [1, 2, 3, 4])
    pool.free("a")
    assert pool.cached_prefix("look5", [1, 2, 3, 4]) == [] and pool.num_cached_blocks == 0


def _request(request_id: str, prompt: list[int], max_new_tokens: int = 8, **kwargs) -> Request:
    return Request(request_id, prompt, max_new_tokens=max_new_tokens, prompt=request_id, **kwargs)


def test_a_repeated_prompt_computes_only_its_last_token_and_what_was_not_cached():
    scheduler = make_scheduler("paged", num_blocks=32, block_size=4, watermark=0.0, enable_prefix_caching=True)
    system = list(range(1, 13))  # three blocks of "system prompt"
    scheduler.add_request(_request("first", system + [50, 51]))
    run_until_done(scheduler, {"first": 3})
    starts = []
    scheduler.add_request(_request("same", system + [50, 51]))
    scheduler.add_request(_request("other", system + [60, 61, 62, 63, 64]))
    scheduler.add_request(_request("exact", system))  # all cached: its last token is computed again
    run_until_done(scheduler, {"same": 3, "other": 3, "exact": 3},
                   on_step=lambda out: starts.extend((s.request_id, s.start) for s in out.seqs
                                                     if s.request_id in out.new_request_ids))
    assert dict(starts) == {"same": 12, "other": 12, "exact": 8}
    assert [scheduler.requests[r].num_cached_tokens for r in ("same", "other", "exact")] == [12, 12, 8]
    stats = scheduler.stats
    assert stats.num_prefix_hit_tokens == 32 and stats.num_prefix_query_tokens == 13 + 13 + 16 + 11
    assert scheduler.pool.num_free_blocks == scheduler.pool.num_blocks


def test_requests_that_ask_for_prompt_log_probabilities_compute_the_whole_prompt():
    class Sampling:
        prompt_logprobs = 0

    scheduler = make_scheduler("paged", num_blocks=32, block_size=4, enable_prefix_caching=True)
    prompt = list(range(1, 10))
    scheduler.add_request(_request("a", prompt))
    run_until_done(scheduler, {"a": 2})
    scheduler.add_request(_request("b", prompt, sampling=Sampling()))
    out = scheduler.schedule()
    assert [(s.request_id, s.start) for s in out.seqs] == [("b", 0)] and scheduler.requests["b"].num_cached_tokens == 0


def test_a_preempted_request_resumes_on_its_own_cached_blocks():
    # 6 blocks of 4: two 8-token prompts growing to 20 tokens each cannot both finish; one is preempted, and on
    # its return finds the full blocks it had written (the other's growth took none of them back: free blocks
    # go first).
    scheduler = make_scheduler("paged", num_blocks=9, block_size=4, watermark=0.0, enable_prefix_caching=True)
    scheduler.add_request(_request("a", list(range(1, 9)), max_new_tokens=16))
    scheduler.add_request(_request("b", list(range(20, 28)), max_new_tokens=16))
    readmitted = []
    run_until_done(scheduler, {"a": 16, "b": 16},
                   on_step=lambda out: readmitted.extend((s.request_id, s.start) for s in out.seqs
                                                         if s.request_id in out.new_request_ids))
    assert scheduler.stats.num_preemptions >= 1
    resumed = readmitted[2:]
    assert resumed and all(start > 0 for _, start in resumed), readmitted
    assert scheduler.stats.num_prefix_hit_tokens > 0


@pytest.mark.parametrize("policy", ["paged", "s3", "max", "s3-reserve"])
def test_every_policy_shares_a_system_prompt(policy):
    scheduler = make_scheduler(policy, num_blocks=64, block_size=4, enable_prefix_caching=True)
    system = list(range(1, 17))
    scheduler.add_request(_request("warm", system + [99], max_new_tokens=4))
    run_until_done(scheduler, {"warm": 2})
    for i in range(4):
        scheduler.add_request(_request(f"r{i}", system + [40 + i, 50 + i], max_new_tokens=4))
    run_until_done(scheduler, {f"r{i}": 3 for i in range(4)})
    assert [scheduler.requests[f"r{i}"].num_cached_tokens for i in range(4)] == [16] * 4


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), policy=st.sampled_from(["paged", "s3", "max"]))
def test_shared_prefixes_under_memory_pressure_keep_the_pool_whole(seed, policy):
    """Requests over a few shared prefixes, in a pool small enough to preempt and evict: the invariants hold every
    step (run_until_done checks them), every request ends at its length, and nothing leaks."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(1, 50) for _ in range(rng.randint(0, 12))] for _ in range(3)]
    scheduler = make_scheduler(policy, num_blocks=rng.randint(12, 24), block_size=4, max_num_seqs=4,
                               max_num_batched_tokens=16, enable_prefix_caching=True)
    lengths = {}
    for i in range(12):
        prompt = rng.choice(prefixes) + [rng.randrange(1, 50) for _ in range(rng.randint(1, 6))]
        lengths[str(i)] = rng.randint(1, 12)
        scheduler.add_request(_request(str(i), prompt, max_new_tokens=12, arrival_time=float(i)))
    finished = run_until_done(scheduler, lengths)
    assert sorted(r.request_id for r in finished) == sorted(lengths)
    assert all(r.num_output_tokens == lengths[r.request_id] for r in finished)


def test_the_projected_peak_charges_a_shared_prefix_once():
    """Six requests over a 32-token prefix already cached, each to write 8 tokens: 11 blocks each alone, 3 each
    beside 8 shared. With exact lengths the peak test lets all six in at once, as the pool (40 blocks) holds them."""
    from core.request import LengthPrediction

    prefix = list(range(1, 33))
    scheduler = make_scheduler("s3-oracle", num_blocks=40, block_size=4, enable_prefix_caching=True,
                               max_num_batched_tokens=64)
    scheduler.add_request(_request("warm", prefix + [99], max_new_tokens=8,
                                   prediction=LengthPrediction(bucket=0, num_tokens=1)))
    run_until_done(scheduler, {"warm": 1})
    for i in range(6):
        scheduler.add_request(_request(f"r{i}", prefix + [40 + i], max_new_tokens=8,
                                       prediction=LengthPrediction(bucket=0, num_tokens=8)))
    steps = []
    run_until_done(scheduler, {f"r{i}": 8 for i in range(6)}, on_step=steps.append)
    assert len(steps[0].new_requests) == 6 and all(s.start == 32 for s in steps[0].seqs)
    assert scheduler.stats.num_preemptions == 0


@pytest.mark.parametrize("chunk", [0, 8])
def test_a_burst_over_one_prefix_computes_it_once(chunk):
    """Four requests over one 32-token prefix, all waiting at once: the first computes the prefix (in chunks of 8
    tokens, or at once), and the others, rather than computing it beside it, wait until it is cached."""
    prefix = list(range(1, 33))
    scheduler = make_scheduler("paged", num_blocks=64, block_size=4, max_num_batched_tokens=64,
                               long_prefill_token_threshold=chunk, enable_prefix_caching=True)
    for i in range(4):
        scheduler.add_request(_request(f"r{i}", prefix + [40 + i], max_new_tokens=4))
    run_until_done(scheduler, {f"r{i}": 2 for i in range(4)})
    assert [scheduler.requests[f"r{i}"].num_cached_tokens for i in range(4)] == [0, 32, 32, 32]
    assert scheduler.stats.num_batched_tokens == 33 + 3 * 1 + 4 * 1  # prompts, then each one's second token
