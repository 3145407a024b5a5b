"""ModelRunner: executes one scheduled step (many sequences, prefill chunks and decodes mixed) in one forward pass.

Recipe of a step:
1. flatten every sequence's new tokens into one (1, T) row, with their positions as position_ids;
2. build the step's paged metadata (slots to write, contexts to read) from the block tables;
3. run the model with the paged attention function, keeping logits only at each sampled sequence's last token;
4. sample one next token per sequence whose step reached the end of its known tokens.
The runner keeps no per-request state: the KV pool is addressed only through the block tables it is given, so
preemption is the scheduler freeing blocks, and recompute is a step whose token_ids are prompt + generated.
"""

from __future__ import annotations

import torch
from torch import nn

from serve.engine.attention import build_paged_batch, decodes_first, register_paged_attention
from serve.engine.kv_pool import PagedKVPool, attention_modules
from serve.engine.plan import SequenceStep, StepOutput
from serve.engine.sampling import sample, token_logprobs


def refuse_unsupported_attention(model: nn.Module) -> None:
    """Raise ValueError for a model whose attention the paged kernel would compute wrongly: a sliding window (Mistral,
    Gemma's local layers, Qwen2 with use_sliding_window), logit softcapping (Gemma 2) or attention sinks. The paged
    attention attends to the whole context without them, so answers would silently differ from the model's."""
    for attn in attention_modules(model):
        config = getattr(attn, "config", None)
        window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(config, "sliding_window", None)
        softcap = getattr(attn, "attn_logit_softcapping", getattr(config, "attn_logit_softcapping", None))
        found = {"a sliding window": window, "attention logit softcapping": softcap,
                 "attention sinks": getattr(attn, "sinks", None)}
        for what, value in found.items():
            if value is not None:
                raise ValueError(f"{type(model).__name__} layer {attn.layer_idx} uses {what} ("
                                 f"{value if not isinstance(value, torch.Tensor) else tuple(value.shape)}), which this "
                                 "engine's paged attention does not implement; serve a model without it (the LLaMA "
                                 "family, SmolLM2, Qwen2 without use_sliding_window)")


class ModelRunner:
    """Owns a model (plain Hugging Face, or wrapped by DeepSpeed) and the paged KV pool it reads and writes.

    The model is switched to paged attention in place (`set_attn_implementation`), so it no longer runs a plain
    forward or generate() until switched back (e.g. `model.set_attn_implementation("sdpa")`). The pool takes
    num_blocks * block_size * num_layers * 2 * kv_heads * head_dim elements, all allocated here.
    """

    def __init__(self, model: nn.Module, *, num_blocks: int, block_size: int = 16) -> None:
        self.model = model
        # A DeepSpeed InferenceEngine keeps the (sharded) Hugging Face model as .module.
        self.hf_model = getattr(model, "module", model)
        refuse_unsupported_attention(self.hf_model)
        self.hf_model.set_attn_implementation(register_paged_attention())
        self.hf_model.eval()
        self.pool = PagedKVPool.for_model(self.hf_model, num_blocks, block_size)
        self.device = self.hf_model.get_input_embeddings().weight.device

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @torch.inference_mode()
    def execute(self, steps: list[SequenceStep]) -> StepOutput:
        """Run one step; returns a next token for every sequence with `sample=True` (and the log-probabilities
        its sampling asks for)."""
        if not steps:
            return StepOutput({}, 0)
        self._check(steps)
        batch_order = decodes_first(steps)
        input_ids, position_ids = self._flatten(batch_order)  # (1, T) each
        batch = build_paged_batch(batch_order, self.pool, self.device)
        sampled = [s for s in batch_order if s.sample]
        scored = [s for s in batch_order if s.prompt_targets]
        keep = self._kept_rows(batch_order)  # batch rows whose logits are needed: sampled, then scored
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=keep if len(keep) else 1,
            paged_batch=batch,
        )
        logits = out.logits[0].float()  # (len(keep), V)
        prompt_logprobs = self._score_prompts(scored, logits[len(sampled):]) if scored else {}
        if not sampled:
            return StepOutput({}, input_ids.shape[1], prompt_logprobs=prompt_logprobs)
        logits = logits[: len(sampled)]
        tokens = sample(
            logits, [s.sampling for s in sampled], [s.num_tokens_after for s in sampled],
            [s.output_token_ids for s in sampled], [s.banned_token_ids for s in sampled],
            [s.allowed_tokens for s in sampled], [s.prompt_token_ids for s in sampled],
        )
        by_id = {s.request_id: t for s, t in zip(sampled, tokens)}
        asking = [i for i, s in enumerate(sampled) if s.sampling.logprobs is not None]
        logprobs = {}
        if asking:  # from the logits as the model gave them (sample() penalised a copy)
            found = token_logprobs(logits[asking], [tokens[i] for i in asking],
                                   [sampled[i].sampling.logprobs for i in asking])
            logprobs = {sampled[i].request_id: lp for i, lp in zip(asking, found)}
        return StepOutput({s.request_id: by_id[s.request_id] for s in steps if s.sample}, input_ids.shape[1],
                          logprobs, prompt_logprobs)

    @staticmethod
    def _score_prompts(scored: list[SequenceStep], logits: torch.Tensor) -> dict:
        """Each scored sequence's prompt targets from its rows of ``logits`` (in `scored` order)."""
        out, row = {}, 0
        for s in scored:
            n = len(s.prompt_targets)
            found = token_logprobs(logits[row : row + n], s.prompt_targets, [s.sampling.prompt_logprobs] * n)
            out[s.request_id] = (s.num_computed_tokens + 1, found)
            row += n
        return out

    def _flatten(self, steps: list[SequenceStep]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [t for s in steps for t in s.token_ids]
        pos = [p for s in steps for p in range(s.num_computed_tokens, s.num_tokens_after)]
        as_row = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)[None, :]  # noqa: E731
        return as_row(ids), as_row(pos)

    def _kept_rows(self, steps: list[SequenceStep]) -> torch.Tensor:
        """The batch rows whose logits the step needs: each sampled sequence's last token, then the rows scoring
        prompt tokens (each such sequence's first ``len(prompt_targets)`` tokens)."""
        lengths = torch.tensor([len(s.token_ids) for s in steps])
        ends = lengths.cumsum(0)  # (S,) one past each sequence's last row
        wanted = torch.tensor([s.sample for s in steps], dtype=torch.bool)
        rows = [ends[wanted] - 1]
        rows += [torch.arange(len(s.prompt_targets)) + (ends[i] - lengths[i]) for i, s in enumerate(steps)
                 if s.prompt_targets]
        return torch.cat(rows).to(self.device)

    def _check(self, steps: list[SequenceStep]) -> None:
        """Plans come from our own scheduler, so violations are bugs: fail loudly before touching the pool."""
        seen = set()
        for s in steps:
            assert s.request_id not in seen, f"{s.request_id} appears twice in one step"
            seen.add(s.request_id)
            assert s.token_ids, f"{s.request_id}: no tokens to compute"
            needed = -(-s.num_tokens_after // self.block_size)
            assert len(s.block_table) >= needed, (
                f"{s.request_id}: {s.num_tokens_after} tokens need {needed} blocks, table has {len(s.block_table)}"
            )
            table = s.block_table[:needed]
            assert 0 <= min(table) and max(table) < self.num_blocks, f"{s.request_id}: bad block id"
