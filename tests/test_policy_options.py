"""serve/policy_options.py: the policy knobs' command-line options, declared once from PolicyConfig."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from serve.policy_config import PolicyConfig
from serve.policy_options import KNOBS, field_docs, knob_help, policy_options


def parsed(*args: str) -> PolicyConfig:
    configs = []

    @click.command()
    @policy_options()
    def command(**knobs):
        configs.append(PolicyConfig(**knobs))

    result = CliRunner().invoke(command, list(args))
    assert result.exit_code == 0, result.output
    return configs[0]


def test_options_default_to_policy_config_and_set_its_fields():
    assert parsed() == PolicyConfig()
    config = parsed("--quantile", "0.9", "--aging-s", "12", "--no-resume-first", "--short-queue", "0")
    assert (config.quantile, config.aging_s, config.resume_first, config.short_queue) == (0.9, 12.0, False, 0)
    assert config.aging_queue_factor == PolicyConfig.aging_queue_factor


def test_every_field_has_a_one_sentence_help():
    assert set(field_docs(PolicyConfig)) == set(PolicyConfig.__dataclass_fields__)
    for name in KNOBS:
        assert knob_help(name).endswith(".") and knob_help(name) in field_docs(PolicyConfig)[name]
    assert "Each running sequence" not in knob_help("quantile")  # the first sentence only


def test_unknown_knobs_are_refused():
    with pytest.raises(ValueError, match="not PolicyConfig fields: qantile"):
        policy_options(("qantile",))


def test_load_config_carries_every_knob_to_the_servers(import_benchmark):
    load = import_benchmark("load")
    assert {name: getattr(load.LoadConfig, name) for name in KNOBS} == {
        name: getattr(PolicyConfig, name) for name in KNOBS}
    cfg = load.LoadConfig(quantile=0.8, aging_s=5.0, resume_first=False)
    engine = load.serve_config(cfg, "s3", 8000, oracle_lengths=None, feedback_dir="unused").engine
    assert (engine.policy.policy, engine.policy.quantile, engine.policy.aging_s) == ("s3", 0.8, 5.0)
    assert engine.policy.resume_first is False
