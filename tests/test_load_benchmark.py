"""benchmarks/load.py sends requests decoded as the predictor's labels were made."""

from __future__ import annotations

import importlib.util
import pathlib
import sys


LOAD = pathlib.Path(__file__).parents[1] / "benchmarks" / "load.py"


def _load_module(monkeypatch):
    spec = importlib.util.spec_from_file_location("load_benchmark", LOAD)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_request_frequency_penalty_follows_the_predictor(monkeypatch):
    load = _load_module(monkeypatch)
    from pipeline.generate import GenerateConfig

    assert load.request_frequency_penalty(load.LoadConfig()) == GenerateConfig.frequency_penalty
    assert load.request_frequency_penalty(load.LoadConfig(frequency_penalty=0.0)) == 0.0

    class Info:
        decoding = {"frequency_penalty": 1.25}

    monkeypatch.setattr("predictor_train.checkpoint.read_info", lambda path: Info)
    assert load.request_frequency_penalty(load.LoadConfig(predictor="some/checkpoint")) == 1.25
