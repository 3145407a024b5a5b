"""The runner against generate(): greedy tokens must be identical in fp32, however the steps are cut."""

from __future__ import annotations

import pytest
import torch
from engine_driver import EngineDriver, reference_greedy, tiny_llama

from serve.engine.plan import SequenceStep
from serve.engine.runner import ModelRunner

NUM_NEW = 12


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(1, 128, (n,), generator=gen).tolist() for n in (7, 1, 13, 4, 22)]


@pytest.fixture(scope="module")
def reference(prompts):
    # Its own copy of the weights: a ModelRunner switches the model it is given to paged attention.
    return reference_greedy(tiny_llama(), prompts, NUM_NEW)


def make_sched(model, *, block_size=4, num_blocks=64, **kwargs) -> EngineDriver:
    runner = ModelRunner(model, num_blocks=num_blocks, block_size=block_size)
    # Stale, finite garbage everywhere: a read outside a sequence's own tokens would change its tokens.
    for t in runner.pool.k + runner.pool.v:
        t.normal_(0, 10)
    return EngineDriver(runner, **kwargs)


def add_all(sched, prompts, ids=None):
    for i in ids if ids is not None else range(len(prompts)):
        sched.add(str(i), prompts[i], NUM_NEW)


def outputs(sched, ids):
    return [sched.output(str(i)) for i in ids]


def test_one_sequence(model, prompts, reference):
    sched = make_sched(model)
    sched.add("0", prompts[0], NUM_NEW)
    sched.run()
    assert sched.output("0") == reference[0]


def test_sequences_of_different_lengths_decode_together(model, prompts, reference):
    sched = make_sched(model)
    add_all(sched, prompts)
    sched.run()
    assert outputs(sched, range(len(prompts))) == reference


@pytest.mark.parametrize("chunk_tokens,block_size", [(3, 4), (5, 2), (4, 4), (1, 3)])
def test_chunked_prefill(model, prompts, reference, chunk_tokens, block_size):
    sched = make_sched(model, block_size=block_size, num_blocks=128, chunk_tokens=chunk_tokens)
    add_all(sched, prompts, ids=[2, 4])
    sched.run()
    assert outputs(sched, [2, 4]) == [reference[2], reference[4]]


def test_sequences_join_midway(model, prompts, reference):
    sched = make_sched(model, chunk_tokens=5)
    sched.add("0", prompts[0], NUM_NEW)
    for _ in range(4):
        sched.step()
    # "4" prefills in chunks of 5 while "0" decodes, in the same forward passes; then "2" joins as well.
    sched.add("4", prompts[4], NUM_NEW)
    sched.step()
    sched.add("2", prompts[2], NUM_NEW)
    sched.run()
    assert outputs(sched, [0, 4, 2]) == [reference[0], reference[4], reference[2]]


@pytest.mark.parametrize("victim", [None, "4"])
def test_preemption_by_recompute(model, prompts, reference, victim):
    # 14 blocks of 4 hold any one sequence but not all five: sequences that cannot grow preempt others, whose
    # prompt and generated tokens are computed again, in chunks of 6, into whatever blocks are free by then.
    sched = make_sched(model, num_blocks=14, chunk_tokens=6, victim=victim)
    add_all(sched, prompts)
    sched.run()
    assert outputs(sched, range(len(prompts))) == reference
    assert sched.scheduler.stats.num_preemptions > 0 and sched.scheduler.stats.num_recomputed_tokens > 0
    if victim:  # the longest prompt (22 tokens), preempted mid-decode
        assert sched.requests[victim].num_preemptions > 0


def test_mid_prefill_step_samples_nothing(model, prompts):
    runner = ModelRunner(model, num_blocks=8, block_size=4)
    out = runner.execute([SequenceStep("a", prompts[2][:5], 0, [3, 5], sample=False)])
    assert out.sampled_token_ids == {} and out.num_batched_tokens == 5


def test_plan_violations_are_caught(model, prompts):
    runner = ModelRunner(model, num_blocks=8, block_size=4)
    with pytest.raises(AssertionError, match="need 2 blocks"):
        runner.execute([SequenceStep("a", prompts[0], 0, [1])])
    with pytest.raises(AssertionError, match="bad block id"):
        runner.execute([SequenceStep("a", prompts[3], 0, [8])])
    with pytest.raises(AssertionError, match="twice"):
        runner.execute([SequenceStep("a", [1], 0, [1]), SequenceStep("a", [2], 0, [2])])


def test_pool_is_sized_from_the_model(model):
    runner = ModelRunner(model, num_blocks=5, block_size=4)
    assert runner.pool.k[0].shape == (5, 4, 2, 16)  # (num_blocks, block_size, num_kv_heads, head_dim)
    assert len(runner.pool.k) == len(runner.pool.v) == 2


def test_bf16_model_gets_a_bf16_pool(prompts):
    runner = ModelRunner(tiny_llama().to(torch.bfloat16), num_blocks=8, block_size=4)
    assert runner.pool.k[0].dtype == torch.bfloat16
    out = runner.execute([SequenceStep("a", prompts[0], 0, [0, 1]), SequenceStep("b", [5], 0, [2])])
    assert set(out.sampled_token_ids) == {"a", "b"}


@pytest.mark.parametrize("kind", ["mistral-window", "qwen2-window", "gemma2"])
def test_a_model_whose_attention_the_paged_kernel_lacks_is_refused(kind):
    # Attending to the whole context instead would silently change the answers once a prompt outgrows the window.
    import transformers

    small = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    model = {
        "mistral-window": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=8, **small)),
        "qwen2-window": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            use_sliding_window=True, sliding_window=8, max_window_layers=0, **small)),
        "gemma2": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**small)),
    }[kind]()
    with pytest.raises(ValueError, match="does not implement"):
        ModelRunner(model, num_blocks=8, block_size=4)
    mistral = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=None, **small))
    ModelRunner(mistral, num_blocks=8, block_size=4)  # without a window it is LLaMA's attention: served
