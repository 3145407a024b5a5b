"""Settings of `s3 serve`, filled from configs/serve_cpu.yaml, command-line flags and `--set key=value`."""

from __future__ import annotations

import dataclasses
from typing import Literal

from serve.engine.llm import EngineConfig
from serve.policies import PolicyConfig


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """The server: engine, admission policy and predictor, HTTP limits, feedback."""

    engine: EngineConfig = EngineConfig(policy=PolicyConfig(policy="s3"))
    """Model, KV pool, batch limits, tensor-parallel degree; ``engine.policy.policy`` is the admission policy
    (s3, max, paged; oracle needs ``oracle_lengths``)."""
    predictor: str | None = None
    """Length-predictor checkpoint folder (the output of `s3 train`); needed by the s3 policy."""
    oracle_lengths: str | None = None
    """Benchmarks only, instead of ``predictor``: a JSON file {prompt text: true output tokens}, e.g. measured
    by a greedy run; predicts each known prompt's true bucket (unknown prompts get the last bucket)."""
    num_buckets: int = 10
    """Buckets of the ``oracle_lengths`` stand-in (equal widths up to ``max_new_tokens``); a checkpoint brings
    its own."""
    fallback_policy: Literal["max", "paged"] | None = None
    """With the s3 policy and no usable predictor, serve with this policy instead of refusing to start."""
    check_target_model: bool = True
    """Refuse a predictor checkpoint trained on another target model's output lengths."""
    default_frequency_penalty: float | None = None
    """Frequency penalty of requests that leave it out; default: the one the predictor's labels were generated
    with (0.5 for data/labelled: served without it, SmolLM2 loops to the cap far more often than predicted),
    0 (OpenAI's default) without a predictor."""
    predictor_batch_size: int = 32
    """Most prompts the predictor thread classifies in one batch."""
    host: str = "127.0.0.1"
    """Address to bind; 127.0.0.1 serves this machine only, 0.0.0.0 every interface."""
    port: int = 8000
    api_key: str | None = None
    """Clients must send ``Authorization: Bearer <key>`` (every route but /health); default: env S3_API_KEY,
    and no key at all when that is unset."""
    served_model_name: str | None = None
    """The model name clients ask for; default: the engine's model (``smollm2`` or the folder's name)."""
    max_new_tokens: int = 512
    """Most tokens one request may generate; also the default when a request gives no max_tokens."""
    max_waiting_requests: int = 256
    """Requests accepted but not yet running beyond which new ones get 429 (with Retry-After)."""
    max_body_bytes: int = 1 << 20
    """Larger request bodies get 413."""
    retry_after_s: int = 1
    """Retry-After sent with a 429."""
    feedback_dir: str | None = "runs/feedback"
    """Where mispredicted requests are written for `s3 train --feedback`; null disables it."""
    feedback_sync_every: int = 32
    """Feedback records per fsync (the rest are synced when the engine goes idle and on shutdown)."""
    torch_threads: int | None = None
    """CPU threads of torch's intra-op pool; default all cores but one (at least one), leaving a core to the
    HTTP and predictor threads. Oversubscribed cores make each engine step wait for a descheduled pool worker
    (tiny_llama on 2 cores: 60 ms per step instead of 1 ms)."""
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    def __post_init__(self) -> None:
        if self.predictor and self.oracle_lengths:
            raise ValueError("give either predictor (a checkpoint) or oracle_lengths (benchmarks), not both")
        if self.default_frequency_penalty is not None and not -2 <= self.default_frequency_penalty <= 2:
            raise ValueError(f"default_frequency_penalty must be in [-2, 2], got {self.default_frequency_penalty}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        for name in ("max_new_tokens", "max_waiting_requests", "max_body_bytes", "predictor_batch_size",
                     "feedback_sync_every", "num_buckets", "retry_after_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {self.torch_threads}")
        if self.fallback_policy not in (None, "max", "paged"):
            raise ValueError(f"fallback_policy must be max or paged, got {self.fallback_policy!r}")

    @property
    def policy(self) -> str:
        return self.engine.policy.policy
