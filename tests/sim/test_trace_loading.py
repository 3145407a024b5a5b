"""Length traces: a row the simulator cannot serve as written is refused at load, named by file and row (before
the shuffle renumbers it); what a spreadsheet writes (a byte-order mark, "10" as text) loads."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from serve.sim.workload import load_trace


def _jsonl(tmp_path, *rows: str):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(f"{row}\n" for row in ['{"num_prompt_tokens": 5, "num_output_tokens": 9}', *rows]))
    return path


@pytest.mark.parametrize("row, words", [
    ('{"num_prompt_tokens": 0, "num_output_tokens": 5}', "num_prompt_tokens >= 1"),
    ('{"num_prompt_tokens": -20, "num_output_tokens": 5}', "num_prompt_tokens >= 1"),
    ('{"num_prompt_tokens": 10, "num_output_tokens": -3}', "num_output_tokens >= 0"),
    ('{"num_prompt_tokens": 10.9, "num_output_tokens": 5}', "num_prompt_tokens must be a whole number, got 10.9"),
    ('{"num_prompt_tokens": true, "num_output_tokens": 5}', "num_prompt_tokens must be a whole number, got True"),
    ('{"num_prompt_tokens": 10, "num_output_tokens": "many"}', "num_output_tokens must be a whole number"),
    ('{"num_prompt_tokens": 10, "num_output_tokens": 5, "predicted_bucket": 1.5}', "predicted_bucket must be a whole"),
    ('{"num_prompt_tokens": 10, "num_output_tokens": 5, "probs": 3}', "probs must be a list of numbers"),
    # NaN (which Python's JSON parser reads), negative or all-zero probabilities crashed the estimator after
    # earlier policies had run (an empty length distribution)
    ('{"num_prompt_tokens": 10, "num_output_tokens": 5, "probs": [NaN, 1]}', "probs must be finite numbers >= 0"),
    ('{"num_prompt_tokens": 10, "num_output_tokens": 5, "probs": [-1, 2]}', "probs must be finite numbers >= 0"),
    ('{"num_prompt_tokens": 10, "num_output_tokens": 5, "probs": [0, 0]}', "not all 0"),
    ('{"num_prompt_tokens": 10}', "needs integer num_prompt_tokens and num_output_tokens"),
])  # fmt: skip
def test_a_bad_jsonl_row_is_refused_by_file_and_row(tmp_path, row, words):
    """Before, int() truncated 10.9 and read true as 1, and a prompt of 0 or fewer tokens reached the scheduler,
    which named the request by its index after the shuffle."""
    with pytest.raises(ValueError, match=rf"t.jsonl, row 2: .*{words}"):
        load_trace(_jsonl(tmp_path, row))


def test_csv_and_jsonl_read_numbers_alike(tmp_path):
    """A CSV cell is text: "10.9" is refused as 10.9 is in JSONL, "10.0" accepted as 10.0 is."""
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("num_prompt_tokens,num_output_tokens\n5,9\n10.9,5\n")
    with pytest.raises(ValueError, match=r"t.csv, row 2: num_prompt_tokens must be a whole number, got '10.9'"):
        load_trace(csv_path)
    csv_path.write_text("num_prompt_tokens,num_output_tokens\n10.0,5\n")
    jsonl = _jsonl(tmp_path, '{"num_prompt_tokens": 10.0, "num_output_tokens": 5}')
    assert [(r.num_prompt_tokens, r.num_output_tokens) for r in load_trace(csv_path)] == [(10, 5)]
    assert [(r.num_prompt_tokens, r.num_output_tokens) for r in load_trace(jsonl)] == [(5, 9), (10, 5)]


def test_an_answer_of_no_tokens_is_simulated_as_one(tmp_path):
    """0 output tokens (the first sample ended it) is a real answer; the executor samples at least one token."""
    rows = load_trace(_jsonl(tmp_path, '{"num_prompt_tokens": 10, "num_output_tokens": 0}'))
    assert [r.num_output_tokens for r in rows] == [9, 1]


def test_a_csv_with_a_byte_order_mark_loads(tmp_path):
    """Spreadsheets write one; it used to become part of the first column's name (a KeyError)."""
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffnum_prompt_tokens,num_output_tokens\n10,5\n12,6\n".encode())
    assert [(r.num_prompt_tokens, r.num_output_tokens) for r in load_trace(path)] == [(10, 5), (12, 6)]


def test_a_folder_or_binary_file_is_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="is not a file"):  # was IsADirectoryError
        load_trace(tmp_path)
    (tmp_path / "t.jsonl").write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ValueError, match="t.jsonl is not UTF-8 text"):
        load_trace(tmp_path / "t.jsonl")


def test_the_cli_names_the_bad_row_and_the_folder(tmp_path):
    from pipeline.cli import main

    bad = _jsonl(tmp_path, *['{"num_prompt_tokens": 7, "num_output_tokens": 5}'] * 5,
                 '{"num_prompt_tokens": 0, "num_output_tokens": 5}')
    for trace, words in ((bad, "t.jsonl, row 7: needs num_prompt_tokens >= 1"), (tmp_path, "is not a file")):
        result = CliRunner().invoke(main, ["simulate", "--trace", str(trace), "--num-requests", "10", "--policies",
                                           "paged", "--output-dir", str(tmp_path / "out")])  # fmt: skip
        assert result.exit_code == 2 and words in result.output, result.output
