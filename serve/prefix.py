"""Prefix caching as the scheduler sees it (the pool keeps the blocks, `serve.kv.BlockPool`): which cached blocks a
request may start on, which blocks running sequences are still computing, and which blocks a sequence shares with
others, for the peak test to charge each block once. Torch-free."""

from __future__ import annotations

from typing import Iterable, Sequence

from core.request import Request, RequestStatus
from serve.kv import BlockPool


def lookup_keys(pool: BlockPool, request: Request) -> list[bytes] | None:
    """The content keys of the full blocks ``request`` may find cached; None when it may not look (no prefix
    caching, or a request that asks for its prompt's log-probabilities, which come from computing the prompt).
    Its last token is always computed: its logits pick the next one."""
    if not pool.prefix_caching or getattr(request.sampling, "prompt_logprobs", None) is not None:
        return None
    return pool.block_keys(request.request_id, request.all_token_ids()[:-1])


def keys_in_progress(pool: BlockPool, running: Iterable[Request]) -> set[bytes]:
    """The content keys of the full blocks ``running`` sequences have yet to compute: a request whose next uncached
    block is one of them waits for it rather than computing it a second time at once (as SGLang's in-batch prefix
    check), so that a burst of requests over one system prompt computes it once."""
    keys: set[bytes] = set()
    for r in running:
        if r.num_tokens - r.num_computed_tokens > 1:  # still prefilling (decodes file each block as it fills)
            keys.update(pool.block_keys(r.request_id, r.all_token_ids())[pool.num_filed(r.request_id):])
    return keys


def shared_blocks(pool: BlockPool, request: Request) -> Sequence[int]:
    """The blocks ``request`` holds that others may share (running: those computed and filed), or the cached
    prefix it would start on (about to be admitted), for the peak test to charge each block once."""
    if request.status == RequestStatus.RUNNING:
        return pool.block_table(request.request_id)[: pool.num_filed(request.request_id)]
    return pool.cached_prefix(request.request_id, request.all_token_ids()[: request.num_computed_tokens])
