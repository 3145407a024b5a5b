"""The paged KV pool: pre-allocated K and V tensors per layer, indexed by block id.

Blocks are handed out by the scheduler's torch-free `BlockPool`; this module only holds the memory. A token
at position i of a sequence with block table T lives at slot T[i // block_size] * block_size + i % block_size
of each layer's flat (num_blocks * block_size, num_kv_heads, head_dim) view.
"""

from __future__ import annotations

import torch
from torch import nn


class PagedKVPool:
    """K/V storage for `num_blocks` blocks of `block_size` tokens, for every attention layer."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        *,
        num_kv_heads: int | list[int],
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        # Under tensor parallelism with uneven heads, ranks (and in principle layers) hold different head counts.
        heads = [num_kv_heads] * num_layers if isinstance(num_kv_heads, int) else list(num_kv_heads)
        assert len(heads) == num_layers, (len(heads), num_layers)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.head_dim = head_dim
        self.num_kv_heads = heads
        # Each: (num_blocks, block_size, num_kv_heads, head_dim). Zeroed so unused slots never hold NaNs.
        self.k = [torch.zeros(num_blocks, block_size, h, head_dim, dtype=dtype, device=device) for h in heads]
        self.v = [torch.zeros_like(k) for k in self.k]

    @classmethod
    def for_model(
        cls, model: nn.Module, num_blocks: int, block_size: int, *, dtype: torch.dtype | None = None
    ) -> PagedKVPool:
        """A pool shaped after the model's attention layers as they are now (sharded or not)."""
        attns = attention_modules(model)
        heads = [kv_heads_of(a) for a in attns]
        weight = attns[0].k_proj.weight
        return cls(
            len(attns),
            num_blocks,
            block_size,
            num_kv_heads=heads,
            head_dim=attns[0].head_dim,
            dtype=dtype or weight.dtype,
            device=weight.device,
        )

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def flat(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one layer's K and V as (num_slots, num_kv_heads, head_dim); writes go to the pool."""
        k, v = self.k[layer_idx], self.v[layer_idx]
        return k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:])


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The model's self-attention modules in layer order (anything with k_proj and a layer_idx)."""
    found = [m for m in model.modules() if hasattr(m, "k_proj") and hasattr(m, "layer_idx")]
    if not found:
        raise ValueError(f"{type(model).__name__} has no attention modules with k_proj/layer_idx (LLaMA-style)")
    found.sort(key=lambda m: m.layer_idx)
    assert [m.layer_idx for m in found] == list(range(len(found))), "layer indices must be 0..L-1"
    return found


def kv_heads_of(attn: nn.Module) -> int:
    """KV heads this process holds for one layer, read from the (possibly sharded) k_proj weight."""
    # k_proj.weight: (num_kv_heads * head_dim, hidden); AutoTP shards dim 0, the config is not updated.
    out_features = attn.k_proj.weight.shape[0]
    assert out_features % attn.head_dim == 0, (out_features, attn.head_dim)
    return out_features // attn.head_dim
