"""Fixtures of the pipeline tests."""

import json

import datasets
import pytest

from tests.predictor.synthetic import MAX_TOKENS, make_records


@pytest.fixture(scope="session")
def labelled(tmp_path_factory):
    """A folder shaped like `s3 generate`'s output."""
    folder = tmp_path_factory.mktemp("labelled")
    datasets.Dataset.from_list(make_records(240)).save_to_disk(str(folder / "dataset"))
    (folder / "recipe.json").write_text(json.dumps({"model": "tiny-target", "max_new_tokens": MAX_TOKENS,
                                                    "temperature": 0.0, "top_p": 1.0}))  # fmt: skip
    return folder
