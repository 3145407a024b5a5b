"""`s3 pipeline run`'s bookkeeping on fake stages: when a stage is up to date, and what its input hash covers."""

import dataclasses

import pytest

import pipeline.run as pipeline_run
from pipeline.config import load_config
from pipeline.run import Pipeline, PipelineConfig, _hash
from pipeline.stages import STAGES, Stage


@pytest.fixture
def fake_stages(monkeypatch):
    """Two stages: `train` writes its checkpoint in two steps and is interrupted between them when lr is 0.5."""
    calls = []

    def train(ctx):
        calls.append("train")
        weights = ctx.stage_dir / "weights"
        weights.parent.mkdir(parents=True, exist_ok=True)
        weights.write_text(f"lr={ctx.config.train.lr} half")
        if ctx.config.train.lr == 0.5:
            raise KeyboardInterrupt
        weights.write_text(f"lr={ctx.config.train.lr}")
        return {"weights": str(weights), "fingerprint": f"lr={ctx.config.train.lr}"}

    def collect(ctx):
        calls.append("collect")
        return {"fingerprint": "c"}

    stages = (Stage("train", train, ("train",)), Stage("collect", collect, ("serve",)))
    monkeypatch.setattr(pipeline_run, "STAGES", stages)
    monkeypatch.setattr(pipeline_run, "STAGE_NAMES", ("train", "collect"))
    return calls


def _config(tmp_path, lr):
    return load_config(PipelineConfig, None, [f"runs_dir={tmp_path}", "wandb_mode=disabled", f"train.lr={lr}"])


def test_an_interrupted_stage_is_never_up_to_date(tmp_path, fake_stages):
    Pipeline(_config(tmp_path, 0.1), echo=lambda m: None).run()
    with pytest.raises(KeyboardInterrupt):  # another config's run overwrites the weights, then stops
        Pipeline(_config(tmp_path, 0.5), echo=lambda m: None).run()
    assert not (tmp_path / "default" / "train" / "stage.json").exists()
    with pytest.raises(ValueError, match="stage train has not run yet .* did not finish"):
        Pipeline(_config(tmp_path, 0.1), echo=lambda m: None).run(start="collect")
    fake_stages.clear()
    outputs = Pipeline(_config(tmp_path, 0.1), echo=lambda m: None).run()
    assert fake_stages == ["train"]  # collect's record still matches train's fingerprint
    assert (tmp_path / "default" / "train" / "weights").read_text() == "lr=0.1"
    assert outputs["train"]["fingerprint"] == "lr=0.1"


def test_a_torn_stage_record_reruns_the_stage(tmp_path, fake_stages):
    Pipeline(_config(tmp_path, 0.1), echo=lambda m: None).run()
    (tmp_path / "default" / "train" / "stage.json").write_text('{"inputs_hash": "ab')  # cut short: a full disk
    fake_stages.clear()
    Pipeline(_config(tmp_path, 0.1), echo=lambda m: None).run()
    assert fake_stages == ["train"]


def test_from_and_only_together_are_refused(tmp_path, fake_stages):
    with pytest.raises(ValueError, match="not both"):
        Pipeline(_config(tmp_path, 0.1), echo=lambda m: None).run(start="train", only="collect")


def _inputs_hash(config: PipelineConfig, stage_name: str) -> str:
    stage = next(s for s in STAGES if s.name == stage_name)
    pipeline = Pipeline(config)
    pipeline.outputs = {name: {"fingerprint": name} for name in ("generate", "train", "collect")}
    return _hash(pipeline._inputs(stage))


@pytest.mark.parametrize(("field", "value", "reruns_train", "reruns_retrain"), [
    ("replay_ratio", 2.0, False, True),
    ("feedback_holdout", 0.3, False, True),
    ("feedback_repeat", 3, False, True),
    ("keep_parent_unless_matched", False, False, True),
    ("traffic_monitor", "accuracy", False, True),
    ("replay_only", True, False, True),
    ("wandb_project", "elsewhere", False, False),
    ("wandb_mode", "disabled", False, False),
    ("output_dir", "somewhere", False, False),  # both stages set their own
    ("lr", 1e-3, True, True),
    ("max_prompt_tokens", 64, True, True),
])
def test_a_stage_reruns_only_for_the_settings_it_reads(field, value, reruns_train, reruns_retrain):
    base = PipelineConfig()
    changed = dataclasses.replace(base, train=dataclasses.replace(base.train, **{field: value}))
    assert (_inputs_hash(base, "train") != _inputs_hash(changed, "train")) == reruns_train
    assert (_inputs_hash(base, "retrain") != _inputs_hash(changed, "retrain")) == reruns_retrain


def test_unread_keys_name_fields_that_exist():
    for stage in STAGES:
        for dotted in stage.unread_keys:
            section, key = dotted.split(".")
            assert section in stage.config_keys
            assert key in {f.name for f in dataclasses.fields(getattr(PipelineConfig, section))}


def test_a_stage_reruns_when_a_file_it_reads_changes(tmp_path, monkeypatch):
    # The committed labelled data, edited in place (relabelled, rows added), must not leave the old predictor served.
    data = tmp_path / "data" / "rows.json"
    data.parent.mkdir()
    data.write_text("[1, 2]")
    calls = []

    def generate(ctx):
        calls.append("generate")
        return {"fingerprint": pipeline_run.fingerprint(data.parent)}

    def train(ctx):
        calls.append("train")
        return {"fingerprint": "t"}

    stages = (Stage("generate", generate, ("labelled_data",), reads=lambda config: (str(data.parent),)),
              Stage("train", train, ("train",)))
    monkeypatch.setattr(pipeline_run, "STAGES", stages)
    monkeypatch.setattr(pipeline_run, "STAGE_NAMES", ("generate", "train"))
    Pipeline(_config(tmp_path, 0.1), echo=lambda m: None).run()
    Pipeline(_config(tmp_path, 0.1), echo=lambda m: None).run()
    assert calls == ["generate", "train"]
    data.write_text("[1, 2, 3]")
    Pipeline(_config(tmp_path, 0.1), echo=lambda m: None).run()
    assert calls == ["generate", "train"] * 2


def test_the_shipped_stages_read_the_labelled_data_and_prompt_files():
    config = PipelineConfig()
    reads = {stage.name: stage.reads(config) for stage in STAGES}
    assert reads["generate"] == ("data/labelled/dataset",)
    assert reads["collect"] == reads["bench"] == config.serve.inputs
    assert STAGES[0].reads(dataclasses.replace(config, regenerate=True)) == config.generate.inputs


def test_only_runs_that_stage_and_says_which_earlier_ones_are_out_of_date(tmp_path, fake_stages):
    echoed = []
    Pipeline(_config(tmp_path, 0.1), echo=echoed.append).run(only="train")  # a fresh folder: train alone
    assert fake_stages == ["train"] and not (tmp_path / "default" / "collect").exists()
    Pipeline(_config(tmp_path, 0.1), echo=lambda m: None).run()
    fake_stages.clear()
    runner = Pipeline(_config(tmp_path, 0.2), echo=echoed.append)
    runner.run(only="collect")
    assert fake_stages == ["collect"] and runner.stale == ["train"]
    assert "[train] inputs changed since it ran; kept as asked (--from/--only)" in echoed
