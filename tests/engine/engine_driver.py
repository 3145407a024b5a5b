"""Test helpers: a tiny random LLaMA, reference greedy tokens from generate(), and a minimal scheduler.

MiniScheduler is just enough scheduling to drive a ModelRunner the way the real scheduler will: a free list of
blocks (shuffled, so block tables are not contiguous), blocks allocated as tokens arrive, optional chunked prefill,
and preemption by recompute (free the blocks, keep prompt + generated tokens, compute them again).
"""

from __future__ import annotations

import dataclasses
import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from serve.engine.plan import GREEDY, SamplingParams, SequenceStep
from serve.engine.runner import ModelRunner


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """2 layers, hidden 64, 4 heads over 2 KV heads (GQA), vocab 128; no EOS so generate() runs to the end."""
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, eos_token_id=None, pad_token_id=0, bos_token_id=None,
        initializer_range=0.2,  # wide weights: peaked, varied greedy tokens instead of a repeating loop
    )  # fmt: skip
    model = LlamaForCausalLM(LlamaConfig(**(fields | overrides))).eval()
    model.generation_config.eos_token_id = None
    return model


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

    Stops at the model's EOS like generate() does; MiniScheduler(stop_token_ids=...) does the same."""
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        gen = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=num_new_tokens, do_sample=False,
            pad_token_id=model.generation_config.pad_token_id or 0,
        )  # fmt: skip
        outs.append(gen[0, len(p) :].tolist())
    return outs


@dataclasses.dataclass
class Seq:
    token_ids: list[int]  # prompt + generated
    num_prompt_tokens: int
    max_new_tokens: int
    sampling: SamplingParams
    stop_token_ids: tuple[int, ...] = ()
    num_computed_tokens: int = 0
    blocks: list[int] = dataclasses.field(default_factory=list)

    @property
    def generated(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def finished(self) -> bool:
        out = self.generated
        return len(out) >= self.max_new_tokens or (bool(out) and out[-1] in self.stop_token_ids)


class MiniScheduler:
    def __init__(
        self, runner: ModelRunner, *, chunk_tokens: int | None = None, stop_token_ids=(), seed: int = 0
    ) -> None:
        self.runner = runner
        self.stop_token_ids = tuple(stop_token_ids)
        self.chunk_tokens = chunk_tokens  # most tokens one sequence computes per step (None: all it has)
        self.free = list(range(runner.num_blocks))
        random.Random(seed).shuffle(self.free)
        self.seqs: dict[str, Seq] = {}

    def add(self, request_id: str, prompt_ids: list[int], max_new_tokens: int, sampling=GREEDY) -> None:
        self.seqs[request_id] = Seq(list(prompt_ids), len(prompt_ids), max_new_tokens, sampling, self.stop_token_ids)

    def output(self, request_id: str) -> list[int]:
        return self.seqs[request_id].generated

    def preempt(self, request_id: str) -> None:
        """Drop the sequence's KV; its next step recomputes prompt + generated tokens from scratch."""
        seq = self.seqs[request_id]
        self.free.extend(seq.blocks)
        seq.blocks, seq.num_computed_tokens = [], 0

    def step(self, request_ids: list[str] | None = None) -> dict[str, int]:
        """One runner step over the given unfinished sequences (default: all of them)."""
        ids = [r for r in (request_ids or list(self.seqs)) if not self.seqs[r].finished]
        plan = [self._plan_one(r) for r in ids]
        out = self.runner.execute(plan).sampled_token_ids
        for s in plan:
            seq = self.seqs[s.request_id]
            seq.num_computed_tokens = s.num_tokens_after
            if s.request_id in out:
                seq.token_ids.append(out[s.request_id])
            if seq.finished:
                self.free.extend(seq.blocks)
                seq.blocks = []
        assert len(self.free) + sum(len(q.blocks) for q in self.seqs.values()) == self.runner.num_blocks
        return out

    def run(self) -> None:
        while not all(s.finished for s in self.seqs.values()):
            self.step()

    def _plan_one(self, request_id: str) -> SequenceStep:
        seq = self.seqs[request_id]
        todo = seq.token_ids[seq.num_computed_tokens :]
        new = todo[: self.chunk_tokens] if self.chunk_tokens else todo
        end = seq.num_computed_tokens + len(new)
        while len(seq.blocks) * self.runner.block_size < end:
            seq.blocks.append(self.free.pop())
        return SequenceStep(
            request_id, new, seq.num_computed_tokens, list(seq.blocks),
            sample=end == len(seq.token_ids), sampling=seq.sampling,
        )  # fmt: skip
