import collections
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from serve.feedback import (
    FeedbackWriter, feedback_record, format_summary, is_feedback_record, mispredicted, read_feedback, summarize,
    summarize_store,
)  # fmt: skip
from tests.fakes import make_request, make_scheduler, run_until_done


def _record(request_id: str, *, predicted_bucket: int | None = 0, true_bucket: int = 1, **extra) -> dict:
    """A record with the schema the server writes (serve.feedback.feedback_record)."""
    return {"request_id": request_id, "prompt": f"prompt {request_id}", "source": "feedback",
            "num_prompt_tokens": 3, "num_output_tokens": 10, "finished": True,
            "predicted_bucket": predicted_bucket, "true_bucket": true_bucket} | extra


def test_records_of_mispredicted_requests_have_the_training_schema(tmp_path):
    sched = make_scheduler("s3", num_blocks=32)
    sched.add_request(make_request("a", bucket=0, max_new_tokens=64))
    (request,) = run_until_done(sched, {"a": 40})
    record = feedback_record(request, sched.policy.buckets, checkpoint_id="ckpt-1")
    assert record["num_output_tokens"] == 40 and record["predicted_bucket"] == 0 and record["true_bucket"] == 2
    assert record["prompt"] == "prompt a" and record["finished"] and record["num_mispredictions"] == 2
    with FeedbackWriter(tmp_path) as writer:
        writer.write(record)
    assert list(read_feedback(tmp_path)) == [record]


def test_under_and_over_predictions_are_mispredictions_and_a_cut_answer_is_neither():
    sched = make_scheduler("s3", num_blocks=64)
    requests = [make_request("under", bucket=0), make_request("over", bucket=3), make_request("hit", bucket=0),
                make_request("cut", bucket=3, max_new_tokens=3), make_request("unpredicted")]
    for request in requests:
        sched.add_request(request)
    finished = run_until_done(sched, {"under": 20, "over": 3, "hit": 3, "cut": 30, "unpredicted": 3})
    assert {r.request_id: r.finish_reason for r in finished}["cut"] == "length"
    assert {r.request_id for r in finished if mispredicted(r, sched.policy.buckets)} == {"under", "over"}


def test_the_servers_log_writes_over_predictions_but_not_an_answer_its_stop_string_cut(tmp_path):
    from serve.feedback import FeedbackLog

    sched = make_scheduler("s3", num_blocks=64)
    for request in (make_request("over", bucket=3), make_request("stopped", bucket=3), make_request("hit", bucket=0)):
        sched.add_request(request)
    finished = {r.request_id: r for r in run_until_done(sched, {"over": 3, "stopped": 40, "hit": 3})}
    log = FeedbackLog(FeedbackWriter(tmp_path), sched.policy.buckets, "ckpt")
    log.record(finished["over"])
    log.record(finished["stopped"], stopped_at=5)  # a stop string ended it early: not an over-prediction
    log.record(finished["hit"])
    log.close()
    (record,) = read_feedback(tmp_path)
    assert record["request_id"] == "over" and (record["predicted_bucket"], record["true_bucket"]) == (3, 0)
    assert summarize([record])["over_predicted"] == 1


def test_the_log_samples_well_predicted_requests_and_weights_them_back(tmp_path):
    """Every misprediction is written and a share of the rest, chosen by request id: weighted by 1 / rate, the
    records stand for the traffic served. An answer cut at the client's own limit is not a label: never sampled."""
    from serve.feedback import FeedbackLog, in_sample, traffic_weight

    sched = make_scheduler("s3", num_blocks=256)
    lengths = {**{f"hit{i}": 3 for i in range(40)}, "under": 20, "cut": 30}
    for name in lengths:
        cut = name == "cut"
        sched.add_request(make_request(name, bucket=3 if cut else 0, max_new_tokens=3 if cut else 32))
    finished = run_until_done(sched, lengths)
    log = FeedbackLog(FeedbackWriter(tmp_path), sched.policy.buckets, "ckpt", sample_rate=0.25)
    for request in finished:
        log.record(request)
    log.close()
    records = {r["request_id"]: r for r in read_feedback(tmp_path)}
    chosen = {f"hit{i}" for i in range(40) if in_sample(f"hit{i}", 0.25)}
    assert 0 < len(chosen) < 40 and set(records) == {"under", *chosen}
    assert traffic_weight(records["under"]) == 1.0  # recorded because it was mispredicted: every such one is
    assert {traffic_weight(records[name]) for name in chosen} == {4.0} and log.num_sampled == len(chosen)
    assert log.num_mispredicted == 1 and all(records[name]["sample_rate"] == 0.25 for name in records)
    summary = summarize(list(records.values()))
    assert summary["num_sampled"] == len(chosen) and summary["estimated_served"] == 1 + 4 * len(chosen)
    assert f"{len(chosen)} of the records are well-predicted requests sampled at rate 0.25" in format_summary(summary)
    assert "too few for retraining to judge a round on (it takes 20)" in format_summary(summary)
    assert "enough for retraining to judge a round on them too, if their effective sample size is also at least 20" \
        in format_summary({**summary, "num_sampled": 20})
    unsampled = summarize([records["under"]])  # a short run: mispredictions alone, no estimate of the traffic
    assert "no well-predicted request sampled yet (sample rate 0.25)" in format_summary(unsampled)
    assert traffic_weight({"sampled": False}) == 0.0  # a store from before sampling is no sample of its traffic
    assert [in_sample("x", rate) for rate in (0.0, 1.0)] == [False, True]
    with pytest.raises(ValueError, match="sample_rate"):
        FeedbackLog(FeedbackWriter(tmp_path), sched.policy.buckets, "ckpt", sample_rate=1.5)


def test_records_carry_familiarity_and_the_summary_weights_the_unfamiliar_share_back():
    """A predictor that keeps its training prompts' embeddings scores each prompt's familiarity; the record keeps
    it, and the summary estimates the unfamiliar share of the traffic from the sampled records weighted back."""
    import dataclasses

    from core.request import LengthPrediction
    from tests.fakes import BUCKETS

    request = make_request("a", bucket=0)
    request.prediction = dataclasses.replace(request.prediction, familiarity=0.42, unfamiliar=True)
    record = feedback_record(request, BUCKETS, checkpoint_id="ckpt")
    assert (record["familiarity"], record["unfamiliar"]) == (0.42, True)
    assert LengthPrediction(bucket=0).familiarity is None  # a predictor that cannot tell
    sampled = dict(sample_rate=0.1, sampled=True)
    records = [_record("miss", unfamiliar=True, sample_rate=0.1),  # stands for itself: weight 1
               _record("hit1", unfamiliar=True, **sampled), _record("hit2", unfamiliar=False, **sampled),
               _record("hit3", unfamiliar=False, **sampled), _record("old", sample_rate=0.1)]
    summary = summarize(records)
    assert (summary["num_unfamiliar"], summary["num_with_familiarity"]) == (2, 4)
    assert summary["unfamiliar_traffic_share"] == pytest.approx(11 / 31)
    assert "2 of 4 records were of prompts unlike their predictor's training prompts" in format_summary(summary)
    assert "about 35% of the traffic served" in format_summary(summary)
    mispredicted_only = summarize(records[:1])
    assert mispredicted_only["unfamiliar_traffic_share"] is None  # no sample: they are no picture of the traffic
    assert "of the traffic served" not in format_summary(mispredicted_only)
    assert "unfamiliar" not in format_summary(summarize(records[-1:]))  # records from before familiarity


def test_rotation_and_summary(tmp_path):
    with FeedbackWriter(tmp_path, sync_every=3, max_segment_bytes=300) as writer:
        for i in range(20):
            writer.write(_record(str(i), predicted_bucket=i % 3, num_preemptions=1))
    assert len(list(tmp_path.glob("segment-*.jsonl"))) > 3
    records = list(read_feedback(tmp_path))
    assert [r["request_id"] for r in records] == [str(i) for i in range(20)]
    summary = summarize(records)
    assert (summary["under_predicted"], summary["over_predicted"], summary["exact"]) == (7, 6, 7)
    result = CliRunner().invoke(main, ["feedback", str(tmp_path)])
    assert result.exit_code == 0 and "under-predicted 7 (35.0%)" in result.output
    result = CliRunner().invoke(main, ["feedback", str(tmp_path / "none")])
    assert result.exit_code == 2 and "does not exist" in result.output


WRITER = """
import sys, time
from serve.feedback import FeedbackWriter
w = FeedbackWriter(sys.argv[1], sync_every=5, max_segment_bytes=4000)
i = 0
while True:
    w.write({"request_id": str(i), "prompt": "p" * 200, "source": "feedback", "num_prompt_tokens": 200,
             "num_output_tokens": 9, "finished": True, "predicted_bucket": 0, "true_bucket": 1})
    i += 1
    if i == 50:
        print("ready", flush=True)
"""


def test_kill_9_mid_write_leaves_every_segment_readable(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, cwd=os.getcwd())
    assert proc.stdout.readline().strip() == b"ready"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    records = list(read_feedback(tmp_path))
    ids = [int(r["request_id"]) for r in records]
    assert len(ids) >= 50 and ids == list(range(len(ids)))  # a prefix: nothing reordered, duplicated or corrupt
    # A restarted writer starts a new segment instead of appending after a torn line.
    before = set(tmp_path.glob("segment-*.jsonl"))
    with FeedbackWriter(tmp_path) as writer:
        writer.write(_record("after"))
    assert len(set(tmp_path.glob("segment-*.jsonl")) - before) == 1
    assert list(read_feedback(tmp_path))[-1]["request_id"] == "after"


def test_the_reader_skips_and_counts_lines_it_cannot_use(tmp_path):
    good = [_record("a"), _record("b", predicted_bucket=None, prompt=None)]
    junk = ["[1, 2]", '"text"', "null", "{}", json.dumps(_record("c") | {"true_bucket": "1"}),
            json.dumps(_record("d") | {"finished": 1}), json.dumps(_record("e") | {"num_output_tokens": True}),
            json.dumps(_record("f") | {"true_bucket": -1}), json.dumps({k: v for k, v in _record("g").items()
                                                                       if k != "source"})]
    lines = [json.dumps(good[0]), *junk, "{torn", json.dumps(good[1])]
    (tmp_path / "segment-1.jsonl").write_text("\n".join(lines) + "\n" + '{"request_id": "cut off')
    skipped = collections.Counter()
    assert list(read_feedback(tmp_path, skipped=skipped)) == good
    assert skipped == {"not_a_record": len(junk), "torn": 2}
    assert not any(is_feedback_record(json.loads(line)) for line in junk)
    summary = summarize_store(tmp_path)
    assert summary["num_records"] == 2 and summary["num_skipped"] == len(junk) + 2
    assert "skipped 11 unusable lines (9 not a record, 2 torn)" in format_summary(summary)
    result = CliRunner().invoke(main, ["feedback", str(tmp_path)])  # no traceback on a store like this
    assert result.exit_code == 0 and "2 feedback records" in result.output, result.output
    assert "skipped 11 unusable lines (9 not a record, 2 torn)" in result.output, result.output
    result = CliRunner().invoke(main, ["feedback", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["skipped"] == {"not_a_record": 9, "torn": 2}


def test_fields_a_hand_edited_store_gets_wrong_are_skipped_not_raised(tmp_path):
    """A sample rate as text or NaN, a length past 64 bits, `sampled` as text, a line in Latin-1: each stopped
    `s3 feedback` or retraining (TypeError, OverflowError) or was read with its text garbled."""
    junk = [json.dumps(_record("a") | {"sample_rate": "0.1"}), json.dumps(_record("b") | {"sample_rate": math.nan}),
            json.dumps(_record("c") | {"num_output_tokens": 2**70}), json.dumps(_record("d") | {"sampled": "yes"})]
    latin1 = json.dumps(_record("e", prompt="caf\u00e9"), ensure_ascii=False).encode("latin-1")
    (tmp_path / "segment-1.jsonl").write_bytes(b"\n".join([*(line.encode() for line in junk), latin1,
                                                            json.dumps(_record("ok")).encode()]) + b"\n")
    skipped = collections.Counter()
    assert [r["request_id"] for r in read_feedback(tmp_path, skipped=skipped)] == ["ok"]
    assert skipped == {"not_a_record": 4, "not_utf8": 1}
    result = CliRunner().invoke(main, ["feedback", str(tmp_path)])
    assert result.exit_code == 0 and "1 not utf8" in result.output, result.output


def test_s3_feedback_says_so_when_a_store_holds_no_record(tmp_path):
    result = CliRunner().invoke(main, ["feedback", str(tmp_path)])
    assert result.exit_code == 0 and result.output.startswith("no feedback records:"), result.output
    (tmp_path / "segment-1.jsonl").write_text("{torn")
    assert "no feedback records (1 unusable lines)" in CliRunner().invoke(main, ["feedback", str(tmp_path)]).output


def test_s3_feedback_prints_no_skipped_line_for_a_clean_store(tmp_path):
    with FeedbackWriter(tmp_path) as writer:
        writer.write(_record("a"))
    result = CliRunner().invoke(main, ["feedback", str(tmp_path)])
    assert result.exit_code == 0 and "1 feedback records" in result.output and "skipped" not in result.output
    assert json.loads(CliRunner().invoke(main, ["feedback", str(tmp_path), "--json"]).output)["num_skipped"] == 0


def test_prediction_outcomes_score_the_requests_whose_length_is_a_label():
    """The server's live view of its predictor: each request that ended of itself (or at the predictor's largest
    length) against its predicted bucket; one its own max_tokens cut, or without a prediction, is not scored."""
    from serve.outcomes import PredictionOutcomes

    sched = make_scheduler("s3", num_blocks=64)  # buckets of 16 tokens up to 64
    lengths = {"exact": 5, "one_under": 20, "under": 40, "one_over": 5, "over": 5, "cut": 30, "unpredicted": 3,
               "at_cap": 64}
    predicted = {"exact": 0, "one_under": 0, "under": 0, "one_over": 1, "over": 2, "cut": 0, "at_cap": 1}
    for request_id, length in lengths.items():
        budget = 8 if request_id == "cut" else 64
        sched.add_request(make_request(request_id, bucket=predicted.get(request_id), max_new_tokens=budget))
    finished = {r.request_id: r for r in run_until_done(sched, lengths)}
    assert finished["unpredicted"].prediction is None and finished["cut"].finish_reason == "length"
    outcomes = PredictionOutcomes(sched.policy.buckets)
    for request in finished.values():
        outcomes.observe(request)
    assert outcomes.counts == {"exact": 1, "one_under": 1, "one_over": 1, "under": 2, "over": 1}  # at_cap: under
    midpoints = {0: 8, 1: 24, 2: 40}
    assert outcomes.abs_error_tokens == sum(abs(lengths[r] - midpoints[b]) for r, b in predicted.items() if r != "cut")
    assert outcomes.summary() == ("6 requests ended at a label length: 16.7% in the predicted bucket, 50.0% within "
                                  "one, 50.0% under-predicted, MAE 23.5 tokens")
    assert PredictionOutcomes(sched.policy.buckets).summary() == "no request has ended at a label length yet"


def test_requests_in_flight_at_a_predictor_swap_keep_the_old_checkpoint(tmp_path):
    """A predictor swapped while serving (serve/server/reload.py), twice: each request's record names the checkpoint
    that predicted it, and only the new one's predictions count in its live accuracy. (The swap used to note the
    requests in flight by id: a second swap renamed them after the middle checkpoint, and a request classified by
    the old predictor after the swap was queued was named after the new one.)"""
    import dataclasses

    from serve.feedback import FeedbackLog
    from serve.outcomes import PredictionOutcomes

    sched = make_scheduler("s3", num_blocks=64)
    for request_id in ("first", "second", "third", "unnamed"):
        sched.add_request(make_request(request_id, bucket=0, max_new_tokens=64))
    finished = {r.request_id: r for r in run_until_done(sched, {r: 40 for r in ("first", "second", "third",
                                                                                  "unnamed")})}  # all under-predicted
    for request_id in ("first", "second", "third"):
        request = finished[request_id]
        request.prediction = dataclasses.replace(request.prediction, checkpoint_id=f"ckpt-{request_id}")
    log = FeedbackLog(FeedbackWriter(tmp_path), sched.policy.buckets, "ckpt-first")
    outcomes = PredictionOutcomes(sched.policy.buckets, 0.6, "ckpt-first")
    for checkpoint_id in ("ckpt-second", "ckpt-third"):
        log.use_checkpoint(checkpoint_id)
        outcomes.reset(0.7, checkpoint_id)
    for request in finished.values():
        log.record(request)
        outcomes.observe(request)
    log.close()
    assert {r["request_id"]: r["checkpoint_id"] for r in read_feedback(tmp_path)} == {
        "first": "ckpt-first", "second": "ckpt-second", "third": "ckpt-third", "unnamed": "ckpt-third"}
    assert outcomes.num_observed == 2 and outcomes.expected_within_one == 0.7  # third's, and one that names none


def test_a_store_removed_while_serving_counts_what_it_lost_and_starts_again(tmp_path):
    """Writes into a removed folder's open segment succeed, into a file nobody can read: found at the next sync,
    every record of that segment is counted lost and the next goes to a new segment."""
    import shutil

    writer = FeedbackWriter(tmp_path / "store", sync_every=2)
    writer.write({"a": 0})
    shutil.rmtree(tmp_path / "store")
    for i in range(1, 10):
        writer.write({"a": i})
    writer.close()
    kept = [json.loads(line)["a"] for p in (tmp_path / "store").iterdir() for line in p.read_text().splitlines()]
    assert writer.num_lost == 2 and sorted(kept) == list(range(2, 10))


def test_a_record_that_is_not_valid_unicode_is_lost_alone(tmp_path):
    writer = FeedbackWriter(tmp_path)
    writer.write(_record("bad", prompt="broken \ud83d emoji"))
    writer.write(_record("good"))
    writer.close()
    assert [r["request_id"] for r in read_feedback(tmp_path)] == ["good"] and writer.num_lost == 1


def test_a_failing_store_loses_records_but_never_raises_and_starts_again(tmp_path, monkeypatch, caplog):
    writer = FeedbackWriter(tmp_path / "store", sync_every=2)
    writer.write({"a": 1})
    full = open("/dev/full", "w", encoding="utf-8")  # a full disk: the flush of a sync fails
    monkeypatch.setattr(writer, "_file", full)
    writer.write({"a": 2})  # the second unsynced record: the sync fails, both are counted lost
    assert writer.num_lost == 2 and writer._file is None and "lost" in caplog.text
    import shutil
    shutil.rmtree(tmp_path / "store")  # the folder removed while serving: made again for the next segment
    writer.write({"a": 3})
    writer.close()
    assert [json.loads(line) for p in (tmp_path / "store").iterdir() for line in p.read_text().splitlines()] == [{"a": 3}]
    assert writer.num_written == 3 and writer.num_lost == 2


def test_retraining_says_what_it_left_out_of_the_store_and_whose_records_it_holds(tmp_path):
    """`s3 train --feedback` dropped unusable lines and prompt-less records without a word, and trained on records
    of any checkpoint in the store (another model's servers writing to the same default folder) without saying so."""
    import dataclasses

    from pipeline.commands import feedback_records, store_provenance

    lines = [json.dumps(_record("a", checkpoint_id="mine")), json.dumps(_record("b", prompt=None)),
             json.dumps(_record("c", checkpoint_id="parent")), json.dumps(_record("d", checkpoint_id="other-model"))]
    (tmp_path / "segment-1.jsonl").write_text("\n".join(lines) + "\n{torn")
    records, left_out = feedback_records(str(tmp_path))
    assert [r["request_id"] for r in records] == ["a", "c", "d"]
    assert "1 torn lines" in left_out and "1 records without a prompt" in left_out

    @dataclasses.dataclass
    class Info:
        checkpoint_id: str = "mine"
        parent_checkpoint_id: str = "parent"

    warning = store_provenance(records, Info())
    assert "1 of the 3 records" in warning and "other-model (1)" in warning
    assert store_provenance(records[:2], Info()) == ""


def test_a_stores_summary_holds_no_prompt_text(tmp_path, monkeypatch):
    import serve.feedback as feedback

    (tmp_path / "segment-1.jsonl").write_text(json.dumps(_record("a", prompt="x" * 10_000)) + "\n")
    held = []
    summarize = feedback.summarize
    monkeypatch.setattr(feedback, "summarize", lambda records: held.extend(records) or summarize(records))
    assert feedback.summarize_store(tmp_path)["num_records"] == 1
    assert held and not any("prompt" in r for r in held)
