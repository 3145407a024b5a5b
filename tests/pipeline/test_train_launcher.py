"""`s3 train` under the deepspeed launcher with two ranks (data parallel over gloo on the CPU), as on GPUs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.distributed import free_port
from tests.pipeline.test_train_cli import TINY

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # two processes under the deepspeed launcher
def test_train_with_two_ranks(labelled, tmp_path):
    out = tmp_path / "predictor"
    args = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
            "--module", "pipeline.cli", "train", "--data", str(labelled), "--output-dir", str(out), *TINY]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run(args, cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    info = json.loads((out / "predictor.json").read_text())
    assert info["target_model"] == "tiny-target"
    assert output.count("test split:") == 1, "only rank 0 reports"
