"""The memory and batch limits of one scheduler (serve/scheduler.py), apart from it so that configs and executors
can name them without the scheduler."""

from __future__ import annotations

import dataclasses

from serve.policy_config import PolicyConfig


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Memory and batch limits of one scheduler."""

    num_blocks: int
    """KV blocks in the pool (per device; see KVSpec.num_blocks)."""
    block_size: int = 16
    """Tokens per KV block."""
    max_num_seqs: int = 256
    """Most sequences running at once."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step; longer prefills are chunked to fit."""
    long_prefill_token_threshold: int = 0
    """Most prompt (or recompute) tokens one sequence may compute in a step; 0 means no cap beyond the step's
    budget. A cap lets running decodes and short prompts share each step with a long prefill instead of waiting
    for it (vLLM's option of the same name)."""
    policy: PolicyConfig = PolicyConfig()
    """The admission policy and its knobs."""
    enable_prefix_caching: bool = False
    """Keep full KV blocks filed under their content and start a request on the cached blocks its tokens begin
    with, computing only the rest (vLLM's automatic prefix caching). Requests must carry their real token ids
    (the simulator's do not) and one pool must serve one model."""

    def __post_init__(self) -> None:
        if min(self.block_size, self.max_num_seqs) < 1:
            raise ValueError(f"block_size and max_num_seqs must be >= 1, got {self.block_size}, {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}) so that every running sequence can decode each step"
            )
        if self.long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be >= 0, got {self.long_prefill_token_threshold}")
