"""`s3 simulate`: every policy on the same workload in one run, and the largest rate each serves in an SLO."""

from __future__ import annotations

import dataclasses
from typing import Callable

from core.buckets import BucketSpec, LengthProfile, bucket_frequencies, within_bucket_shape
from serve.policy_config import POLICY_NAMES, PolicyConfig, PolicyName, with_length_profile
from serve.scheduler_config import SchedulerConfig
from serve.sim.costmodel import CostModel, get_preset
from serve.sim.runner import PolicyResult, simulate_policy
from serve.sim.workload import PredictorConfig, SimRequest, WorkloadConfig, load_trace, make_workload, predict


@dataclasses.dataclass(frozen=True)
class SimulateConfig:
    """Everything `s3 simulate` needs; filled from configs/simulate_*.yaml and the command line."""

    preset: str = "paper"
    """Model + hardware preset (serve/sim/costmodel.py: paper, llama-2-13b-a100, llama-2-70b-8xa100, and
    smollm2-cpu, the engine on this project's 2-core CPU as `--calibrate-from` fits it)."""
    policies: tuple[PolicyName, ...] = POLICY_NAMES
    """Policies to run side by side on the same requests."""
    workload: WorkloadConfig = WorkloadConfig()
    predictor: PredictorConfig = PredictorConfig()
    policy: PolicyConfig = PolicyConfig()
    """Policy knobs (its `policy` field is set per run from `policies`)."""
    max_new_tokens: int | None = None
    """Output cap of every request; None: the rest of the model's context (the paper's worst case). The
    length buckets span [0, max_new_tokens] (or the context)."""
    kv_cache_tokens: int | None = None
    """KV pool size in tokens; None (or 0): what the preset's memory holds after the weights."""
    block_size: int = 16
    """Tokens per KV block."""
    max_num_seqs: int = 1024
    """Most sequences running at once."""
    max_num_batched_tokens: int = 4096
    """Token budget of one step (prefill is chunked to fit)."""
    enable_prefix_caching: bool = False
    """Share the KV blocks of the prompts' common prefix (`workload.shared_prefix_tokens`), as `s3 serve` does."""
    find_max_rate: bool = False
    """Also search, per policy, the largest Poisson arrival rate that meets the SLO."""
    slo_token_latency_s: float = 0.2
    """SLO: mean latency per output token (about human reading speed)."""
    rate_search_requests: int = 5000
    """Requests per probe of the rate search (several times the largest batch, or overload goes unseen)."""
    rate_search_steps: int = 6
    """Bisection steps of the rate search."""
    output_dir: str = "runs/simulate"
    """Where the JSON report and the PNG plot go."""

    def __post_init__(self) -> None:
        unknown = set(self.policies) - set(POLICY_NAMES)
        if unknown or not self.policies:
            raise ValueError(f"policies must be a non-empty subset of {POLICY_NAMES}, got {self.policies}")
        if len(set(self.policies)) < len(self.policies):
            raise ValueError(f"policies must each be named once, got {', '.join(self.policies)}")
        if not self.slo_token_latency_s > 0 or self.rate_search_requests < 1 or self.rate_search_steps < 0:
            raise ValueError(f"slo_token_latency_s must be > 0, rate_search_requests >= 1 and rate_search_steps >= 0, "
                             f"got {self.slo_token_latency_s}, {self.rate_search_requests}, {self.rate_search_steps}")
        if self.block_size < 1 or (self.kv_cache_tokens or 0) < 0:
            raise ValueError(f"block_size must be >= 1 and kv_cache_tokens >= 0, got {self.block_size}, "
                             f"{self.kv_cache_tokens}")


LOAD_SWEEP = (0.25, 0.5, 0.75, 0.9, 1.0, 1.25, 1.5)
"""Arrival rates probed for the latency-vs-load plot, as fractions of the offline capacity."""
RATE_SEARCH_CAP = 64.0
"""Highest rate the search doubles up to while every probe meets the SLO, as a multiple of the offline capacity.
A probe is a finite workload: at 64 times the rate its server clears, its arrivals span under 2% of the time it
takes to serve them, so it is all but an offline run; higher rates change little, and if that run meets the SLO
no rate breaks it (the answer is then a lower bound, `RateResult.bracketed` false)."""


@dataclasses.dataclass
class RateResult:
    policy: str
    max_rate: float
    """Largest arrival rate (requests/s) found to meet the SLO."""
    token_latency_at_max: float
    probes: list[tuple[float, float]]
    """(rate, mean token latency) of every probe, for the plot."""
    bracketed: bool = True
    """Whether a probe above ``max_rate`` broke the SLO. False: none did up to `RATE_SEARCH_CAP` times the
    capacity, and ``max_rate`` (the highest rate probed) is only a lower bound."""
    capacity_rps: float = 0.0
    """The policy's offline requests/s on the workload, which the sweep's rates are fractions of."""


@dataclasses.dataclass
class SimulationReport:
    config: SimulateConfig
    cost: CostModel
    num_blocks: int
    buckets: BucketSpec
    results: list[PolicyResult]
    rates: list[RateResult] = dataclasses.field(default_factory=list)

    def result(self, policy: str) -> PolicyResult | None:
        return next((r for r in self.results if r.policy == policy), None)

    def ratios(self, policy: str = "s3") -> dict[str, float]:
        """Throughput of ``policy`` divided by each other policy's, measured in this one run."""
        mine = self.result(policy)
        if mine is None:
            return {}
        return {r.policy: mine.generated_tokens_per_s / r.generated_tokens_per_s for r in self.results}


def setup(config: SimulateConfig) -> tuple[CostModel, BucketSpec, SchedulerConfig]:
    """The cost model, the buckets and the scheduler config (with a learned length profile if asked) of a run."""
    cost = get_preset(config.preset)
    buckets = BucketSpec.uniform(config.max_new_tokens or cost.model.max_seq_len, config.predictor.num_buckets)
    sched = SchedulerConfig(
        num_blocks=(config.kv_cache_tokens // config.block_size if config.kv_cache_tokens
                    else cost.num_blocks(config.block_size)),
        block_size=config.block_size,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        policy=config.policy,
        enable_prefix_caching=config.enable_prefix_caching,
    )
    if config.predictor.learned_profile:
        sample = config.workload if config.workload.trace else dataclasses.replace(
            config.workload, seed=config.workload.seed + 1, mode="offline", num_requests=5000)
        lengths = [item.num_output_tokens for item in make_workload(sample, cost.model.max_seq_len, config.max_new_tokens)]
        learned = LengthProfile(bucket_frequencies(buckets, lengths), within_bucket_shape(buckets, lengths))
        sched = dataclasses.replace(sched, policy=with_length_profile(config.policy, learned))
    return cost, buckets, sched


def workload_items(config: SimulateConfig, workload: WorkloadConfig, cost: CostModel,
                   buckets: BucketSpec) -> list[SimRequest]:
    """The requests of ``workload``, each with the configured predictor's prediction."""
    items = make_workload(workload, cost.model.max_seq_len, config.max_new_tokens)
    predict(items, config.predictor, buckets, seed=workload.seed)
    return items


def _simulate(config: SimulateConfig, policy, items, cost, buckets, sched) -> PolicyResult:
    return simulate_policy(policy, items, cost=cost, buckets=buckets, sched=sched, max_new_tokens=config.max_new_tokens)


def run_simulation(config: SimulateConfig, progress: Callable[[str], None] = lambda _: None,
                   save: Callable[[SimulationReport], None] = lambda _: None) -> SimulationReport:
    """Run every configured policy on the same requests; optionally search each one's SLO rate. ``save(report so
    far)`` runs after each policy's run and each rate search, so a run cut short keeps what it computed."""
    cost, buckets, sched = setup(config)
    items = workload_items(config, config.workload, cost, buckets)
    if config.workload.trace:
        rows = len(load_trace(config.workload.trace))
        if rows != len(items):
            progress(f"the trace's {rows} rows make {len(items)} requests ({'repeated' if rows < len(items) else 'cut'}"
                     " to workload.num_requests; --num-requests sets it)")
    report = SimulationReport(config, cost, sched.num_blocks, buckets, [])
    for policy in config.policies:
        progress(f"simulating {policy} on {len(items)} requests")
        report.results.append(_simulate(config, policy, items, cost, buckets, sched))
        save(report)
    results = report.results
    if config.find_max_rate:
        offline = [dataclasses.replace(item, arrival_time=0.0) for item in items]
        for result in results:
            capacity = result.requests_per_s
            if config.workload.mode != "offline":  # the run's requests/s is then the arrival rate, not capacity
                progress(f"measuring the offline capacity of {result.policy} (the same requests, all at t=0)")
                capacity = _simulate(config, result.policy, offline, cost, buckets, sched).requests_per_s
            progress(f"searching the SLO rate of {result.policy}")
            rate = find_max_rate(config, result.policy, cost=cost, buckets=buckets, sched=sched, capacity=capacity,
                                 progress=progress)
            report.rates.append(rate)
            save(report)
    return report


def find_max_rate(
    config: SimulateConfig,
    policy: PolicyName,
    *,
    cost: CostModel,
    buckets: BucketSpec,
    sched: SchedulerConfig,
    capacity: float,
    progress: Callable[[str], None] = lambda _: None,
) -> RateResult:
    """Bisect the Poisson arrival rate at which ``policy`` still meets the token-latency SLO.

    ``capacity`` is the policy's offline requests/s on the same workload; the sweep probes fractions of it
    (above 1 too) and the search bisects between the highest rate that met the SLO and the lowest above it
    that did not. Where no probe breaks the SLO up to `RATE_SEARCH_CAP` times ``capacity``, the highest rate
    probed comes back as a lower bound (``bracketed`` false). A probe is `rate_search_requests` Poisson arrivals;
    it meets the SLO when their mean latency per output token (queueing included) is within it.
    """
    workload = dataclasses.replace(config.workload, mode="online", num_requests=config.rate_search_requests)
    probes: list[tuple[float, float]] = []

    def meets_slo(rate: float) -> bool:
        items = workload_items(config, dataclasses.replace(workload, rate=rate), cost, buckets)
        value = _simulate(config, policy, items, cost, buckets, sched).mean_token_latency_s
        probes.append((rate, value))
        met = value <= config.slo_token_latency_s
        progress(f"  {policy} at {rate:.3g} req/s: {value:.3g} s/token, {'within' if met else 'over'} the SLO")
        return met

    for fraction in LOAD_SWEEP:  # the latency-vs-load curve, for the plot
        meets_slo(fraction * capacity)
    # Bracket the answer from the sweep, doubling while even the highest rate meets the SLO: an open loop can run
    # above the offline capacity measured on a finite workload (arrivals spread the prefill). With no failing
    # probe above it, `low` is the highest rate probed.
    slo = config.slo_token_latency_s
    low = max((r for r, v in probes if v <= slo), default=0.0)
    high = min((r for r, v in probes if v > slo and r > low), default=None)
    while high is None and low < RATE_SEARCH_CAP * capacity:
        rate = 2 * low
        low, high = (rate, None) if meets_slo(rate) else (low, rate)
    if high is not None:
        for _ in range(config.rate_search_steps):
            mid = (low + high) / 2
            low, high = (mid, high) if meets_slo(mid) else (low, mid)
    at_low = next((v for r, v in probes if r == low), float("nan"))
    return RateResult(policy, low, at_low, sorted(probes), bracketed=high is not None, capacity_rps=capacity)
