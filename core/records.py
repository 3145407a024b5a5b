"""The keys every benchmark's per-policy records share (the ``results`` list of its JSON: `s3 bench`'s
bench.json, `s3 simulate`'s report.json, benchmarks/load.py's --output, the simulator sweeps), so that runs
can be compared."""

RESULT_KEYS = ("policy", "generated_tokens_per_s", "mean_ttft_s", "p50_ttft_s", "p99_ttft_s", "mean_latency_s",
               "p50_latency_s", "p99_latency_s", "num_preemptions", "num_recomputed_tokens")


def result_record(result, *extra: str) -> dict:
    """One policy's record: ``result``'s RESULT_KEYS attributes, then those named in ``extra``, in that order."""
    return {k: getattr(result, k) for k in (*RESULT_KEYS, *extra)}
