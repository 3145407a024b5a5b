"""LLMEngine = scheduler + ModelRunner: greedy tokens equal generate()'s under every policy, with preemptions, and
penalised greedy tokens equal a hand-written loop's."""

import random
import re

import pytest
import torch

from core.buckets import BucketSpec
from serve.engine.llm import EngineConfig, LLMEngine
from serve.engine.plan import SamplingParams
from serve.policy_config import PolicyConfig
from core.request import LengthPrediction
from tests.engine.engine_driver import reference_greedy, tiny_llama

NUM_NEW = 24


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(0)
    return [[rng.randrange(1, 128) for _ in range(rng.randint(3, 40))] for _ in range(6)]


@pytest.fixture(scope="module")
def reference(model, prompts):
    return reference_greedy(model, prompts, NUM_NEW)


@pytest.mark.parametrize(
    ("policy", "kv_tokens", "budget"),
    [("max", 4096, 2048), ("paged", 96, 32), ("s3", 96, 32), ("oracle", 512, 16)],
)
def test_greedy_tokens_match_generate(model, prompts, reference, policy, kv_tokens, budget):
    config = EngineConfig(
        kv_cache_tokens=kv_tokens, block_size=4, max_num_seqs=4, max_num_batched_tokens=budget,
        policy=PolicyConfig(policy=policy, watermark=0.0),
    )  # fmt: skip
    engine = LLMEngine(config, model=model, tokenizer=None, buckets=BucketSpec.uniform(NUM_NEW, 4))
    for i, ids in enumerate(prompts):
        # Every prediction says "bucket 0" (6 tokens): s3 must grow or preempt to finish.
        prediction = LengthPrediction(bucket=0, num_tokens=NUM_NEW)
        engine.add_request(str(i), ids, max_new_tokens=NUM_NEW, prediction=prediction)
    done = {}
    while engine.has_unfinished():
        for c in engine.step():
            done[c.request_id] = c
    assert [done[str(i)].output_token_ids for i in range(len(prompts))] == reference
    stats = engine.scheduler.stats
    if policy in ("paged", "s3"):
        assert stats.num_preemptions > 0  # the small pool forced recomputes, and tokens still match
    if policy == "s3":
        assert stats.num_mispredictions > 0
    assert engine.scheduler.pool.num_free_blocks == engine.scheduler.pool.num_blocks


def test_context_overflow_is_refused(model):
    engine = LLMEngine(EngineConfig(kv_cache_tokens=4096), model=model, tokenizer=None)
    with pytest.raises(ValueError, match="exceed the model's 512-token context"):
        engine.add_request("a", [1] * 500, max_new_tokens=20)


def test_a_more_urgent_request_runs_first(model):
    engine = LLMEngine(EngineConfig(kv_cache_tokens=256, block_size=4, max_num_seqs=1,
                                    policy=PolicyConfig(policy="paged")), model=model, tokenizer=None)
    engine.add_request("first", [5, 6, 7], max_new_tokens=3)
    engine.add_request("urgent", [8, 9], max_new_tokens=3, priority=-1)
    order = []
    while engine.has_unfinished():
        order += [c.request_id for c in engine.step()]
    assert order == ["urgent", "first"]


@torch.inference_mode()
def _penalised_greedy(model, prompt: list[int], num_new: int, sampling: SamplingParams) -> list[int]:
    """A plain forward loop applying OpenAI's penalty definition by hand."""
    ids, out = list(prompt), []
    for _ in range(num_new):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        for token in set(out):
            logits[token] -= sampling.frequency_penalty * out.count(token) + sampling.presence_penalty
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


def test_penalties_use_the_generated_tokens_across_preemption(prompts, reference):
    sampling = SamplingParams(frequency_penalty=1.5, presence_penalty=0.5)
    expected = [_penalised_greedy(tiny_llama(), p, NUM_NEW, sampling) for p in prompts]
    assert expected != reference  # the penalties change the answers of this model
    config = EngineConfig(kv_cache_tokens=96, block_size=4, max_num_seqs=4, max_num_batched_tokens=32,
                          policy=PolicyConfig(policy="paged", watermark=0.0))  # fmt: skip
    engine = LLMEngine(config, model=tiny_llama(), tokenizer=None)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, max_new_tokens=NUM_NEW, sampling=sampling)
    done = {}
    while engine.has_unfinished():
        done |= {c.request_id: c.output_token_ids for c in engine.step()}
    assert engine.scheduler.stats.num_preemptions > 0
    assert [done[str(i)] for i in range(len(prompts))] == expected


@torch.inference_mode()
def test_repetition_penalty_is_hugging_faces_and_allowed_tokens_hold(prompts, reference):
    """Greedy with vLLM's repetition_penalty gives generate(repetition_penalty=...)'s tokens (over the prompt and the
    answer so far), through preemptions; allowed_token_ids keeps every answer to its tokens."""
    model = tiny_llama()
    expected = []
    for ids in prompts:
        gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=NUM_NEW, do_sample=False, repetition_penalty=1.8,
                             pad_token_id=model.generation_config.pad_token_id or 0)
        expected.append(gen[0, len(ids):].tolist())
    assert expected != reference  # the penalty changes the answers of this model
    allowed = (3, 7, 11)
    config = EngineConfig(kv_cache_tokens=96, block_size=4, max_num_seqs=4, max_num_batched_tokens=32,
                          policy=PolicyConfig(policy="paged", watermark=0.0))  # fmt: skip
    engine = LLMEngine(config, model=model, tokenizer=None)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, max_new_tokens=NUM_NEW, sampling=SamplingParams(repetition_penalty=1.8))
        engine.add_request(f"allowed{i}", ids, max_new_tokens=NUM_NEW,
                           sampling=SamplingParams(temperature=1.0, seed=i, allowed_token_ids=allowed))
    done = {}
    while engine.has_unfinished():
        done |= {c.request_id: c.output_token_ids for c in engine.step()}
    assert engine.scheduler.stats.num_preemptions > 0
    assert [done[str(i)] for i in range(len(prompts))] == expected
    assert all(set(done[f"allowed{i}"]) <= set(allowed) for i in range(len(prompts)))


@torch.inference_mode()
def test_bad_words_never_appear_and_change_nothing_before_them(prompts, reference):
    """vLLM's bad_words: a greedy answer keeps its tokens up to where a bad word would end, and no answer holds a
    bad word anywhere (a two-token word banned only after its first token, a one-token word everywhere)."""
    pair, single = tuple(reference[0][2:4]), (reference[1][5],)
    config = EngineConfig(kv_cache_tokens=4096, block_size=4, max_num_seqs=8, max_num_batched_tokens=512,
                          policy=PolicyConfig(policy="paged", watermark=0.0))  # fmt: skip
    engine = LLMEngine(config, model=tiny_llama(), tokenizer=None)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, max_new_tokens=NUM_NEW, sampling=SamplingParams(bad_words=(pair, single)))
    done = {}
    while engine.has_unfinished():
        done |= {c.request_id: c.output_token_ids for c in engine.step()}
    for i, answer in enumerate(done[str(i)] for i in range(len(prompts))):
        assert single[0] not in answer
        assert all(tuple(answer[j : j + 2]) != pair for j in range(len(answer) - 1))
        ref = reference[i]
        first_ban = next((j for j, t in enumerate(ref) if t == single[0] or (j and (ref[j - 1], t) == pair)), None)
        if first_ban is None:
            assert answer == ref
        else:
            assert answer[:first_ban] == ref[:first_ban] and answer[first_ban] != ref[first_ban]


def test_logprobs_are_the_models_and_survive_preemption(prompts):
    """Every output token's log-probability, and every prompt token's after the first, equals a plain forward pass
    over prompt + answer (penalties change the tokens picked, not the distribution reported), through chunked
    prefill, preemptions and recompute."""
    sampling = SamplingParams(frequency_penalty=1.5, logprobs=3, prompt_logprobs=2)
    config = EngineConfig(kv_cache_tokens=96, block_size=4, max_num_seqs=4, max_num_batched_tokens=32,
                          policy=PolicyConfig(policy="paged", watermark=0.0))  # fmt: skip
    engine = LLMEngine(config, model=tiny_llama(), tokenizer=None)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, max_new_tokens=NUM_NEW, sampling=sampling if i % 2 else SamplingParams())
    done = {}
    while engine.has_unfinished():
        done |= {c.request_id: c.request for c in engine.step()}
    assert engine.scheduler.stats.num_preemptions > 0
    assert max(len(p) for p in prompts) > config.max_num_batched_tokens  # some prompt is chunked
    assert any(done[str(i)].num_preemptions for i in range(1, len(prompts), 2))  # and some asking is recomputed
    reference = tiny_llama()
    for i, ids in enumerate(prompts):
        request = done[str(i)]
        if i % 2 == 0:
            assert request.output_logprobs == request.prompt_logprobs == []  # not asked for
            continue
        out = request.output_token_ids
        assert len(request.output_logprobs) == len(out) == NUM_NEW
        with torch.no_grad():
            everything = reference(torch.tensor([[*ids, *out]])).logits[0].float().log_softmax(-1)
        assert len(request.prompt_logprobs) == len(ids) - 1
        got = torch.tensor([lp.logprob for lp in request.prompt_logprobs])
        assert torch.allclose(got, everything[:len(ids) - 1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1),
                              atol=1e-4)
        assert all([t for t, _ in lp.top] == row.topk(2).indices.tolist()
                   for lp, row in zip(request.prompt_logprobs, everything))
        expected = everything[len(ids) - 1:-1]
        got = torch.tensor([lp.logprob for lp in request.output_logprobs])
        assert torch.allclose(got, expected.gather(-1, torch.tensor(out)[:, None]).squeeze(-1), atol=1e-4)
        for lp, row in zip(request.output_logprobs, expected):
            assert [t for t, _ in lp.top] == row.topk(3).indices.tolist()


@pytest.mark.parametrize("policy", ["paged", "s3"])
def test_prefix_caching_changes_no_token_and_computes_less(model, policy):
    """Prompts over a shared 21-token "system prompt" (some repeated whole), in a pool small enough to preempt:
    with prefix caching the greedy tokens are generate()'s, the cached blocks are read instead of computed, and the
    prompt logprobs a request asks for still come from computing its prompt."""
    rng = random.Random(1)
    system = [rng.randrange(1, 128) for _ in range(21)]
    prompts = [system + [rng.randrange(1, 128) for _ in range(rng.randint(1, 9))] for _ in range(5)]
    prompts += [prompts[0], prompts[2]]
    expected = reference_greedy(tiny_llama(), prompts, NUM_NEW)  # `model` may already run paged attention
    computed = {}
    for caching in (False, True):
        config = EngineConfig(kv_cache_tokens=112, block_size=4, max_num_seqs=4, max_num_batched_tokens=32,
                              policy=PolicyConfig(policy=policy, watermark=0.0), enable_prefix_caching=caching)
        engine = LLMEngine(config, model=model, tokenizer=None, buckets=BucketSpec.uniform(NUM_NEW, 4))
        done = {}
        for i, ids in enumerate(prompts):
            engine.add_request(str(i), ids, max_new_tokens=NUM_NEW,
                               prediction=LengthPrediction(bucket=0, num_tokens=NUM_NEW))
            if i == 0:  # the first one alone, so the others find its blocks
                while engine.has_unfinished():
                    done |= {c.request_id: c.output_token_ids for c in engine.step()}
        while engine.has_unfinished():
            done |= {c.request_id: c.output_token_ids for c in engine.step()}
        assert [done[str(i)] for i in range(len(prompts))] == expected
        stats = engine.scheduler.stats
        computed[caching] = stats.num_batched_tokens
        assert stats.num_preemptions > 0 and engine.scheduler.pool.num_free_blocks == engine.scheduler.pool.num_blocks
        assert (stats.num_prefix_hit_tokens > 5 * 20) == caching
    assert computed[True] < computed[False] - 100


def test_structured_outputs_hold_through_preemption():
    """Answers held to a regex (22 characters, then the end) are the same with a pool that preempts and recomputes
    them as with one that never does: the format's state is rebuilt from the answer so far."""
    from serve.engine.plan import StructuredOutput
    from tests.server.fakes import CharTokenizer

    fmt = StructuredOutput("regex", "([0-9][a-z]){11}")
    answers = {}
    for kv_tokens in (4096, 96):
        config = EngineConfig(kv_cache_tokens=kv_tokens, block_size=4, max_num_seqs=4, max_num_batched_tokens=32,
                              policy=PolicyConfig(policy="paged", watermark=0.0))
        engine = LLMEngine(config, model=tiny_llama(), tokenizer=CharTokenizer())
        for i in range(5):
            engine.add_request(str(i), [40 + i] * 9, max_new_tokens=NUM_NEW,
                               sampling=SamplingParams(structured=fmt, temperature=0.8, seed=i))
        done = {}
        while engine.has_unfinished():
            done |= {c.request_id: c.output_token_ids for c in engine.step()}
        answers[kv_tokens] = [CharTokenizer().decode(done[str(i)]) for i in range(5)]
        assert (engine.scheduler.stats.num_preemptions > 0) == (kv_tokens == 96)
    assert answers[96] == answers[4096]
    assert all(re.fullmatch("([0-9][a-z]){11}\u0101", a) for a in answers[96]), answers[96]  # EOS (id 1) last


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_recomputed_tokens_are_the_tokens_computed_again(model, prefix_caching):
    """A preempted sequence re-admitted onto its blocks still in the prefix cache (a system prompt others hold)
    computes only the rest again: that is what counts as recomputed (every token it had computed was counted,
    4.6x too many here)."""
    rng = random.Random(0)
    system = [rng.randrange(1, 128) for _ in range(64)]
    prompts = [system + [rng.randrange(1, 128) for _ in range(8)] for _ in range(4)]
    engine = LLMEngine(EngineConfig(kv_cache_tokens=176, block_size=8, max_num_seqs=4, max_num_batched_tokens=256,
                                    enable_prefix_caching=prefix_caching,
                                    policy=PolicyConfig(policy="paged", watermark=0.0)), model=model, tokenizer=None)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, max_new_tokens=40)
    while engine.has_unfinished():
        engine.step()
    stats, requests = engine.scheduler.stats, [engine.scheduler.requests[str(i)] for i in range(4)]
    computed_once = sum(len(p) - r.num_cached_tokens + 39 for p, r in zip(prompts, requests))
    assert stats.num_preemptions > 0
    assert stats.num_recomputed_tokens == stats.num_batched_tokens - computed_once
    assert stats.num_recomputed_tokens == sum(r.num_recomputed_tokens for r in requests)
