"""`--set key=value` overrides (YAML values) coerced to the config's field types, or refused saying why."""

import dataclasses

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.run import PipelineConfig
from predictor_train.train import TrainConfig


def test_a_single_value_for_a_tuple_field_is_a_list_of_one():
    assert load_config(TrainConfig, None, ["exclude_sources=gsm8k_train"]).exclude_sources == ("gsm8k_train",)
    config = load_config(PipelineConfig, None, ["serve.inputs=data/prompts/nq_open.json"])
    assert config.serve.inputs == ("data/prompts/nq_open.json",)
    assert load_config(TrainConfig, None, ["exclude_sources=[a, b]"]).exclude_sources == ("a", "b")
    with pytest.raises(ConfigError, match="exclude_sources: expected a list"):
        load_config(TrainConfig, None, ["exclude_sources={a: 1}"])


@pytest.mark.parametrize(("text", "value"), [("1e-4", 1e-4), ("3e-5", 3e-5), ("1.0e-4", 1e-4), ("2", 2.0)])
def test_a_float_field_takes_exponents_without_a_dot(text, value):
    # YAML 1.1 reads 1e-4 (no dot) as a string.
    lr = load_config(TrainConfig, None, [f"lr={text}"]).lr
    assert lr == value and isinstance(lr, float)


def test_a_float_field_refuses_text_that_is_no_number():
    with pytest.raises(ConfigError, match=r"config\.lr: expected a number, got 'fast'"):
        load_config(TrainConfig, None, ["lr=fast"])


@pytest.mark.parametrize("text", ["true", "no", "on"])
def test_an_int_field_refuses_booleans(text):
    with pytest.raises(ConfigError, match=r"config\.epochs: expected an integer, got (True|False)"):
        load_config(TrainConfig, None, [f"epochs={text}"])
    assert load_config(TrainConfig, None, ["epochs=4"]).epochs == 4
    assert load_config(TrainConfig, None, [f"calibrate={text}"]).calibrate in (True, False)


def test_a_nested_override_changes_only_the_field_it_names(tmp_path):
    """`--set engine.max_num_seqs=8` on a config without an `engine:` section kept none of the serve config's own
    engine defaults (the `s3` policy, prefix caching): the section was rebuilt from EngineConfig's."""
    from serve.server.config import ServeConfig
    from serve.sim.simulate import SimulateConfig

    default = ServeConfig().engine
    config = load_config(ServeConfig, None, ["engine.max_num_seqs=8"])
    assert config.engine.max_num_seqs == 8
    assert dataclasses.replace(config.engine, max_num_seqs=default.max_num_seqs) == default
    assert load_config(ServeConfig, None, values={"engine.enable_prefix_caching": True}).engine.policy == default.policy
    workload = load_config(SimulateConfig, None, ["workload.output_tokens.sigma=1.2"]).workload
    assert workload.output_tokens == dataclasses.replace(SimulateConfig().workload.output_tokens, sigma=1.2)
    path = tmp_path / "serve.yaml"  # a file's section, then an override of one field in it
    path.write_text("engine:\n  max_num_seqs: 4\n  policy:\n    policy: paged\n")
    config = load_config(ServeConfig, path, ["engine.policy.quantile=0.7"])
    assert (config.engine.max_num_seqs, config.engine.policy.policy, config.engine.policy.quantile) == (4, "paged", 0.7)


@pytest.mark.parametrize("override", ["workload=[", "workload=a: b: c"])
def test_yaml_that_does_not_parse_is_a_config_error(tmp_path, override):
    from serve.sim.simulate import SimulateConfig

    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(SimulateConfig, None, [override])
    path = tmp_path / "bad.yaml"
    path.write_text("a: [")
    with pytest.raises(ConfigError, match=f"config file {path} is not valid YAML"):
        load_config(SimulateConfig, path)
