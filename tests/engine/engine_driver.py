"""Test helpers: a tiny random LLaMA, reference greedy tokens from generate(), and EngineDriver (the real
scheduler and executor over a ModelRunner the test builds)."""

from __future__ import annotations

import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from core.request import Request
from serve.engine.executor import ModelExecutor
from serve.engine.plan import GREEDY
from serve.engine.runner import ModelRunner
from serve.policies import VictimFn
from serve.policy_config import PolicyConfig
from serve.scheduler import Scheduler, SchedulerConfig
from serve.step import EngineCore


DEVICE = os.environ.get("S3_TEST_DEVICE", "cpu")
"""Where the tiny models run: `S3_TEST_DEVICE=cuda pytest tests/engine/test_engine_runner.py` checks the paged
engine against generate() on a GPU (fp32, so the greedy tokens must still be identical)."""


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """2 layers, hidden 64, 4 heads over 2 KV heads (GQA), vocab 128; no EOS so generate() runs to the end.
    On `DEVICE`."""
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, eos_token_id=None, pad_token_id=0, bos_token_id=None,
        initializer_range=0.2,  # wide weights: peaked, varied greedy tokens instead of a repeating loop
    )  # fmt: skip
    model = LlamaForCausalLM(LlamaConfig(**(fields | overrides))).eval()
    model.generation_config.eos_token_id = None
    return model.to(DEVICE)


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    """A one-turn chat prompt, ending where the assistant's answer starts."""
    messages = [{"role": "user", "content": text}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(enc["input_ids"])


def eos_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]


@torch.inference_mode()
def reference_greedy(model, prompts: list[list[int]], num_new_tokens: int) -> list[list[int]]:
    """generate(do_sample=False) one prompt at a time (no padding), so the reference is the plain model's.

    Stops at the model's EOS like generate() does; EngineDriver(stop_token_ids=...) does the same."""
    outs = []
    for p in prompts:
        ids = torch.tensor([p], device=model.device)
        gen = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=num_new_tokens, do_sample=False,
            pad_token_id=model.generation_config.pad_token_id or 0,
        )  # fmt: skip
        outs.append(gen[0, len(p) :].tolist())
    return outs


class EngineDriver:
    """The project's scheduler and ModelExecutor, stepped by EngineCore over a given ModelRunner.

    What LLMEngine builds, minus the model loading, so tests can hand it any runner (a DeepSpeed-wrapped model, a
    pool of stale garbage). The policy is `paged` with no watermark: blocks are taken as tokens arrive and a
    sequence that cannot grow preempts another (by recompute). ``chunk_tokens`` caps the prompt (or recompute)
    tokens one sequence computes per step; ``victim`` names the request to preempt whenever it is a candidate.
    """

    def __init__(
        self, runner: ModelRunner, *, chunk_tokens: int | None = None, stop_token_ids=(), max_num_seqs: int = 8,
        victim: str | None = None, tensor_parallel: int = 1,
    ) -> None:  # fmt: skip
        config = SchedulerConfig(
            num_blocks=runner.num_blocks, block_size=runner.block_size, max_num_seqs=max_num_seqs,
            long_prefill_token_threshold=chunk_tokens or 0, policy=PolicyConfig(policy="paged", watermark=0.0),
        )  # fmt: skip
        self.scheduler = Scheduler(config, victim_fn=_prefer(victim) if victim else None)
        self.executor = ModelExecutor(runner, eos_token_ids=set(stop_token_ids), tensor_parallel=tensor_parallel)
        self.core = EngineCore(self.scheduler, self.executor)
        self.requests: dict[str, Request] = {}

    def add(self, request_id: str, prompt_ids: list[int], max_new_tokens: int, sampling=GREEDY) -> None:
        request = Request(request_id, list(prompt_ids), max_new_tokens, sampling=sampling)
        self.scheduler.add_request(request)
        self.requests[request_id] = request

    def output(self, request_id: str) -> list[int]:
        return list(self.requests[request_id].output_token_ids)

    def step(self) -> None:
        self.core.step()
        self.scheduler.check_invariants()

    def run(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.core.has_unfinished():
                return
            self.step()
        raise AssertionError(f"not finished after {max_steps} steps")


def _prefer(request_id: str) -> VictimFn:
    """Preempt ``request_id`` when it is a candidate, else the last in running order (paged's own choice)."""

    def choose(candidates, needy):
        return next((r for r in candidates if r.request_id == request_id), candidates[-1])

    return choose
