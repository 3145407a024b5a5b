"""`--set key=value` overrides (YAML values) coerced to the config's field types, or refused saying why."""

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
