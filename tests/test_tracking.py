"""One wandb rule for every stage: WANDB_MODE wins, then the config, then offline; nothing inside tracking_off."""

import contextlib

import pytest

from core.tracking import start_run, tracking_off, wandb_mode


def test_the_environment_wins_then_the_config_then_offline(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode(None) == "offline" and wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("online") == "disabled" and wandb_mode(None) == "disabled"


def test_disabled_or_inside_tracking_off_starts_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert start_run(project="p", job_type="t", config={}, mode="offline") is None
    monkeypatch.setenv("WANDB_MODE", "offline")  # would start an offline run, but the caller records itself
    with tracking_off():
        assert start_run(project="p", job_type="t", config={}, dir=str(tmp_path)) is None
    assert not (tmp_path / "wandb").exists()


@pytest.mark.parametrize("configured", ["disabled", None])
def test_an_offline_run_never_needs_the_network(monkeypatch, tmp_path, configured):
    monkeypatch.setenv("WANDB_MODE", "offline")  # wins over a config that says disabled
    run = start_run(project="p", job_type="t", config={"x": 1}, mode=configured, dir=str(tmp_path))
    assert run is not None
    run.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_each_run_goes_under_the_wandb_dir_set_when_it_starts(monkeypatch, tmp_path):
    # wandb reads WANDB_DIR once per process; a second run in the same process must still follow it.
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("first", "second"):
        monkeypatch.setenv("WANDB_DIR", str(tmp_path / name))
        start_run(project="p", job_type="t", config={}).finish()
        assert list((tmp_path / name / "wandb").glob("offline-run-*")), name


def test_an_offline_stage_references_its_checkpoint_instead_of_copying_it(monkeypatch, tmp_path):
    # add_dir would stage a copy of every file under wandb's data folder (the user's home) until a `wandb sync`.
    from pipeline.tracking import log_stage

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(bytes(2_000_000))
    run = start_run(project="p", job_type="train", config={}, dir=str(tmp_path / "runs"))
    log_stage(run, "train", {"checkpoint": str(checkpoint), "fingerprint": "x"})
    run.finish()
    copied = [p for p in tmp_path.rglob("*") if p.is_file() and p.stat().st_size >= 1_000_000 and p.parent != checkpoint]
    assert not copied


class _Run:
    def __init__(self):
        self.finished, self.logged = [], []

    def finish(self, exit_code=None):
        self.finished.append(exit_code)

    def log(self, metrics):
        self.logged.append(metrics)


@pytest.mark.parametrize("error", [None, RuntimeError("diverged"), KeyboardInterrupt()])
def test_a_run_ended_by_an_error_or_ctrl_c_is_finished_as_failed(error):
    """`finally: run.finish()` recorded crashed and interrupted trainings with exit code 0, as finished ones."""
    from core.tracking import finishing

    run = _Run()
    with pytest.raises(type(error)) if error else contextlib.nullcontext():
        with finishing(run):
            if error:
                raise error
    assert run.finished == [1 if error else None]
    with finishing(None):  # tracking off: nothing to finish
        pass
    broken = _Run()
    broken.finish = lambda exit_code=None: (_ for _ in ()).throw(RuntimeError("sync failed"))
    with pytest.raises(type(error)) if error else contextlib.nullcontext():
        with finishing(broken):  # the work's own outcome, not the tracker's failure, reaches the caller
            if error:
                raise error


def test_a_callers_own_run_is_left_running(monkeypatch, tmp_path):
    """reinit="finish_previous" finished a run the caller had open (a notebook's, a sweep agent's)."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    mine = wandb.init(project="mine", mode="offline", dir=str(tmp_path / "mine"))
    try:
        start_run(project="p", job_type="t", config={}, dir=str(tmp_path / "ours")).finish()
        assert not mine._is_finished
    finally:
        mine.finish()


def test_training_curves_have_one_set_of_names_in_s3_train_and_the_pipeline():
    from pipeline.tracking import log_stage
    from predictor_train.train import _log_epoch

    record = {"epoch": 0, "train_loss": None, "loss": 1.5, "accuracy": 0.4,
              "traffic": {"loss": 1.0, "accuracy": 0.5, "mae_tokens": 9.0}}  # fmt: skip
    cli, stage = _Run(), _Run()
    stage.summary = {}
    _log_epoch(cli, record)
    log_stage(stage, "retrain", {"history": [record]})
    assert cli.logged == stage.logged == [{"epoch": 0, "val/loss": 1.5, "val/accuracy": 0.4, "traffic/loss": 1.0,
                                           "traffic/accuracy": 0.5, "traffic/mae_tokens": 9.0}]  # fmt: skip
