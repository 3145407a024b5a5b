from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from engine_driver import EngineDriver, reference_greedy, tiny_llama

from core import distributed
from serve.engine import parallel
from serve.engine.runner import ModelRunner

ENV_KEYS = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"]


@pytest.fixture
def clean_env(monkeypatch):
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)


def test_single_process_env(clean_env, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")  # set by the user: kept
    distributed.setup_single_process_env()
    assert [os.environ[k] for k in ["RANK", "LOCAL_RANK", "WORLD_SIZE"]] == ["0", "0", "1"]
    assert os.environ["MASTER_ADDR"] == "10.0.0.1" and 0 < int(os.environ["MASTER_PORT"]) < 65536


def test_launcher_env_is_left_alone(clean_env, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    distributed.setup_single_process_env()
    assert "RANK" not in os.environ and distributed.world_size() == 2


def test_disable_shm_comm():
    import deepspeed.ops

    distributed.disable_shm_comm()
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False


def test_runner_drives_a_deepspeed_wrapped_model(clean_env):
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9, 7]]
    reference = reference_greedy(tiny_llama(), prompts, 10)
    engine = parallel.wrap_tensor_parallel(tiny_llama())
    assert type(engine).__name__ == "InferenceEngine"
    sched = EngineDriver(ModelRunner(engine, num_blocks=16, block_size=4), chunk_tokens=4)
    for i, p in enumerate(prompts):
        sched.add(str(i), p, 10)
    sched.run()
    assert [sched.output("0"), sched.output("1")] == reference


def test_tp_beyond_world_size_says_how_to_launch(clean_env):
    with pytest.raises(ValueError, match="deepspeed --num_gpus 2"):
        parallel.wrap_tensor_parallel(tiny_llama(), tp_size=2)


@pytest.mark.integration
def test_two_process_tensor_parallel_matches_one_process(tmp_path):
    """SmolLM2 (9 heads over 3 KV heads) split over 2 CPU processes: rank 0 holds 2 KV heads, rank 1 holds 1."""
    out = tmp_path / "tp.json"
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--no_local_rank", "--num_gpus", "2", "--master_port", str(distributed.free_port()),
           str(Path(__file__).parent / "tp_check.py"), str(out), "--smollm2"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS} | {"OMP_NUM_THREADS": "1"}  # 2 ranks, 2 cores
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["kv_heads_per_rank"] == 2
    assert result["tokens"] == result["reference"]
