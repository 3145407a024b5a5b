"""Every YAML file in configs/ loads into its dataclass (a typo in a shipped config is a test failure)."""

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.stages import PipelineConfig
from predictor_train.train import TrainConfig
from pipeline.bench import BenchConfig
from serve.server.config import ServeConfig
from serve.sim.simulate import SimulateConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
KINDS = {"serve": ServeConfig, "pipeline": PipelineConfig, "bench": BenchConfig, "simulate": SimulateConfig,
         "train": TrainConfig}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_loads(path):
    kind = path.stem.split("_")[0]
    assert kind in KINDS, f"{path.name}: no dataclass known for configs named {kind}_*.yaml"
    load_config(KINDS[kind], path)
