"""KV-cache accounting: a pool of fixed-size blocks and each sequence's block table.

Pure bookkeeping, no tensors: the engine's KV tensors are indexed by the block ids handed out here,
and the simulator uses the same pool to count memory. Allocation says "does not fit" by returning None
and changes nothing in that case; freeing is explicit.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class KVSpec:
    """The KV-cache geometry of a model, enough to turn a byte budget into tokens."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int = 2
    """Bytes per element: 2 for fp16/bf16, 4 for fp32."""
    tensor_parallel: int = 1
    """Each rank holds 1/tensor_parallel of the KV heads, so a per-device budget holds that many more tokens."""

    @property
    def bytes_per_token(self) -> float:
        """Per-device bytes for one token: layers x (K and V) x kv heads x head dim x dtype size / TP degree."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes / self.tensor_parallel

    def num_blocks(self, budget_bytes: float, block_size: int) -> int:
        """How many blocks of ``block_size`` tokens fit in ``budget_bytes`` per device."""
        if budget_bytes <= 0:
            raise ValueError(f"the KV budget must be positive, got {budget_bytes} bytes")
        return int(budget_bytes // (self.bytes_per_token * block_size))


def blocks_for(num_tokens: int, block_size: int) -> int:
    return math.ceil(num_tokens / block_size)


class BlockPool:
    """A fixed pool of KV blocks; each request owns a block table (the list of its block ids)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # A stack: recently freed blocks are handed out first (warm in cache on a real device).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def block_table(self, request_id: str) -> list[int]:
        """The request's blocks in order; token ``i`` lives in block ``table[i // block_size]``."""
        return self._tables.get(request_id, [])

    def num_blocks_held(self, request_id: str) -> int:
        return len(self._tables.get(request_id, ()))

    def num_new_blocks(self, request_id: str, num_tokens: int) -> int:
        """Blocks to add so that the request's table covers ``num_tokens`` tokens."""
        return max(0, blocks_for(num_tokens, self.block_size) - self.num_blocks_held(request_id))

    def allocate(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Grow the request's table to cover ``num_tokens`` tokens.

        Returns the newly added block ids (possibly none), or None when they do not fit; on None
        nothing has changed.
        """
        num_new = self.num_new_blocks(request_id, num_tokens)
        if num_new > len(self._free):
            return None
        if num_new == 0:
            self._tables.setdefault(request_id, [])
            return []
        new_blocks = self._free[-num_new:]
        del self._free[-num_new:]
        self._tables.setdefault(request_id, []).extend(new_blocks)
        return new_blocks

    def free(self, request_id: str) -> int:
        """Return all of the request's blocks to the pool; returns how many."""
        blocks = self._tables.pop(request_id, [])
        self._free.extend(reversed(blocks))
        return len(blocks)

    def check(self) -> None:
        """Internal invariant: every block is either free or in exactly one table."""
        held = [b for table in self._tables.values() for b in table]
        assert len(held) + len(self._free) == self.num_blocks, (len(held), len(self._free), self.num_blocks)
        assert len(set(held) | set(self._free)) == self.num_blocks, "a block is in two places"
