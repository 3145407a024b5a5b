"""KV-cache accounting: a pool of fixed-size blocks and each sequence's block table.

Pure bookkeeping, no tensors: the engine's KV tensors are indexed by the block ids handed out here,
and the simulator uses the same pool to count memory. Allocation says "does not fit" by returning None
and changes nothing in that case; freeing is explicit.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import hashlib
import math
from typing import Sequence


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
    """A fixed pool of KV blocks; each request owns a block table (the list of its block ids).

    With ``prefix_caching`` a block, once full, is also filed under its content (the hash of its tokens and of
    every token before it), and requests whose tokens start the same way share it (`cached_prefix`, `share`):
    a block counts its holders and returns to the pool when the last one lets go. A cached block nobody holds
    stays cached until its memory is needed (least recently released first), so it is free for accounting
    (`num_free_blocks`) and still found by the next request with that prefix. Blocks of the same content are
    the same KV entries only for one model: a pool serves one.
    """

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        # A stack: recently freed blocks are handed out first (warm in cache on a real device).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[str, list[int]] = {}
        self._holders = [0] * num_blocks
        # Prefix caching: content key -> block, its inverse, and the cached blocks nobody holds, oldest first.
        self._cached: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._chains: dict[str, list[bytes]] = {}  # request -> the content keys of its full blocks (see _chain)
        self._salts: dict[str, bytes] = {}  # request -> what its first key starts from (see `salt`)
        self._num_filed: dict[str, int] = {}  # request -> how many of its table's first blocks were filed

    @property
    def num_free_blocks(self) -> int:
        """Blocks a request could take now: unused ones, and cached ones nobody holds (evicted on demand)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by at least one request."""
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks filed under their content (held or not)."""
        return len(self._cached)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def block_table(self, request_id: str) -> list[int]:
        """The request's blocks in order; token ``i`` lives in block ``table[i // block_size]``."""
        return self._tables.get(request_id, [])

    def num_blocks_held(self, request_id: str) -> int:
        return len(self._tables.get(request_id, ()))

    def num_holders(self, block_id: int) -> int:
        return self._holders[block_id]

    def num_new_blocks(self, request_id: str, num_tokens: int) -> int:
        """Blocks to add so that the request's table covers ``num_tokens`` tokens."""
        return max(0, blocks_for(num_tokens, self.block_size) - self.num_blocks_held(request_id))

    def allocate(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Grow the request's table to cover ``num_tokens`` tokens.

        Returns the newly added block ids (possibly none), or None when they do not fit; on None
        nothing has changed.
        """
        num_new = self.num_new_blocks(request_id, num_tokens)
        if num_new > self.num_free_blocks:
            return None
        table = self._tables.setdefault(request_id, [])
        if num_new == 0:  # most calls: a decoding sequence inside its last block
            return []
        new_blocks = self._free[-num_new:]
        del self._free[-num_new:]
        while len(new_blocks) < num_new:  # then the cached blocks nobody holds, least recently released first
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._key_of.pop(block)]
            new_blocks.append(block)
        for block in new_blocks:
            self._holders[block] = 1
        table.extend(new_blocks)
        return new_blocks

    def free(self, request_id: str) -> int:
        """Let go of all of the request's blocks; returns how many it held. A block returns to the pool once no
        request holds it (a cached one stays findable until its memory is taken)."""
        blocks = self._tables.pop(request_id, [])
        self._num_filed.pop(request_id, None)
        # Last block first: of one request's cached blocks, the tail is the first to be evicted.
        for block in reversed(blocks):
            self._holders[block] -= 1
            if self._holders[block] == 0:
                if block in self._key_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        return len(blocks)

    # -- prefix caching ---------------------------------------------------------------------------------------

    def cached_prefix(self, request_id: str, token_ids: Sequence[int]) -> list[int]:
        """The cached blocks that hold the longest run of full blocks ``token_ids`` (the request's tokens, or the
        first of them) starts with; empty without prefix caching."""
        return self.cached_blocks(self.block_keys(request_id, token_ids)) if self.prefix_caching else []

    def cached_blocks(self, keys: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest run of ``keys`` (`block_keys`) from the first that are all cached."""
        found: list[int] = []
        for key in keys:
            block = self._cached.get(key)
            if block is None:
                break
            found.append(block)
        return found

    def num_reclaimed(self, blocks: Sequence[int]) -> int:
        """How many of ``blocks`` (cached ones) nobody holds: sharing them takes them out of the free count."""
        return sum(1 for b in blocks if self._holders[b] == 0)

    def share(self, request_id: str, blocks: Sequence[int]) -> None:
        """Start ``request_id``'s table (it must hold nothing) with ``blocks``, from `cached_prefix`."""
        assert not self._tables.get(request_id), f"{request_id} already holds blocks"
        for block in blocks:
            if self._holders[block] == 0:
                del self._evictable[block]
            self._holders[block] += 1
        self._tables[request_id] = list(blocks)
        self._num_filed[request_id] = len(blocks)

    def cache_full_blocks(self, request_id: str, token_ids: Sequence[int], num_computed: int) -> None:
        """File the request's blocks that ``num_computed`` tokens (their KV entries written) have filled, under
        their content; ``token_ids`` holds at least those tokens. A block whose content is already filed (another
        request computed it too) stays private and returns to the pool when freed."""
        if not self.prefix_caching:
            return
        table = self._tables.get(request_id, [])
        num_full = min(num_computed // self.block_size, len(table))
        chain = self._chain(request_id, token_ids, num_full)
        for i in range(self._num_filed.get(request_id, 0), num_full):
            if chain[i] not in self._cached and table[i] not in self._key_of:
                self._cached[chain[i]] = table[i]
                self._key_of[table[i]] = chain[i]
        self._num_filed[request_id] = num_full

    def block_keys(self, request_id: str, token_ids: Sequence[int]) -> list[bytes]:
        """The content key of each full block of ``token_ids`` (the request's tokens, or the first of them)."""
        return self._chain(request_id, token_ids, len(token_ids) // self.block_size)[: len(token_ids) // self.block_size]

    def num_filed(self, request_id: str) -> int:
        """How many of the request's first blocks are computed and filed (or found already filed)."""
        return self._num_filed.get(request_id, 0)

    def salt(self, request_id: str, salt: str) -> None:
        """Key the request's blocks under ``salt`` too (vLLM's ``cache_salt``): only requests with the same salt
        find each other's blocks, so a tenant cannot tell from its time to first token what another one sent."""
        assert request_id not in self._chains, f"{request_id} already has keys"
        self._salts[request_id] = hashlib.sha256(b"salt:" + salt.encode()).digest()

    def forget(self, request_id: str) -> None:
        """Drop what the pool remembers of an ended request (the content hashes of its blocks)."""
        self._chains.pop(request_id, None)
        self._salts.pop(request_id, None)

    def _chain(self, request_id: str, token_ids: Sequence[int], num_blocks: int) -> list[bytes]:
        """The content keys of the request's first ``num_blocks`` blocks: each a SHA-256 of the block's tokens and
        the key before it, so a key names the whole prefix (a cryptographic hash, so that no prompt can be made to
        collide with another user's and read its cache). Tokens only ever append, so each is hashed once."""
        chain = self._chains.setdefault(request_id, [])
        size = self.block_size
        for i in range(len(chain), num_blocks):
            digest = hashlib.sha256(chain[-1] if chain else self._salts.get(request_id, b""))
            digest.update(array.array("q", token_ids[i * size : (i + 1) * size]).tobytes())
            chain.append(digest.digest())
        return chain

    def check(self) -> None:
        """Internal invariant: every block is held (as often as tables name it), free, or cached and released."""
        counts = collections.Counter(b for table in self._tables.values() for b in table)
        assert all(self._holders[b] == n for b, n in counts.items()), "a holder count is off"
        assert sum(self._holders) == sum(counts.values()), "a block is counted as held by nobody"
        idle = set(self._free) | set(self._evictable)
        assert len(idle) == len(self._free) + len(self._evictable), "a block is both free and cached"
        assert not idle & set(counts), "a held block is also free"
        assert len(counts) + len(idle) == self.num_blocks, (len(counts), len(idle), self.num_blocks)
        assert all(b in self._key_of for b in self._evictable) and not any(b in self._key_of for b in self._free)
        assert all(self._cached[k] == b for b, k in self._key_of.items()) and len(self._cached) == len(self._key_of)
