"""The model and the cost model are two executors of one step loop: given the same requests and the same output
lengths, they make the scheduler produce the same schedule, step for step."""

import random

import pytest

from core.request import Request
from serve.engine.llm import EngineConfig, LLMEngine
from serve.policy_config import PolicyConfig
from serve.sched_output import SchedulerOutput
from serve.scheduler import Scheduler
from serve.sim.costmodel import get_preset
from serve.sim.runner import CostModelExecutor, SimClock
from serve.step import EngineCore
from tests.engine.engine_driver import tiny_llama

MAX_NEW = 20


def _trace(out: SchedulerOutput) -> tuple:
    seqs = tuple((s.request_id, s.start, s.num_new_tokens, tuple(s.block_ids), s.samples) for s in out.seqs)
    return seqs, tuple(out.new_request_ids), tuple(out.preempted_request_ids), tuple(out.finished_request_ids)


@pytest.mark.parametrize("policy", ["paged", "max"])
def test_model_and_cost_model_make_the_same_schedule(policy):
    rng = random.Random(1)
    prompts = {str(i): [rng.randrange(1, 128) for _ in range(rng.randint(3, 30))] for i in range(8)}
    config = EngineConfig(kv_cache_tokens=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=24,
                          policy=PolicyConfig(policy=policy, watermark=0.0))  # fmt: skip
    engine = LLMEngine(config, model=tiny_llama(), tokenizer=None, clock=lambda: 0.0)
    engine.executor.eos_token_ids = set(range(0, 128, 23))  # varied lengths from a model with no EOS of its own
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, max_new_tokens=MAX_NEW)
    model_trace, lengths = [], {}
    while engine.has_unfinished():
        step = engine.core.step()
        model_trace.append(_trace(step.output))
        lengths |= {r.request_id: r.num_output_tokens for r in step.finished}
    assert len(set(lengths.values())) > 1
    if policy == "paged":
        assert engine.snapshot().stats.num_preemptions > 0

    clock = SimClock()
    scheduler = Scheduler(config.scheduler_config(), clock=clock)
    core = EngineCore(scheduler, CostModelExecutor(get_preset("paper"), lengths, clock))
    for rid, ids in prompts.items():
        scheduler.add_request(Request(rid, ids, max_new_tokens=MAX_NEW))
    sim_trace = []
    while core.has_unfinished():
        sim_trace.append(_trace(core.step().output))
    assert sim_trace == model_trace
