"""`s3 bench`: the engine's offline throughput and latency under each policy, side by side in one run.

Fair by construction:
- the prompts are drawn without replacement from the prompt sets, round-robin by source, and never from the
  labelled data a predictor learned from (`labelled_data`);
- every policy sees the same prompts, KV budget and model load, all requests arriving at t=0;
- an untimed warm-up on other prompts runs before the first timed policy;
- `max` runs first: greedy decoding is deterministic, so its outputs are every prompt's true length, and each
  policy then gets exactly what the registry says it needs (`policy_needs`): nothing, a bucket predictor's
  buckets (never the true length), or the exact length;
- every ratio is to the `max` of the same run.

A plain `transformers` `generate` with static batching runs on the same prompts as a reference.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Callable, Sequence

import torch

from core.buckets import BucketSpec
from core.predictors import BASELINES, baseline_predictor
from core.records import latency_figures
from core.request import LengthPrediction, Request
from pipeline.prompts import PROMPT_SETS, format_prompt, sample_prompts
from serve.engine.llm import EngineConfig, LLMEngine, eos_token_ids, model_id
from serve.engine.plan import SamplingParams
from serve.policies import policy_needs
from serve.policy_config import POLICY_NAMES, PolicyConfig, with_length_profile

WARMUP_NEW_TOKENS = 32


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Settings of `s3 bench`; every policy sees the same prompts and KV budget."""

    model: str = "smollm2"
    """`smollm2`, a .gguf file or a Hugging Face folder."""
    prompts: tuple[str, ...] = PROMPT_SETS
    """Prompt files to draw from (round-robin over them, without replacement)."""
    labelled_data: str | None = "data/labelled"
    """An `s3 generate` folder whose prompts are never drawn (those a predictor learned from): its dataset and its
    shards. None draws from every prompt, for prompt files no predictor has seen."""
    num_prompts: int = 256
    """Timed prompts per policy (all arrive at t=0)."""
    warmup_prompts: int = 4
    """Prompts run once, untimed, before the first timed policy (other prompts than the timed ones, at most 32
    new tokens each), so that no policy pays the first calls' costs. 0 skips the warm-up."""
    max_new_tokens: int = 512
    policies: tuple[str, ...] = POLICY_NAMES
    """Policies of the registry (serve/policies.py) to run; `max` always runs, first (it measures the true lengths)."""
    predictor: str = "oracle"
    """The bucket predictor of policies that need one: a baseline (`oracle`: the true bucket; `noisy-oracle`: the
    true bucket with probability `predictor_accuracy`, else a neighbour; `constant`: the last bucket;
    `scalar-ratio`: one bucket for all, at the median true length) or a predictor checkpoint folder."""
    predictor_accuracy: float = 0.8
    check_target_model: bool = True
    """Refuse a predictor checkpoint that learned another model's lengths (as `s3 serve` does)."""
    policy: PolicyConfig = PolicyConfig()
    """Policy knobs (`quantile`, `prior_weight`, `aging_s`, ...); the `policy` field is set per run. A trained
    predictor's within-bucket shape fills `bucket_shape` unless it is set here."""
    num_buckets: int = 10
    kv_worst_case_seqs: int = 8
    """KV budget: room for this many worst-case (longest prompt + max_new_tokens) sequences."""
    max_num_seqs: int = 64
    block_size: int = 16
    frequency_penalty: float | None = None
    """OpenAI's frequency penalty of every request (greedy otherwise); data/labelled was made with 0.5. Unset: a
    checkpoint predictor's (as its labels were made, as `s3 serve` does), else 0; set, it must equal the
    checkpoint's."""
    reference_batch: int = 32
    """Batch size of the `transformers` generate reference (0 skips it; skipped with a frequency penalty, which
    `generate` does not have)."""
    seed: int = 0
    output_dir: str = "runs/bench"

    def __post_init__(self) -> None:
        unknown = [p for p in self.policies if p not in POLICY_NAMES]
        if unknown or not self.policies:
            raise ValueError(f"policies must be a non-empty subset of {', '.join(POLICY_NAMES)}; got {unknown}")
        if self.num_prompts < 1 or self.warmup_prompts < 0 or self.max_new_tokens < 1:
            raise ValueError("num_prompts and max_new_tokens must be >= 1, warmup_prompts >= 0")
        if not 0 <= self.predictor_accuracy <= 1:
            raise ValueError(f"predictor_accuracy must be in [0, 1], got {self.predictor_accuracy}")
        if self.reference_batch < 0 or self.kv_worst_case_seqs < 1:
            raise ValueError(f"reference_batch must be >= 0 (0 skips it) and kv_worst_case_seqs >= 1, got "
                             f"{self.reference_batch}, {self.kv_worst_case_seqs}")

    @property
    def run_order(self) -> list[str]:
        return ["max", *[p for p in self.policies if p != "max"]]


@dataclasses.dataclass
class BenchResult:
    name: str
    """The policy (or the reference's name)."""
    wall_s: float
    num_requests: int
    generated_tokens: int
    ttft_s: list[float | None] = dataclasses.field(default_factory=list, repr=False)
    """Per request: seconds from t=0 (all arrive then) to its first token; None where not measured."""
    latency_s: list[float] = dataclasses.field(default_factory=list, repr=False)
    """Per request: seconds from t=0 to its last token."""
    prediction: str = "none"
    """What the policy was given: none, buckets (from the predictor) or exact (the true length)."""
    mean_running_batch: float = 0.0
    kv_utilization: float = 0.0
    kv_reserved: float = 0.0
    num_preemptions: int = 0
    num_mispredictions: int = 0
    num_recomputed_tokens: int = 0
    num_computed_tokens: int = 0
    """Tokens run through the model (prompts, recomputes and outputs)."""
    num_prefix_query_tokens: int = 0
    """Prompt tokens looked up in the prefix cache (with `EngineConfig.enable_prefix_caching`)."""
    num_prefix_hit_tokens: int = 0
    """Of those, found cached (not computed)."""
    answers_differing: int = 0
    """Requests whose generated tokens differ from `max`'s (decoding is deterministic, so 0 is expected)."""
    predictor_s: float = 0.0
    """Seconds the length predictor took over these prompts (policies given its buckets), outside the timed window:
    a CPU server classifies between its steps, so add it to ``wall_s`` for what serving would pay."""
    steps: list[tuple[int, int, float]] = dataclasses.field(default_factory=list, repr=False)
    """(tokens computed, KV entries read, seconds) of every step, for calibrating the simulator."""
    modelled_tokens_per_s: float | None = None
    """Generated tokens over this run's steps timed by one step-time model fitted to the steps of every engine
    run of the bench (`common_speed`): its schedule's throughput at one machine speed. The runs of a bench are
    served one after the other, and this machine's speed drifts between them by several percent; this figure
    leaves the drift (and the time outside steps) out."""
    step_time_scale: float | None = None
    """This run's step seconds over what the common model predicts for the same steps: above 1 its steps ran
    slower than the bench's average for the same work (the machine drifting, or work the model does not see)."""

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.wall_s

    def record(self) -> dict:
        """The JSON record: the keys every bench reader relies on, then the rest."""
        ttft = [t for t in self.ttft_s if t is not None]
        return {
            "policy": self.name, "generated_tokens_per_s": self.tokens_per_s,
            **latency_figures(ttft, self.latency_s),
            "num_preemptions": self.num_preemptions, "num_recomputed_tokens": self.num_recomputed_tokens,
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("steps", "ttft_s", "latency_s")},
            "tokens_per_s": self.tokens_per_s, "requests_per_s": self.requests_per_s,
            "ttft_s": self.ttft_s, "latency_s": self.latency_s, "steps": self.steps,
        }  # fmt: skip


def draw_prompts(config: BenchConfig, tokenizer, context_tokens: int | None = None,
                 progress: Callable[[str], None] = print) -> tuple[list[tuple[str, list[int]]], list[tuple[str, list[int]]]]:
    """(timed prompts, warm-up prompts), all distinct, none labelled, as (text, chat-formatted ids); with
    ``context_tokens``, only prompts whose ids and max_new_tokens fit it (the others are skipped and counted)."""
    from pipeline.labelled import labelled_prompts

    exclude = labelled_prompts(config.labelled_data) if config.labelled_data else set()
    formatted: dict[str, list[int]] = {}
    skipped = 0

    def fits(row) -> bool:
        nonlocal skipped
        ids = formatted[row.prompt] = format_prompt(tokenizer, row.prompt)
        ok = context_tokens is None or len(ids) + config.max_new_tokens <= context_tokens
        skipped += not ok
        return ok

    rows = sample_prompts(config.prompts, config.num_prompts + config.warmup_prompts, exclude=exclude,
                          seed=config.seed, accept=fits)  # fmt: skip
    if skipped:
        progress(f"skipped {skipped} prompts that do not fit the {context_tokens}-token context with "
                 f"{config.max_new_tokens} new tokens")
    drawn = [(row.prompt, formatted[row.prompt]) for row in rows]
    return drawn[: config.num_prompts], drawn[config.num_prompts :]


def run_policy(
    name: str,
    engine_config: EngineConfig,
    *,
    model,
    tokenizer,
    prompts: list[tuple[str, list[int]]],
    max_new_tokens: int,
    predictions: Sequence[LengthPrediction | None] | None,
    buckets: BucketSpec,
    sampling: SamplingParams = SamplingParams(),
    knobs: PolicyConfig = PolicyConfig(),
    on_finish: Callable[[Request], None] = lambda request: None,
) -> tuple[BenchResult, list[tuple[int, ...]]]:
    """All prompts through a fresh engine with policy ``name`` (and ``knobs``' other fields), all arriving at
    t=0; returns the result and each request's generated token ids. ``on_finish`` sees every finished request
    (e.g. to write its mispredictions)."""
    config = dataclasses.replace(engine_config, policy=dataclasses.replace(knobs, policy=name))
    engine = LLMEngine(config, model=model, tokenizer=tokenizer, buckets=buckets, clock=time.perf_counter)
    start = time.perf_counter()
    requests = [
        engine.add_request(str(i), ids, max_new_tokens=max_new_tokens, sampling=sampling, prompt=text,
                           prediction=predictions[i] if predictions else None)
        for i, (text, ids) in enumerate(prompts)
    ]  # fmt: skip
    live_sum = held_sum = 0.0
    steps = []
    while engine.has_unfinished():
        t0 = time.perf_counter()
        step = engine.core.step()
        for request in step.finished:
            on_finish(request)
        dt = time.perf_counter() - t0
        out, snap = step.output, engine.snapshot()
        live_tokens = sum(s.start + s.num_new_tokens for s in out.seqs)
        steps.append((out.num_batched_tokens, live_tokens, dt))
        # A prefix several sequences share (prefix caching) is in each one's tokens: capped at what is held.
        live_sum += min(live_tokens / (snap.num_kv_blocks * engine.config.block_size),
                        snap.num_kv_blocks_held / snap.num_kv_blocks) * dt
        held_sum += snap.num_kv_blocks_held / snap.num_kv_blocks * dt
    wall = time.perf_counter() - start
    stats = engine.snapshot().stats
    answers = [tuple(r.output_token_ids) for r in requests]
    result = BenchResult(
        name, wall, len(prompts), sum(map(len, answers)),
        ttft_s=[None if r.first_token_time is None else r.first_token_time - start for r in requests],
        latency_s=[r.finish_time - start for r in requests], prediction=policy_needs(name),
        mean_running_batch=stats.mean_running_batch, kv_utilization=live_sum / wall,
        kv_reserved=held_sum / wall, num_preemptions=stats.num_preemptions,
        num_mispredictions=stats.num_mispredictions, num_recomputed_tokens=stats.num_recomputed_tokens, steps=steps,
        num_computed_tokens=stats.num_batched_tokens, num_prefix_query_tokens=stats.num_prefix_query_tokens,
        num_prefix_hit_tokens=stats.num_prefix_hit_tokens,
    )  # fmt: skip
    return result, answers


def common_speed(results: Sequence[BenchResult]) -> None:
    """Fill each engine run's `modelled_tokens_per_s` and `step_time_scale` from one linear step-time model
    (overhead + per token computed + per KV entry read) fitted to the steps of all of them."""
    from serve.sim.calibrate import fit_linear

    runs = [r for r in results if r.steps]
    if len(runs) < 2:
        return
    fit = fit_linear([step for r in runs for step in r.steps])
    for run in runs:
        modelled = sum(fit.step_s(tokens, context) for tokens, context, _ in run.steps)
        if modelled > 0:
            run.modelled_tokens_per_s = run.generated_tokens / modelled
            run.step_time_scale = sum(seconds for _, _, seconds in run.steps) / modelled


def answers_unlike(answers: Sequence[tuple[int, ...]], reference: Sequence[tuple[int, ...]]) -> int:
    """How many prompts were answered unlike ``reference`` (the same prompts, in order), token for token."""
    return sum(a != b for a, b in zip(answers, reference))


def predictions_for(name: str, *, predicted: Sequence[LengthPrediction], true_lengths: Sequence[int],
                    buckets: BucketSpec) -> list[LengthPrediction] | None:
    """What policy ``name`` is given, by the registry's `policy_needs`: nothing, the bucket predictor's
    predictions (the exact length stripped, so a bucket policy can never see it), or the true length."""
    need = policy_needs(name)
    if need == "none":
        return None
    if need == "buckets":
        return [dataclasses.replace(p, num_tokens=None) for p in predicted]
    return [LengthPrediction(buckets.bucket_of(n), num_tokens=n) for n in true_lengths]


def bucket_predictor(config: BenchConfig, texts: list[str], true_lengths: list[int], buckets: BucketSpec):
    """The bucket predictor of the policies that need one: a baseline, or a trained checkpoint."""
    if config.predictor in BASELINES:
        return baseline_predictor(config.predictor, buckets, lengths=dict(zip(texts, true_lengths)),
                                  accuracy=config.predictor_accuracy, seed=config.seed + 1)  # fmt: skip
    from predictor_train.inference import LengthPredictor

    return LengthPredictor.load(config.predictor, expected_buckets=buckets)


@torch.inference_mode()
def run_reference(model, tokenizer, prompts, *, batch_size: int, max_new_tokens: int, eos_ids: set[int]) -> BenchResult:
    """`transformers` generate with static batching (left padding), greedy, on the same prompts. A batch's
    requests all end when its last one does; their time to first token is not measured."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids))
    model.set_attn_implementation("sdpa")
    generated, latency, start = 0, [], time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        chunk = [ids for _, ids in prompts[i : i + batch_size]]
        width = max(map(len, chunk))
        input_ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk])
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
        out = model.generate(input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=sorted(eos_ids))  # every end the engine stops at
        for row in out[:, width:].tolist():
            generated += next((j + 1 for j, t in enumerate(row) if t in eos_ids), len(row))
        latency += [time.perf_counter() - start] * len(chunk)
    return BenchResult(f"hf-generate@{batch_size}", time.perf_counter() - start, len(prompts), generated,
                       ttft_s=[None] * len(prompts), latency_s=latency)  # fmt: skip


def with_decoding(config: BenchConfig, buckets: BucketSpec, progress: Callable[[str], None] = print) -> BenchConfig:
    """``config`` with its frequency penalty settled; a checkpoint predictor checked first (its buckets, and the
    decoding its labels were made with), so that a bad one fails now, not after the model loads and `max` runs."""
    if config.predictor in BASELINES:
        return dataclasses.replace(config, frequency_penalty=config.frequency_penalty or 0.0)
    from predictor_train.checkpoint import read_info
    from predictor_train.inference import check_compatible

    info = read_info(config.predictor)
    if info.buckets.max_tokens != config.max_new_tokens:  # the bench's own option, named (not "the server")
        raise ValueError(f"predictor checkpoint {config.predictor} predicts lengths up to {info.buckets.max_tokens} "
                         f"tokens, so the bench's max_new_tokens must be {info.buckets.max_tokens} (it is "
                         f"{config.max_new_tokens}); drop --max-new-tokens, or bench with --predictor oracle")
    check_compatible(info, config.predictor, expected_buckets=buckets,
                     expected_target_model=model_id(config.model) if config.check_target_model else None)
    penalty = check_decoding(config, info.decoding or {}, where=f"predictor checkpoint {config.predictor}")
    if config.frequency_penalty is None:
        progress(f"frequency_penalty {penalty}: the predictor checkpoint's labels were made with it")
    return dataclasses.replace(config, frequency_penalty=penalty)


def check_decoding(config: BenchConfig, decoding: dict, *, where: str) -> float:
    """The frequency penalty to bench a predictor with whose labels were decoded with ``decoding``: the bench decodes
    greedily, so a predictor of sampled or otherwise penalised lengths is refused, and a frequency penalty set
    otherwise than its labels' too; unset, it is the labels' (0 if they do not say)."""
    learned = decoding.get("frequency_penalty")
    for key, bench_value in (("temperature", 0.0), ("presence_penalty", 0.0)):
        if decoding.get(key) not in (None, bench_value):
            raise ValueError(f"{where} learned lengths decoded with {key} {decoding[key]}, but `s3 bench` decodes "
                             f"with {key} {bench_value}; bench a checkpoint trained on labels made that way")
    if config.frequency_penalty is None:
        return float(learned or 0.0)
    if learned is not None and float(learned) != config.frequency_penalty:
        raise ValueError(f"{where} learned lengths decoded with frequency_penalty {learned}, but this bench sets "
                         f"{config.frequency_penalty}; set frequency_penalty={learned} (or leave it unset, "
                         "`--set frequency_penalty=null`, to use the checkpoint's)")
    return config.frequency_penalty


def run_bench(config: BenchConfig, progress: Callable[[str], None] = print,
              save: Callable[[dict], object] | None = None) -> dict:
    """Every policy of ``config.run_order`` on the same prompts and pool, then the transformers reference; the
    report (see `save_bench`). ``save(report so far)`` runs after each policy, ``complete`` False until the end,
    so that an interrupted bench keeps the policies it finished."""
    from serve.engine.loader import load_model

    buckets = BucketSpec.uniform(config.max_new_tokens, config.num_buckets)
    config = with_decoding(config, buckets, progress)
    model, tokenizer = load_model(None if config.model == "smollm2" else config.model)
    context = getattr(model.config, "max_position_embeddings", None)
    prompts, warmup = draw_prompts(config, tokenizer, context, progress)
    longest = max(len(ids) for _, ids in prompts) + config.max_new_tokens  # the timed prompts alone size the pool
    warmup = [(text, ids) for text, ids in warmup if len(ids) + WARMUP_NEW_TOKENS <= longest]
    engine_config = EngineConfig(
        model=config.model, kv_cache_tokens=config.kv_worst_case_seqs * longest + config.block_size,
        block_size=config.block_size, max_num_seqs=config.max_num_seqs,
    )  # fmt: skip
    sampling = SamplingParams(frequency_penalty=config.frequency_penalty)
    progress(f"{len(prompts)} prompts, KV pool {engine_config.kv_cache_tokens} tokens ({config.kv_worst_case_seqs} x {longest})")
    if warmup:
        progress(f"warm-up: {len(warmup)} other prompts, untimed")
        run_policy("max", engine_config, model=model, tokenizer=tokenizer, prompts=warmup, buckets=buckets,
                   max_new_tokens=min(WARMUP_NEW_TOKENS, config.max_new_tokens), predictions=None, sampling=sampling)
    results, true_lengths, predicted, knobs, reference_answers = [], [], [], config.policy, []
    for name in config.run_order:
        progress(f"running {name}")
        given = None if name == "max" else predictions_for(name, predicted=predicted, true_lengths=true_lengths,
                                                              buckets=buckets)  # fmt: skip
        result, answers = run_policy(name, engine_config, model=model, tokenizer=tokenizer, prompts=prompts,
                                     max_new_tokens=config.max_new_tokens, predictions=given, buckets=buckets,
                                     sampling=sampling, knobs=knobs)  # fmt: skip
        if name == "max":
            reference_answers, texts = answers, [text for text, _ in prompts]
            true_lengths = [len(answer) for answer in answers]
            predictor = bucket_predictor(config, texts, true_lengths, buckets)
            started = time.perf_counter()
            predicted, knobs = list(predictor.predict(texts)), with_length_profile(config.policy, predictor)
            predictor_s = time.perf_counter() - started
        else:
            result.answers_differing = answers_unlike(answers, reference_answers)
            result.predictor_s = predictor_s if result.prediction == "buckets" else 0.0
            if result.answers_differing:
                progress(f"warning: {name} answered {result.answers_differing} prompts unlike max "
                         "(non-deterministic kernels?)")
        results.append(result)
        if save is not None:
            save(_report(config, results, None, engine_config, prompts, true_lengths, predicted, complete=False))
    reference = None
    if config.reference_batch and sampling.has_penalties:
        progress("skipping the transformers generate reference: it has no frequency penalty")
    elif config.reference_batch:
        progress(f"running transformers generate at batch {config.reference_batch}")
        reference = run_reference(model, tokenizer, prompts, batch_size=config.reference_batch,
                                  max_new_tokens=config.max_new_tokens, eos_ids=eos_token_ids(model, tokenizer))
    return _report(config, results, reference, engine_config, prompts, true_lengths, predicted, complete=True)


def _report(config: BenchConfig, results: list[BenchResult], reference: BenchResult | None,
            engine_config: EngineConfig, prompts: list[tuple[str, list[int]]], true_lengths: list[int],
            predicted: list[LengthPrediction], *, complete: bool) -> dict:
    common_speed(results)
    return {"config": config, "results": results, "reference": reference, "complete": complete,
            "kv_cache_tokens": engine_config.kv_cache_tokens, "prompts": [text for text, _ in prompts],
            "true_lengths": true_lengths, "prompt_tokens": [len(ids) for _, ids in prompts],
            "predicted_buckets": [p.bucket for p in predicted]}  # fmt: skip
