"""Training config, DeepSpeed setup and a real (tiny) DeepSpeed training run in this process."""

from __future__ import annotations

import json
import os

import pytest

from core.buckets import BucketSpec
from predictor_train.checkpoint import PREDICTOR_FILE, compute_checkpoint_id, read_info
from core.distributed import disable_shm_comm, setup_single_process_env
from predictor_train.evaluate import evaluate_checkpoint
from predictor_train.inference import LengthPredictor
from predictor_train.distributed import build_deepspeed_config
from predictor_train.train import TrainConfig, _improved, make_buckets, train_predictor

from .conftest import TARGET_MODEL, tiny_config
from .synthetic import NUM_BUCKETS


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(lr=-1.0), dict(bucket_scheme="log"), dict(wandb_mode="on"),
                                 dict(max_tokens=5, num_buckets=10), dict(monitor="f1"), dict(loss="mse"),
                                 dict(label_sigma=0.0), dict(feedback_holdout=1.0), dict(replay_ratio=-1.0),
                                 dict(prompt_truncation="middle"), dict(traffic_monitor="f1")])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


def test_config_fields_are_documented():
    import inspect

    source = inspect.getsource(TrainConfig)
    for name in TrainConfig.__dataclass_fields__:
        assert f"    {name}:" in source and source.split(f"    {name}:")[1].splitlines()[1].strip().startswith('"""')


def _ds_config(name: str) -> dict:
    return build_deepspeed_config(name, batch_size=TrainConfig.batch_size, lr=TrainConfig.lr)


def test_deepspeed_config_takes_batch_size_and_lr_from_train_config():
    cpu = build_deepspeed_config("predictor_cpu.json", batch_size=7, lr=1e-3)
    assert cpu["train_micro_batch_size_per_gpu"] == 7 and cpu["optimizer"]["params"]["lr"] == 1e-3
    assert cpu["optimizer"]["params"]["torch_adam"] is True and cpu["zero_optimization"]["stage"] in (0, 1)
    assert not cpu["bf16"]["enabled"] and "train_batch_size" not in cpu
    gpu = _ds_config("configs/deepspeed/predictor_gpu.json")
    assert gpu["bf16"]["enabled"] and gpu["zero_optimization"]["stage"] == 2


def test_auto_deepspeed_config_is_cpu_without_cuda():
    import torch

    ds = _ds_config(TrainConfig.deepspeed_config)
    assert ds["bf16"]["enabled"] == torch.cuda.is_available()


@pytest.mark.parametrize("section, message", [({"zero_optimization": {"stage": 3}}, "stage 3"),
                                              ({"fp16": {"enabled": True}}, "fp16")])
def test_unsupported_deepspeed_configs_are_refused(tmp_path, section, message):
    import torch

    if message == "fp16" and torch.cuda.is_available():
        pytest.skip("fp16 is fine with CUDA")
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {}}, **section}))
    with pytest.raises(ValueError, match=message):
        _ds_config(str(path))


def test_missing_deepspeed_config_says_where_it_looked():
    with pytest.raises(FileNotFoundError, match="not found"):
        _ds_config("nope.json")


def test_shm_comm_op_is_switched_off():
    import deepspeed
    from deepspeed.comm.torch import build_shm_op

    disable_shm_comm()
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False
    assert build_shm_op() is None  # the JIT build is skipped, not attempted


def test_single_process_env_keeps_what_a_launcher_set(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    setup_single_process_env()
    assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1"
    assert os.environ["MASTER_ADDR"] == "10.0.0.1" and int(os.environ["MASTER_PORT"]) > 0


def test_bucket_schemes():
    assert make_buckets(TrainConfig(max_tokens=500, num_buckets=5), []) == BucketSpec.uniform(500, 5)
    spec = make_buckets(TrainConfig(max_tokens=500, num_buckets=4, bucket_scheme="quantile"), list(range(1, 401)))
    assert spec.max_tokens == 500 and spec.num_buckets == 4


def test_training_writes_a_loadable_checkpoint(trained, dataset, tmp_path):
    folder = trained.checkpoint_dir
    for name in ("config.json", "model.safetensors", "tokenizer.json", PREDICTOR_FILE):
        assert (folder / name).is_file(), name
    info = read_info(folder)
    assert info == trained.info and info.checkpoint_id == compute_checkpoint_id(folder, info)
    assert info.target_model == TARGET_MODEL and info.buckets.num_buckets == NUM_BUCKETS
    assert info.train_config["backbone"] == "tiny-random" and info.decoding["temperature"] == 0.0
    assert info.deepspeed_config["train_micro_batch_size_per_gpu"] == 16 and info.backbone_kind == "tiny-random"
    assert info.metrics["epoch"] == trained.best_epoch and len(trained.history) <= 3
    # where the training lengths fall inside each bucket, for the s3 policy's remaining-length estimate
    assert len(info.length_shape) == NUM_BUCKETS and all(abs(sum(row) - 1) < 1e-9 for row in info.length_shape)
    assert len(info.length_prior) == NUM_BUCKETS and abs(sum(info.length_prior) - 1) < 1e-9
    loaded = LengthPredictor.load(folder)
    assert loaded.length_shape == tuple(tuple(row) for row in info.length_shape)
    assert loaded.length_prior == tuple(info.length_prior)
    assert list((folder / "wandb").glob("offline-run-*")), "wandb should log offline"
    # The synthetic task is easy: the instruction fixes the bucket.
    assert max(h["accuracy"] for h in trained.history) >= 0.8
    report = evaluate_checkpoint(folder, dataset, out_dir=tmp_path)
    assert report.metrics["predictor"]["accuracy"] > report.metrics["majority"]["accuracy"]
    assert report.confusion_png.is_file() and report.reliability_png.read_bytes()[:4] == b"\x89PNG"


def test_training_fits_and_stores_a_temperature(trained, dataset):
    info = trained.info
    assert info.temperature > 0 and info.metrics["temperature"] == info.temperature
    # fitted on the validation split by NLL: it cannot make the validation NLL worse
    assert info.metrics["nll_calibrated"] <= info.metrics["nll_uncalibrated"] + 1e-6
    report = evaluate_checkpoint(trained.checkpoint_dir, dataset)
    assert {"predictor, T=1", "source histogram"} <= set(report.probabilities)
    assert all(0 <= m["coverage_q90"] <= 1 for m in report.probabilities.values())


@pytest.mark.parametrize("loss", ["soft", "rps"])
def test_ordered_losses_train(tmp_path, dataset, loss):
    config = tiny_config(tmp_path, loss=loss, epochs=2, calibrate=False)
    result = train_predictor(config, dataset, target_model=TARGET_MODEL, progress=False)
    assert result.info.train_config["loss"] == loss and result.info.temperature == 1.0
    assert result.history[-1]["within_one_accuracy"] >= 0.8


def test_leave_out_and_cap_change_the_train_split_only(tmp_path, records):
    import datasets

    rows = [{**r, "source": "kept" if i % 3 else "left"} for i, r in enumerate(records)]
    ds = datasets.Dataset.from_list(rows)
    config = tiny_config(tmp_path, epochs=1, exclude_sources=("left",), max_train_rows_per_source=50,
                         calibrate=False)
    result = train_predictor(config, ds, target_model=TARGET_MODEL, progress=False)
    assert result.info.data["train_by_source"] == {"kept": 50}
    assert result.info.data["test"] == len(split_records_of(ds)["test"])  # the test split keeps every source


def test_excluding_an_unknown_source_is_refused(tmp_path, records):
    import datasets

    ds = datasets.Dataset.from_list([{**r, "source": "kept"} for r in records])
    with pytest.raises(ValueError, match="no rows of source.*nowhere.*the data has kept"):
        train_predictor(tiny_config(tmp_path, exclude_sources=("nowhere",)), ds, target_model=TARGET_MODEL,
                        progress=False)


def split_records_of(ds):
    from predictor_train.data import split_records

    return split_records(ds)


def test_early_stopping_with_patience(tmp_path, dataset):
    # A learning rate this small changes nothing, so validation accuracy never improves after epoch 1.
    config = tiny_config(tmp_path, epochs=5, lr=1e-12, patience=1, monitor="accuracy")
    result = train_predictor(config, dataset, target_model=TARGET_MODEL, progress=False)
    assert len(result.history) == 2 and result.best_epoch == 1


def test_an_epoch_must_match_the_best_on_validation_and_on_served_traffic_each_by_its_own_metric():
    best = {"loss": 1.0, "accuracy": 0.5, "mae_tokens": 50.0,
            "traffic": {"loss": 2.0, "accuracy": 0.2, "mae_tokens": 100.0}}
    sharper = {"loss": 0.9, "accuracy": 0.5, "mae_tokens": 60.0,
               "traffic": {"loss": 1.9, "accuracy": 0.3, "mae_tokens": 90.0}}
    assert _improved(sharper, best, "loss", ties=False) and not _improved(sharper, best, "mae", ties=True)
    assert _improved(sharper, best, "accuracy", ties=True) and not _improved(sharper, best, "accuracy", ties=False)
    further = {**sharper, "traffic": {"loss": 1.9, "accuracy": 0.3, "mae_tokens": 120.0}}  # more right, further off
    assert _improved(further, best, "loss", ties=False, traffic_monitor="accuracy")
    assert not _improved(further, best, "loss", ties=False, traffic_monitor="mae")
    assert _improved(best, None, "mae", ties=False)


def _copy_of(trained, tmp_path):
    import shutil

    folder = tmp_path / "served"
    shutil.copytree(trained.checkpoint_dir, folder)
    return folder, {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_a_run_stopped_early_leaves_the_checkpoint_in_its_folder_whole(trained, dataset, tmp_path, monkeypatch):
    """Training into a folder that holds a checkpoint (the one being served, say) replaces it only once the new one
    is complete: stopped after its first epoch was saved, the old one is still there, byte for byte."""
    import predictor_train.train as train_module

    folder, before = _copy_of(trained, tmp_path)
    epoch = train_module.train_epoch

    def stopped_in_epoch_2(*args, **kwargs):
        if kwargs["epoch"] == 2:
            raise KeyboardInterrupt
        return epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_epoch", stopped_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_predictor(tiny_config(folder), dataset, target_model=TARGET_MODEL, progress=False)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    assert LengthPredictor.load(folder).checkpoint_id == trained.info.checkpoint_id

    monkeypatch.setattr(train_module, "train_epoch", epoch)  # a run that ends replaces it, leaving no staging behind
    result = train_predictor(tiny_config(folder, epochs=1), dataset, target_model=TARGET_MODEL, progress=False)
    assert read_info(folder) == result.info and not (folder / ".partial").exists()


def test_a_diverged_run_is_an_error_and_keeps_the_folder(trained, dataset, tmp_path, monkeypatch):
    import predictor_train.train as train_module

    folder, before = _copy_of(trained, tmp_path)
    monkeypatch.setattr(train_module, "validate", lambda *args, **kwargs: {"loss": float("nan")})
    with pytest.raises(ValueError, match="training diverged at epoch 1: .* lower lr"):
        train_predictor(tiny_config(folder), dataset, target_model=TARGET_MODEL, progress=False)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


def test_too_little_data_is_refused(tmp_path, records):
    import datasets

    tiny = datasets.Dataset.from_list(records[:2])  # the stratified cut leaves none for validation
    with pytest.raises(ValueError, match="validation"):
        train_predictor(tiny_config(tmp_path), tiny, target_model=TARGET_MODEL, progress=False)


def test_labels_past_max_tokens_and_collapsed_quantile_buckets_are_reported(caplog):
    """Data without a recipe.json labelled with a larger cap, and quantile edges that repeat, were silent."""
    with caplog.at_level("WARNING", logger="predictor_train.train"):
        make_buckets(TrainConfig(max_tokens=500, num_buckets=5), [10, 600, 900, 20])
    assert "2 of the 4 training labels are longer than max_tokens=500" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="predictor_train.train"):
        spec = make_buckets(TrainConfig(max_tokens=500, num_buckets=5, bucket_scheme="quantile"), [500] * 7 + [100] * 3)
    assert spec.num_buckets < 5 and "bucket_scheme=quantile: 2 buckets, not 5" in caplog.text
