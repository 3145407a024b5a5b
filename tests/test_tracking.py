"""One wandb rule for every stage: WANDB_MODE wins, then the config, then offline; nothing inside tracking_off."""

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
