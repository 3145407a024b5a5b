"""Shared fixtures: small synthetic data and one tiny checkpoint trained once per session."""

from __future__ import annotations

import os

import datasets
import pytest
import torch

from predictor_train.train import TrainConfig, train_predictor

from .synthetic import MAX_TOKENS, NUM_BUCKETS, make_records

TARGET_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="package", autouse=True)
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on a 2-core machine shared with other jobs the OpenMP
    threads contend badly (a 1-layer step took 80 ms with 2 threads, 2 ms with 1). Restored for other packages."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="package")
def records() -> list[dict]:
    return make_records(240)


@pytest.fixture(scope="package")
def dataset(records) -> datasets.Dataset:
    return datasets.Dataset.from_list(records)


def tiny_config(output_dir, **overrides) -> TrainConfig:
    """A TrainConfig that trains the tiny random DistilBERT on the synthetic data in a few seconds."""
    fields = dict(backbone="tiny-random", max_tokens=MAX_TOKENS, num_buckets=NUM_BUCKETS, epochs=3, lr=1e-2,
                  batch_size=16, max_prompt_tokens=32, patience=2, wandb_mode="disabled", output_dir=str(output_dir),
                  seed=2)  # a seed whose 3 epochs learn all three styles on the stratified split
    return TrainConfig(**{**fields, **overrides})


@pytest.fixture(scope="package")
def trained(single_thread, tmp_path_factory, dataset):
    """One training run (DeepSpeed, one process, wandb offline) shared by the tests that need a checkpoint."""
    out = tmp_path_factory.mktemp("predictor")
    saved = os.environ.pop("WANDB_MODE", None)  # this run checks offline logging whatever the shell says
    try:
        return train_predictor(tiny_config(out, wandb_mode="offline"), dataset, target_model=TARGET_MODEL,
                               decoding={"temperature": 0.0, "max_new_tokens": MAX_TOKENS}, progress=False)
    finally:
        if saved is not None:
            os.environ["WANDB_MODE"] = saved
