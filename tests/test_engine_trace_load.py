"""benchmarks/engine_trace_load.py: a trace replayed through the real engine ends each request at its length."""

from __future__ import annotations

import json
import random

from click.testing import CliRunner

from core.records import RESULT_KEYS


def test_a_tiny_replay_serves_every_traced_token_under_each_policy(import_benchmark, tmp_path):
    bench = import_benchmark("engine_trace_load")
    rng = random.Random(0)
    rows = []
    for _ in range(30):
        probs = [rng.random() for _ in range(10)]
        rows.append({"num_prompt_tokens": rng.randint(4, 40), "num_output_tokens": rng.randint(1, 60),
                     "probs": [p / sum(probs) for p in probs]})
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    args = ["--trace", str(trace), "--shape", "tiny", "--num-requests", "20", "--rate-fractions", "4.0",
            "--warmup-requests", "2", "--max-new-tokens", "64", "--kv-cache-tokens", "256",
            "--max-num-seqs", "8", "--output", str(out)]
    result = CliRunner().invoke(bench.main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "engine_trace.json").read_text())
    capacity, *online = report["results"]
    # first paged's capacity, all 20 at once; a pool of 256 tokens binds for 8 sequences of up to 100 tokens
    assert capacity["policy"] == "paged" and capacity["rate_fraction"] is None and capacity["num_preemptions"] > 0
    assert [r["policy"] for r in online] == ["paged", "s3"]
    for record in report["results"]:
        assert set(RESULT_KEYS) <= set(record) and record["num_requests"] == 20
        assert 0 < record["longest_stall_s"] < record["makespan_s"]
    capacity_rps = 20 / capacity["makespan_s"]
    assert all(r["rate_fraction"] == 4.0 and abs(r["capacity_rps"] - capacity_rps) < 1e-6 * capacity_rps
               for r in online)
    # every run served the same 20 rows to their traced lengths, whatever its schedule
    served = [r["generated_tokens_per_s"] * r["makespan_s"] for r in report["results"]]
    assert max(served) - min(served) < 1e-6 * max(served)
