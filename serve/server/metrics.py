"""Prometheus metrics. Engine state is read from the engine thread's latest snapshot at scrape time, so a scrape
never touches the scheduler; request latencies are observed on the asyncio side, where the client's clock runs.

Each server has its own registry (several servers can live in one process, as in the tests).
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from serve.server.engine_loop import EngineSnapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 240.0, 480.0, 960.0,
                    1920.0, 7680.0)
"""Seconds, for the time to first token and the request latency: up to vLLM's 7,680 s, since a loaded CPU server
answers in minutes (p99 latencies of 270-600 s in docs/benchmarks.md's load runs), which a top bucket of 120 s would lump
into +Inf."""
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _EngineCollector:
    """Turns the latest EngineSnapshot into gauges and counters."""

    def __init__(self, snapshot: Callable[[], EngineSnapshot], in_flight: Callable[[], int]) -> None:
        self.snapshot = snapshot
        self.in_flight = in_flight

    def collect(self):
        snap = self.snapshot()
        gauges = {
            "s3_num_requests_waiting": ("Requests in the scheduler's waiting queue (queue depth).", snap.num_waiting),
            "s3_num_requests_running": ("Sequences running (holding KV blocks).", snap.num_running),
            "s3_kv_blocks_capacity": ("KV blocks in the pool.", snap.num_kv_blocks),  # a gauge: no _total
            "s3_kv_blocks_reserved": ("KV blocks held by sequences, including reservations for future output.",
                                      snap.num_kv_blocks_held),
            "s3_kv_blocks_used": ("KV blocks holding computed tokens.", snap.num_kv_blocks_used),
            "s3_engine_alive": ("1 while the engine thread runs.", float(snap.alive)),
            "s3_num_requests_in_flight": ("Requests accepted over HTTP and not ended.", self.in_flight()),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        stats = snap.stats
        counters = {
            "s3_preemptions": ("Sequences preempted (KV freed, recomputed later).", stats.num_preemptions),
            "s3_mispredictions": ("Sequences that reached their reservation unfinished.", stats.num_mispredictions),
            "s3_generated_tokens": ("Output tokens generated.", stats.num_generated_tokens),
            "s3_recomputed_tokens": ("Tokens computed again after preemptions.", stats.num_recomputed_tokens),
            "s3_engine_steps": ("Engine steps run.", stats.num_steps),
            "s3_engine_step_seconds": ("Time in engine steps (plan, run, update), summed.", stats.step_time_s),
            "s3_batched_sequences": ("Sequences stepped, summed over steps (over s3_engine_steps: the mean batch).",
                                     stats.num_batched_seqs),
            "s3_batched_tokens": ("Tokens computed (prompt and output), summed over steps.", stats.num_batched_tokens),
            "s3_requests_aborted": ("Requests aborted in the engine (client gone, shutdown).", stats.num_aborted),
            "s3_prefix_cache_queries": ("Tokens looked up in the prefix cache at admission (prefix caching).",
                                        stats.num_prefix_query_tokens),
            "s3_prefix_cache_hits": ("Of s3_prefix_cache_queries, tokens found cached (not computed again).",
                                     stats.num_prefix_hit_tokens),
        }
        counters["s3_feedback_records"] = ("Records written to the feedback store.", snap.num_feedback_records)
        counters["s3_feedback_records_lost"] = ("Feedback records a failed write lost (a full disk, the folder "
                                                "removed); serving goes on.", snap.num_feedback_lost)
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)


class _OutcomeCollector:
    """The predictor's live accuracy (`serve.outcomes.PredictionOutcomes`) as counters."""

    def __init__(self, outcomes) -> None:
        self.outcomes = outcomes

    def collect(self):
        counts = self.outcomes.counts
        family = CounterMetricFamily(
            "s3_prediction_outcomes", "Requests ended at a label length (of themselves, or at the predictor's "
            "largest length), by how the predicted bucket compared with the true one: exact, one_under / one_over "
            "(the true bucket one above / below the prediction), under / over (further).", labels=["outcome"])
        for outcome, count in counts.items():
            family.add_metric([outcome], count)
        yield family
        yield CounterMetricFamily(
            "s3_prediction_abs_error_tokens", "Absolute error of the predicted bucket's midpoint in tokens, summed "
            "over s3_prediction_outcomes (over their sum: the mean absolute error).",
            value=self.outcomes.abs_error_tokens)
        if self.outcomes.expected_within_one is not None:
            yield GaugeMetricFamily(
                "s3_prediction_expected_within_one", "The predictor's within-one-bucket accuracy on its validation "
                "split: s3_prediction_outcomes' share of exact, one_under and one_over well below it means traffic "
                "unlike its training data (a retraining round is due).", value=self.outcomes.expected_within_one)
            yield GaugeMetricFamily(
                "s3_predictor_stale", "1 while the live within-one accuracy is far enough under the validation "
                "figure to call a retraining round due (serve.outcomes.PredictionOutcomes.stale; logged too), else 0.",
                value=float(self.outcomes.stale() is not None))


class ServerMetrics:
    """Every metric of one server, in its own registry."""

    def __init__(self, snapshot: Callable[[], EngineSnapshot], *, policy: str, checkpoint_id: str | None = None,
                 outcomes=None) -> None:
        self.registry = CollectorRegistry()
        self._in_flight: Callable[[], int] = lambda: 0
        self.registry.register(_EngineCollector(snapshot, lambda: self._in_flight()))
        if outcomes is not None:  # serve.outcomes.PredictionOutcomes, with a length predictor
            self.registry.register(_OutcomeCollector(outcomes))
        r = self.registry
        self.ttft = Histogram("s3_time_to_first_token_seconds", "From the request's arrival to its first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("s3_time_per_output_token_seconds", "Mean time between output tokens of a request.",
                              buckets=_TOKEN_BUCKETS, registry=r)
        self.latency = Histogram("s3_request_latency_seconds", "From the request's arrival to its last token.",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.requests = Counter("s3_requests", "Requests ended, by finish reason.", ["finish_reason"], registry=r)
        self.errors = Counter("s3_http_errors", "Error responses, by status code.", ["status"], registry=r)
        self.predictor_batch_seconds = Histogram("s3_predictor_batch_seconds", "Length-predictor time per batch.",
                                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.predictor_batch_size = Histogram("s3_predictor_batch_size", "Prompts per length-predictor batch.",
                                              buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.predictor_errors = Counter("s3_predictor_errors", "Predictor batches that failed (admitted at the "
                                        "worst case instead).", registry=r)
        self.prompt_familiarity = Histogram(
            "s3_prompt_familiarity", "How much each prompt resembles the predictor's training prompts (mean cosine "
            "similarity to the nearest few; checkpoints that keep their training prompts' embeddings).",
            buckets=(0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0), registry=r)
        self.unfamiliar_prompts = Counter(
            "s3_unfamiliar_prompts", "Prompts below the predictor's familiarity threshold, under which it put a "
            "share of its validation prompts (familiarity_quantile, 5% by default): a share of "
            "s3_prompt_familiarity_count well above that is traffic unlike what it was trained on.", registry=r)
        self.policy = policy
        self.admission_info = Gauge("s3_admission_info", "The admission policy and predictor checkpoint in use (1; "
                                    "0 for a checkpoint swapped out).", ["policy", "checkpoint_id"], registry=r)
        self.checkpoint_id = checkpoint_id or ""
        self.admission_info.labels(policy=policy, checkpoint_id=self.checkpoint_id).set(1)

    def use_checkpoint(self, checkpoint_id: str | None) -> None:
        """The predictor was swapped while serving (`serve.server.reload`)."""
        self.admission_info.labels(policy=self.policy, checkpoint_id=self.checkpoint_id).set(0)
        self.checkpoint_id = checkpoint_id or ""
        self.admission_info.labels(policy=self.policy, checkpoint_id=self.checkpoint_id).set(1)

    def observe_predictions(self, predictions) -> None:
        """Familiarity of a classified batch (`core.request.LengthPrediction`s; None for a prompt not classified)."""
        for prediction in predictions:
            if prediction is not None and prediction.familiarity is not None:
                self.prompt_familiarity.observe(prediction.familiarity)
                self.unfamiliar_prompts.inc(int(bool(prediction.unfamiliar)))

    def track_in_flight(self, fn: Callable[[], int]) -> None:
        self._in_flight = fn

    def render(self) -> bytes:
        return generate_latest(self.registry)
