"""Decodes attended in groups of similar context length: the same outputs as attending each sequence alone,
however the decodes are grouped, and the same greedy tokens as generate() with very different context lengths
decoding together."""

from __future__ import annotations

import random

import pytest
import torch
from engine_driver import EngineDriver, reference_greedy, tiny_llama

import serve.engine.attention as attention
from serve.engine.attention import build_paged_batch, decodes_first, group_by_length, paged_attention_forward
from serve.engine.kv_pool import PagedKVPool
from serve.engine.plan import SequenceStep
from serve.engine.runner import ModelRunner

H, KVH, HD, BS = 6, 2, 8, 4  # query heads, KV heads, head dim, block size


def test_group_by_length_cuts_where_padding_would_cost_more_than_the_budget():
    assert group_by_length([], 16, 512) == []
    assert group_by_length([5], 16, 0) == [slice(0, 1)]
    # Same length in whole blocks: no padding, one group whatever the budget.
    assert group_by_length([17, 20, 32], 16, 0) == [slice(0, 3)]
    # Four short streams and one long context: the long one alone instead of padding the four to it.
    assert group_by_length([300, 300, 301, 310, 3800], 16, 512) == [slice(0, 4), slice(4, 5)]
    assert group_by_length([300, 300, 301, 310, 3800], 16, 10**9) == [slice(0, 5)]
    assert group_by_length([16, 32, 48, 64], 16, 0) == [slice(i, i + 1) for i in range(4)]
    # Waste within a group stays within the budget.
    lengths = sorted(random.Random(0).randint(1, 4000) for _ in range(200))
    for rows in group_by_length(lengths, 16, 512):
        padded = [-(-n // 16) * 16 for n in lengths[rows]]
        assert len(padded) * max(padded) - sum(padded) <= 512
    with pytest.raises(AssertionError, match="ordered by context length"):
        group_by_length([10, 5], 16, 512)


def test_decodes_first_orders_decodes_by_context_length():
    steps = [SequenceStep("long", [1], 99, []), SequenceStep("chunk", [1, 2], 0, []),
             SequenceStep("short", [1], 3, []), SequenceStep("mid", [1], 40, [])]
    assert [s.request_id for s in decodes_first(steps)] == ["short", "mid", "long", "chunk"]


class _Layer(torch.nn.Module):
    layer_idx = 0


def _reference(q, pool: PagedKVPool, step: SequenceStep) -> torch.Tensor:
    """One sequence's attention done plainly: its context slot by slot, K/V repeated per query head."""
    positions = torch.arange(step.num_tokens_after)
    slots = attention.positions_to_slots(torch.tensor(step.block_table), positions, BS)
    k_flat, v_flat = pool.flat(0)
    k = k_flat[slots].transpose(0, 1).repeat_interleave(H // KVH, 0)  # (H, L, hd)
    v = v_flat[slots].transpose(0, 1).repeat_interleave(H // KVH, 0)
    n = len(step.token_ids)
    q = q.transpose(0, 1)  # (H, n, hd)
    scores = q @ k.transpose(1, 2) / HD**0.5  # (H, n, L)
    causal = positions[None, :] <= (positions[-n:])[:, None]  # (n, L)
    return (scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v).transpose(0, 1)  # (n, H, hd)


@pytest.mark.parametrize("max_pad_tokens", [0, 8, 64, 10**9])
def test_grouped_decodes_equal_each_sequence_attended_alone(max_pad_tokens):
    """Decodes of mixed context lengths (1 to 150 tokens) plus a prompt chunk, in one step: every row equals the
    sequence attended alone, whether the decodes form one padded group, one group per length or anything between."""
    gen = torch.Generator().manual_seed(0)
    pool = PagedKVPool(1, 128, BS, num_kv_heads=KVH, head_dim=HD)
    for t in pool.k + pool.v:
        t.normal_(0, 1, generator=gen)
    free = torch.randperm(128, generator=gen).tolist()  # scattered blocks, as a real pool's tables are

    def step(request_id, num_cached, num_new):
        table = [free.pop() for _ in range(-(-(num_cached + num_new) // BS))]
        return SequenceStep(request_id, [7] * num_new, num_cached, table)

    steps = [step("a", 149, 1), step("b", 0, 1), step("c", 9, 1), step("d", 40, 1), step("e", 10, 1),
             step("chunk", 20, 5), step("f", 99, 1), step("g", 3, 1)]  # fmt: skip
    order = decodes_first(steps)
    batch = build_paged_batch(order, pool, torch.device("cpu"), max_pad_tokens=max_pad_tokens)
    if max_pad_tokens == 0:
        assert len(batch.decode_groups) == 5  # contexts 1 and 4 (one block), 10 and 11 (3 blocks), 41, 100, 150
    if max_pad_tokens == 10**9:
        assert len(batch.decode_groups) == 1
    num_tokens = sum(len(s.token_ids) for s in order)
    query = torch.randn(1, H, num_tokens, HD, generator=gen)
    key, value = torch.randn(2, 1, KVH, num_tokens, HD, generator=gen)
    out, _ = paged_attention_forward(_Layer(), query, key, value, None, scaling=HD**-0.5, paged_batch=batch)
    row = 0
    for s in order:  # the forward wrote every new K/V into the pool, so the reference reads it there
        rows = slice(row, row + len(s.token_ids))
        torch.testing.assert_close(out[0, rows], _reference(query[0, :, rows].transpose(0, 1), pool, s),
                                   rtol=1e-5, atol=1e-5, msg=s.request_id)
        row = rows.stop


@pytest.mark.parametrize("max_pad_tokens", [0, 16, 10**9])
def test_greedy_tokens_unchanged_with_very_different_context_lengths(monkeypatch, max_pad_tokens):
    """A 300-token context decoding beside 1- to 40-token ones gives generate()'s tokens, grouped or not."""
    monkeypatch.setitem(attention.MAX_DECODE_PAD_TOKENS, "cpu", max_pad_tokens)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 128, (n,), generator=gen).tolist() for n in (300, 1, 9, 40, 2, 120)]
    reference = reference_greedy(tiny_llama(), prompts, 10)
    sched = EngineDriver(ModelRunner(tiny_llama(), num_blocks=160, block_size=BS), chunk_tokens=64)
    for i, p in enumerate(prompts):
        sched.add(str(i), p, 10)
    sched.run()
    assert [sched.output(str(i)) for i in range(len(prompts))] == reference
