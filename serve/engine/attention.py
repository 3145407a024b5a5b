"""Paged attention over a flattened batch, plugged into transformers through its AttentionInterface.

The runner concatenates every sequence's new tokens into one batch-1 row with explicit position_ids and passes a
`PagedBatch` as the `paged_batch` keyword of the model's forward; transformers hands all extra keywords down to
the attention function of every layer. Per layer, the function writes the new tokens' K/V into the pool at their
slots, then copies each sequence's context blocks (cached + new tokens) back out through its block table:
- single-token sequences (decodes) come first in the batch, ordered by context length and cut into groups of
  similar length; each group is padded to its own longest context and attended in one batched SDPA call (a
  single group padded to the longest context made every short stream pay for a long prompt's context: four
  300-token streams beside a 3,800-token one cost about 8x the attention of each attending its own);
- multi-token sequences (prompt chunks) follow, attended one by one with a causal mask aligned to their position.
No mask is built by the model: transformers skips mask creation for implementations it has no mask function for.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from serve.engine.kv_pool import PagedKVPool
from serve.engine.plan import SequenceStep

ATTN_IMPLEMENTATION = "s3_paged"


@dataclasses.dataclass
class PrefillSpan:
    """A sequence computing several tokens this step."""

    token_start: int
    """Index of its first new token in the flattened batch."""
    num_tokens: int
    num_ctx_tokens: int
    """L = num_computed_tokens + num_tokens: its cached tokens followed by its new ones."""
    ctx_blocks: torch.Tensor
    """(ceil(L / block_size),) the blocks holding positions 0..L-1."""
    mask: torch.Tensor | None
    """(num_tokens, L) bool, True = may attend; None for a fresh prompt (nothing cached: plain causal over the
    step's own keys, and the pool is not read)."""


@dataclasses.dataclass
class DecodeGroup:
    """Single-token sequences of similar context length, attended in one batched call."""

    rows: slice
    """Their rows in the batch: a contiguous run, since `decodes_first` orders decodes by context length."""
    blocks: torch.Tensor
    """(Sg, B) blocks of each sequence's context, padded with block 0 to the group's longest context."""
    mask: torch.Tensor | None
    """(Sg, 1, 1, B * block_size) bool, False past each context's end; None when nothing is padded."""


@dataclasses.dataclass
class PagedBatch:
    """Per-step metadata shared by all layers; built once per step by `build_paged_batch`."""

    pool: PagedKVPool
    slot_ids: torch.Tensor
    """(T,) pool slot of every new token, in batch order."""
    num_decodes: int
    """Sd: the first Sd rows of the batch are single-token sequences (see `decodes_first`)."""
    decode_groups: list[DecodeGroup]
    """The Sd decodes cut into runs of similar context length, in batch order (empty when Sd = 0)."""
    prefills: list[PrefillSpan]


# Padding a decode group may waste before a new group starts, in context tokens per layer: about what one more
# gather + SDPA call costs. CPU: measured on SmolLM2's attention shapes (a call's fixed cost ~ 0.09 ms, one
# sequence's 3,800-token context ~ 0.8 ms). CUDA: not measured here; launches cost more than attending to
# padding there, so groups are cut only for large gaps.
MAX_DECODE_PAD_TOKENS = {"cpu": 512, "cuda": 8192}


def positions_to_slots(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Pool slots of token positions: block_table[pos // block_size] * block_size + pos % block_size."""
    return block_table[positions // block_size] * block_size + positions % block_size  # (P,)


def decodes_first(steps: list[SequenceStep]) -> list[SequenceStep]:
    """The batch order attention expects: single-token sequences first, so they are one contiguous slice, and
    among them shortest context first, so that sequences of similar length are neighbours (`group_by_length`)."""
    decodes = sorted((s for s in steps if len(s.token_ids) == 1), key=lambda s: s.num_tokens_after)
    return decodes + [s for s in steps if len(s.token_ids) != 1]


def group_by_length(lengths: list[int], block_size: int, max_pad_tokens: int) -> list[slice]:
    """Cut sorted context lengths into contiguous runs, each padded to its own longest context (in whole blocks),
    starting a new run where padding the current one to the next length would waste more than max_pad_tokens."""
    assert lengths == sorted(lengths), "decodes must be ordered by context length (decodes_first)"
    padded = [-(-n // block_size) * block_size for n in lengths]
    groups, start, total = [], 0, 0
    for i, n in enumerate(padded):
        if i > start and (i - start + 1) * n - (total + n) > max_pad_tokens:
            groups.append(slice(start, i))
            start, total = i, 0
        total += n
    return groups + [slice(start, len(lengths))] if lengths else groups


def build_paged_batch(
    steps: list[SequenceStep], pool: PagedKVPool, device: torch.device, *, max_pad_tokens: int | None = None
) -> PagedBatch:
    """Slots to write and blocks to read for one step, from each sequence's block table (in `decodes_first`
    order). max_pad_tokens: see `group_by_length`; default MAX_DECODE_PAD_TOKENS for the device."""
    bs = pool.block_size
    decode_slots, prefill_slots, prefills, decodes = [], [], [], []
    token_start = 0
    for step in steps:
        # Only the blocks holding tokens so far; the rest of the table is reserved room for future tokens.
        table = step.block_table[: -(-step.num_tokens_after // bs)]
        if len(step.token_ids) == 1:  # plain ints: a step has many decodes, and a tensor op each adds up
            assert not prefills, "single-token sequences must come first: order the plan with decodes_first()"
            position = step.num_computed_tokens
            decode_slots.append(table[position // bs] * bs + position % bs)
            decodes.append((table, step.num_tokens_after))
        else:
            table = torch.tensor(table, dtype=torch.long)
            new_pos = torch.arange(step.num_computed_tokens, step.num_tokens_after)
            prefill_slots.append(positions_to_slots(table, new_pos, bs))
            prefills.append(_prefill_span(step, table, token_start, device))
        token_start += len(step.token_ids)
    if max_pad_tokens is None:
        max_pad_tokens = MAX_DECODE_PAD_TOKENS.get(torch.device(device).type, MAX_DECODE_PAD_TOKENS["cuda"])
    groups = group_by_length([n for _, n in decodes], bs, max_pad_tokens)
    decode_groups = [_decode_group(decodes[rows], rows, bs, device) for rows in groups]
    slot_ids = torch.cat([torch.tensor(decode_slots, dtype=torch.long), *prefill_slots])
    return PagedBatch(pool, slot_ids.to(device), len(decodes), decode_groups, prefills)


def _prefill_span(step: SequenceStep, table: torch.Tensor, token_start: int, device) -> PrefillSpan:
    num_ctx = step.num_tokens_after
    mask = None
    if step.num_computed_tokens > 0:
        # Query i sits at position num_computed + i and sees keys 0..num_computed + i (bottom-right causal).
        q_pos = torch.arange(step.num_computed_tokens, num_ctx, device=device)
        mask = torch.arange(num_ctx, device=device)[None, :] <= q_pos[:, None]  # (n, L)
    return PrefillSpan(token_start, len(step.token_ids), num_ctx, table.to(device), mask)


def _decode_group(decodes: list, rows: slice, bs: int, device) -> DecodeGroup:
    tables, lengths = zip(*decodes)
    width = max(len(t) for t in tables)
    padded = torch.tensor([[*t, *[0] * (width - len(t))] for t in tables], dtype=torch.long)  # (Sg, B)
    mask = None
    if any(n != padded.shape[1] * bs for n in lengths):
        positions = torch.arange(padded.shape[1] * bs)
        mask = (positions[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :].to(device)
    return DecodeGroup(rows, padded.to(device), mask)


def gather_blocks(pool_layer: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Copy whole blocks out of one layer's pool: (num_blocks, bs, KVH, hd), (*, B) -> (*, B * bs, KVH, hd).

    Copying block_size * KVH * hd contiguous elements at a time is several times faster than gathering slots.
    """
    out = pool_layer.index_select(0, blocks.reshape(-1))  # (N * B, bs, KVH, hd)
    return out.view(*blocks.shape[:-1], -1, *pool_layer.shape[2:])


def paged_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface entry: query (1, H, T, hd), key/value (1, KVH, T, hd) -> output (1, T, H, hd)."""
    batch: PagedBatch | None = kwargs.get("paged_batch")
    if batch is None:
        raise ValueError(f"'{ATTN_IMPLEMENTATION}' attention needs paged_batch=...; run the model through ModelRunner")
    assert query.shape[0] == 1, "the paged batch is flattened into one row"
    k_pool, v_pool = batch.pool.k[module.layer_idx], batch.pool.v[module.layer_idx]  # (blocks, bs, KVH, hd)
    assert k_pool.shape[2] == key.shape[1], f"pool holds {k_pool.shape[2]} KV heads, layer computes {key.shape[1]}"
    # (1, KVH, T, hd) -> (T, KVH, hd), written in place: the only copy of new K/V into the cache.
    k_flat, v_flat = batch.pool.flat(module.layer_idx)  # (num_slots, KVH, hd) views
    k_flat.index_copy_(0, batch.slot_ids, key[0].transpose(0, 1))
    v_flat.index_copy_(0, batch.slot_ids, value[0].transpose(0, 1))

    q = query[0].transpose(0, 1)  # (T, H, hd)
    # Pieces in batch order: each decode group's rows, then each prompt chunk's rows.
    pieces = [_decode_attention(q[group.rows], k_pool, v_pool, group, scaling) for group in batch.decode_groups]
    for span in batch.prefills:
        rows = slice(span.token_start, span.token_start + span.num_tokens)
        if span.mask is None:  # a fresh prompt: its whole context is this step's keys, no need to read the pool
            kv = key[0, :, rows], value[0, :, rows]  # (KVH, n, hd) each
        else:
            kv = _read_context(k_pool, span), _read_context(v_pool, span)  # (KVH, L, hd) each
        pieces.append(_prefill_attention(q[rows], *kv, span.mask, scaling))
    out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)  # (T, H, hd)
    return out.unsqueeze(0), None


def _decode_attention(q, k_pool, v_pool, group: DecodeGroup, scaling) -> torch.Tensor:
    """q (Sg, H, hd) -> (Sg, H, hd), each query attending over its own context, padded to the group's longest."""
    k = gather_blocks(k_pool, group.blocks).transpose(1, 2)  # (Sg, L, KVH, hd) -> (Sg, KVH, L, hd)
    v = gather_blocks(v_pool, group.blocks).transpose(1, 2)
    # The G = H / KVH query heads sharing a KV head attend as G query rows of that head: no copy of K/V per
    # query head (query head h reads KV head h // G, as with enable_gqa).
    num_seqs, num_heads, head_dim = q.shape
    o = F.scaled_dot_product_attention(
        q.view(num_seqs, k.shape[1], -1, head_dim), k, v, attn_mask=group.mask, scale=scaling
    )  # (Sg, KVH, G, hd)
    return o.reshape(num_seqs, num_heads, head_dim)


def _read_context(pool_layer: torch.Tensor, span: PrefillSpan) -> torch.Tensor:
    """(KVH, L, hd): the sequence's cached and new tokens, read back from the pool."""
    return gather_blocks(pool_layer, span.ctx_blocks)[: span.num_ctx_tokens].transpose(0, 1)


def _prefill_attention(q, k, v, mask: torch.Tensor | None, scaling) -> torch.Tensor:
    """q (n, H, hd), k/v (KVH, L, hd) -> (n, H, hd); causal (bottom-right aligned when mask is given)."""
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),  # (1, H, n, hd)
        k.unsqueeze(0),
        v.unsqueeze(0),
        attn_mask=mask,
        is_causal=mask is None,
        scale=scaling,
        enable_gqa=True,
    )  # (1, H, n, hd)
    return o[0].transpose(0, 1)


def register_paged_attention() -> str:
    """Register the function with transformers (idempotent); returns the attn_implementation name."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
    return ATTN_IMPLEMENTATION
