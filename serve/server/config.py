"""Settings of `s3 serve`, filled from configs/serve_cpu.yaml, command-line flags and `--set key=value`."""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
from pathlib import Path
from typing import Literal

from serve.engine.llm import EngineConfig
from serve.policies import policy_needs
from serve.policy_config import POLICY_NAMES, PolicyConfig


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """The server: engine, admission policy and predictor, HTTP limits, feedback."""

    engine: EngineConfig = EngineConfig(policy=PolicyConfig(policy="s3"), enable_prefix_caching=True)
    """Model, KV pool, batch limits, tensor-parallel degree; ``engine.policy.policy`` is the admission policy
    (s3, max, paged; oracle needs ``oracle_lengths``). ``engine.max_num_batched_tokens`` (tokens per step) and
    ``engine.long_prefill_token_threshold`` (prompt tokens per request per step) bound how long one step takes,
    so that a long prompt is prefilled in slices between the running streams' tokens (configs/serve_cpu.yaml)."""
    predictor: str | None = None
    """Length-predictor checkpoint folder (the output of `s3 train`); needed by the s3 policy."""
    oracle_lengths: str | None = None
    """Benchmarks only, instead of ``predictor``: a JSON file {prompt text: true output tokens}, e.g. measured
    by a greedy run; predicts each known prompt's true bucket (unknown prompts get the last bucket)."""
    num_buckets: int = 10
    """Buckets of the ``oracle_lengths`` stand-in (equal widths up to ``max_new_tokens``); a checkpoint brings
    its own."""
    fallback_policy: str | None = None
    """With the s3 policy and no usable predictor, serve with this policy instead of refusing to start."""
    check_target_model: bool = True
    """Refuse a predictor checkpoint trained on another target model's output lengths."""
    default_frequency_penalty: float | None = None
    """Frequency penalty of requests that leave it out; default: the one the predictor's labels were generated
    with (0.5 for data/labelled: served without it, SmolLM2 loops to the cap far more often than predicted),
    0 (OpenAI's default) without a predictor."""
    priority_scheduling: bool = False
    """Let requests carry vLLM's ``priority`` (an integer, lower first; default 0): the scheduler tries waiting
    requests by priority, then in its policy's order, and takes victims from the least urgent running sequences.
    Off, any priority but 0 is a 400: a client that may send one can put itself ahead of everyone else."""
    predictor_batch_size: int = 32
    """Most prompts the length predictor classifies in one batch."""
    host: str = "127.0.0.1"
    """Address to bind; 127.0.0.1 serves this machine only, 0.0.0.0 every interface (needs an API key, or
    ``allow_insecure_no_auth``)."""
    port: int = 8000
    api_key: str | None = None
    """Clients must send ``Authorization: Bearer <key>`` (every route but /health and /version); default: env S3_API_KEY
    (preferred: a key on the command line is visible to every user in `ps`), and no key when that is unset."""
    allow_insecure_no_auth: bool = False
    """Serve a non-loopback ``host`` without an API key: anyone who can reach the port can generate, read
    /metrics and write to the feedback store. Without it, such a server refuses to start."""
    ssl_certfile: str | None = None
    """Serve HTTPS with this certificate (chain) in PEM, and ``ssl_keyfile`` its private key; both or neither.
    Without them the server speaks plain HTTP (behind a TLS-terminating proxy, or on loopback)."""
    ssl_keyfile: str | None = None
    allowed_origins: tuple[str, ...] = ()
    """Web origins whose pages may call the API from a browser (CORS), e.g. ``https://chat.example.com``; ``*``
    any. Empty (the default): no CORS headers, so browsers refuse cross-origin calls. Answers carry no
    credentials cookies; the API key still goes in the Authorization header."""
    served_model_name: str | None = None
    """The model name clients ask for; default: the engine's model (``smollm2`` or the folder's name)."""
    max_new_tokens: int = 512
    """Most tokens one request may generate; also the default when a request gives no max_tokens."""
    max_waiting_requests: int = 256
    """Requests accepted but not yet running beyond which new ones get 429 (with Retry-After)."""
    max_body_bytes: int = 1 << 20
    """Larger request bodies get 413."""
    body_timeout_s: float = 30.0
    """A request body not fully received this long after its handler starts reading gets 408 (a client that
    declares more bytes than it sends would otherwise hold a handler open)."""
    retry_after_s: int = 1
    """Retry-After sent with a 429."""
    keep_alive_s: float = 75.0
    """How long an idle keep-alive connection stays open. Longer than pooling clients keep theirs (httpx, under the
    OpenAI SDK: 5 s), so that the server never closes a connection a client is about to reuse: with both at 5 s
    (uvicorn's default) a request now and then met a closed socket (a client ReadError, no answer)."""
    shutdown_timeout_s: float = 30.0
    """At SIGINT/SIGTERM the server takes no new connection and gives the requests running or queued this long to
    finish; those still left then end with an error (a 503, or a stream's error event and ``[DONE]``). 0: at once.
    A second Ctrl-C exits without waiting (uvicorn's)."""
    feedback_dir: str | None = "runs/feedback"
    """Where mispredicted requests are written for `s3 train --feedback`; null disables it."""
    feedback_sample_rate: float = 0.1
    """Share of the well-predicted requests written to the feedback store too (chosen by a hash of the request id).
    Weighted back, the store is then a sample of the traffic served, on which retraining checks that a round helps
    it (`s3 train --feedback`); 0 records mispredictions only, and retraining is then judged on the labelled
    validation split alone, which holds none of a new kind of traffic."""
    feedback_sync_every: int = 32
    """Feedback records per fsync (the rest are synced when the engine goes idle and on shutdown)."""
    torch_threads: int | None = None
    """CPU threads of torch's intra-op pool; default all cores but one (at least one), leaving a core to the
    HTTP thread (and a GPU server's predictor thread). Oversubscribed cores make each engine step wait for a
    descheduled pool worker (tiny_llama on 2 cores: 60 ms per step instead of 1 ms)."""
    predictor_thread: bool | None = None
    """Classify new requests on a thread of their own, overlapping the engine's steps, rather than in the engine
    thread between two steps. Default: only when the engine runs on a GPU; on a CPU, torch computations issued
    from two threads slow each other (see `serve.server.admission`)."""
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_stats_interval_s: float = 10.0
    """`s3 serve` logs a line of engine statistics this often while it has work (tokens/s, queue, KV memory,
    preemptions, prefix cache, the predictor's live accuracy; as vLLM's); 0: never."""

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
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("give both ssl_certfile and ssl_keyfile (a certificate and its private key), or neither")
        if not all(isinstance(o, str) and o.strip() for o in self.allowed_origins):
            raise ValueError(f"allowed_origins must be origins such as https://chat.example.com or *, got "
                             f"{list(self.allowed_origins)}")
        if not 0 <= self.feedback_sample_rate <= 1:
            raise ValueError(f"feedback_sample_rate must be in [0, 1], got {self.feedback_sample_rate}")
        if self.log_stats_interval_s < 0:
            raise ValueError(f"log_stats_interval_s must be >= 0 (0: no statistics lines), got "
                             f"{self.log_stats_interval_s}")
        for name in ("body_timeout_s", "keep_alive_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.shutdown_timeout_s < math.inf:
            raise ValueError(f"shutdown_timeout_s must be a number of seconds >= 0, got {self.shutdown_timeout_s}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {self.torch_threads}")
        if self.fallback_policy is not None and (self.fallback_policy not in POLICY_NAMES
                                                 or policy_needs(self.fallback_policy) != "none"):
            choices = ", ".join(p for p in POLICY_NAMES if policy_needs(p) == "none")
            raise ValueError(f"fallback_policy must be a policy that needs no predictor ({choices}), "
                             f"got {self.fallback_policy!r}")

    @property
    def policy(self) -> str:
        return self.engine.policy.policy

    def resolved_api_key(self) -> str | None:
        """The key clients must send: ``api_key``, else env S3_API_KEY; None (no key) when both are empty."""
        return self.api_key or os.environ.get("S3_API_KEY") or None

    @property
    def tls(self) -> tuple[str, str] | None:
        """(certificate file, key file) when the server speaks HTTPS."""
        return (self.ssl_certfile, self.ssl_keyfile) if self.ssl_certfile and self.ssl_keyfile else None

    def check_tls(self) -> None:
        """The certificate and key files exist (checked before minutes of loading a model)."""
        for name, path in (("ssl_certfile", self.ssl_certfile), ("ssl_keyfile", self.ssl_keyfile)):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"{name} {path} does not exist")

    def check_exposure(self) -> None:
        """Refuse to serve other machines with no key unless the user said so (``allow_insecure_no_auth``)."""
        if is_loopback(self.host) or self.resolved_api_key() or self.allow_insecure_no_auth:
            return
        raise ValueError(
            f"--host {self.host} serves other machines, and no API key is set: anyone who can reach port "
            f"{self.port} could use the server. Set S3_API_KEY in the environment (or --api-key), bind "
            "127.0.0.1, or pass --allow-insecure-no-auth (--set allow_insecure_no_auth=true) to serve without a "
            "key anyway"
        )


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (localhost, 127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to any interface
