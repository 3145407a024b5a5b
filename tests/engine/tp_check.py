"""Run by test_engine_parallel.py under `deepspeed --no_local_rank --num_gpus 2`: rank 0 schedules and broadcasts
each step's plan, as `s3 serve` does, and the other ranks follow it through their shard of the model; rank 0 writes
the greedy tokens and the reference from generate().

Usage: deepspeed --no_local_rank --num_gpus 2 tests/engine/tp_check.py OUT.json [--smollm2]
"""

from __future__ import annotations

import json
import os
import sys

import torch

from core.distributed import world_size
from serve.engine.parallel import wrap_tensor_parallel
from serve.engine.runner import ModelRunner

from engine_driver import EngineDriver, chat_prompt_ids, eos_ids, reference_greedy  # this folder is on sys.path


def build_model(smollm2: bool):
    if smollm2:
        from serve.engine.loader import load_model

        model, tokenizer = load_model()
        chats = ["What is 2+2?", "Name a colour.", "Say hello in French."]
        return model, [chat_prompt_ids(tokenizer, c) for c in chats]
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # same weights on every rank
    config = LlamaConfig(
        vocab_size=128, hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, initializer_range=0.2, eos_token_id=None, pad_token_id=0, bos_token_id=None,
    )
    prompts = [torch.randint(0, 128, (n,)).tolist() for n in (5, 11, 8)]
    return LlamaForCausalLM(config).eval(), prompts


def main(out_path: str, smollm2: bool, num_new_tokens: int = 12) -> None:
    model, prompts = build_model(smollm2)
    reference = reference_greedy(model, prompts, num_new_tokens)
    engine = wrap_tensor_parallel(model)
    runner = ModelRunner(engine, num_blocks=64, block_size=4)
    rank, size = int(os.environ.get("RANK", 0)), world_size()
    sched = EngineDriver(runner, stop_token_ids=eos_ids(model), tensor_parallel=size)
    if rank == 0:
        for i, p in enumerate(prompts):
            sched.add(str(i), p, num_new_tokens)
        sched.run()
        sched.executor.shutdown()
    else:
        sched.executor.follow()
    result = {
        "rank": rank,
        "world_size": size,
        "kv_heads_per_rank": runner.pool.num_kv_heads[0],
        "tokens": [sched.output(str(i)) for i in range(len(prompts))] if rank == 0 else [],
        "reference": reference,
    }
    if result["rank"] == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
    print(json.dumps(result))
    if torch.distributed.is_initialized():
        # Leave together: a rank still tearing down gloo when the other has exited can abort (SIGABRT, rc -6).
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], "--smollm2" in sys.argv)
