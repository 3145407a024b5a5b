"""A roofline cost model of one engine step, with presets for the paper's setting and larger ones.

A step reads the weights once, reads every scheduled sequence's KV cache once, writes the new tokens' KV,
and does ~2 x params FLOPs per new token plus attention. Its time is the larger of memory time and compute
time (each at an achievable fraction of the hardware peak), plus tensor-parallel all-reduces and a fixed
per-step overhead (kernel launches, sampling, scheduling). The numbers are public spec-sheet figures; the
efficiency factors and overheads are assumptions, stated here so they can be argued with.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

from core.files import replacing
from serve.kv import KVSpec
from serve.sched_output import SchedulerOutput

GB = 1e9


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The shape of a decoder-only transformer, as far as memory and FLOPs go."""

    name: str
    num_params: float
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_seq_len: int
    """Context length: the worst case a `max` reservation must cover."""
    dtype_bytes: int = 2

    def kv_spec(self, tensor_parallel: int = 1) -> KVSpec:
        return KVSpec(
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype_bytes=self.dtype_bytes,
            tensor_parallel=tensor_parallel,
        )

    @property
    def weight_bytes(self) -> float:
        return self.num_params * self.dtype_bytes


@dataclasses.dataclass(frozen=True)
class HardwareSpec:
    """One or more identical devices running one model with tensor parallelism."""

    name: str
    memory_bytes: float
    """Memory of one device."""
    bandwidth: float
    """Peak memory bandwidth of one device, bytes/s."""
    peak_flops: float
    """Peak dense FLOP/s of one device at the model's dtype."""
    num_devices: int = 1
    """Tensor-parallel degree."""
    interconnect_bandwidth: float = 300 * GB
    """Per-device all-reduce bandwidth between devices, bytes/s (NVLink class)."""
    bandwidth_efficiency: float = 0.8
    """Fraction of peak bandwidth that decode kernels reach."""
    flops_efficiency: float = 0.6
    """Fraction of peak FLOP/s that large matmuls reach."""
    step_overhead_s: float = 3e-3
    """Fixed cost of a step: launches, sampling, scheduling, host-device traffic."""
    memory_utilization: float = 0.9
    """Fraction of device memory the engine may use for weights, activations and KV cache."""
    activation_bytes: float = 2 * GB
    """Per-device memory kept for activations and workspace."""


@dataclasses.dataclass(frozen=True)
class LinearCost:
    """A step-time model fitted to an engine's measured steps: overhead + per token + per cached token.

    Used instead of the roofline where one was calibrated (the CPU engine, whose steps are not roofline-bound:
    Python overhead, gathers and small matmuls dominate)."""

    overhead_s: float
    per_token_s: float
    """Per token computed in the step (prefill or decode)."""
    per_context_s: float
    """Per KV entry read (every scheduled sequence's context)."""
    source: str = ""
    """Where the fit came from (a bench.json)."""
    fit_file: str = ""
    """The file this fit was read from, absolute (runs/calibration/ is looked up from the working directory, so
    two folders can give a preset two fits); set on reading, not written."""

    def step_s(self, num_tokens: int, num_context: int) -> float:
        """Seconds of a step computing ``num_tokens`` tokens and reading ``num_context`` KV entries."""
        return self.overhead_s + self.per_token_s * num_tokens + self.per_context_s * num_context


@dataclasses.dataclass(frozen=True)
class CostModel:
    model: ModelSpec
    hardware: HardwareSpec
    linear: LinearCost | None = None
    """A calibrated step-time model; None uses the roofline."""

    @property
    def tensor_parallel(self) -> int:
        return self.hardware.num_devices

    @property
    def kv_spec(self) -> KVSpec:
        return self.model.kv_spec(self.tensor_parallel)

    def kv_budget_bytes(self) -> float:
        """Per-device bytes left for the KV cache once weights and activations are placed."""
        hw = self.hardware
        budget = hw.memory_bytes * hw.memory_utilization - self.model.weight_bytes / hw.num_devices
        budget -= hw.activation_bytes
        if budget <= 0:
            raise ValueError(f"{self.model.name} does not fit on {hw.num_devices} x {hw.name}")
        return budget

    def num_blocks(self, block_size: int) -> int:
        return self.kv_spec.num_blocks(self.kv_budget_bytes(), block_size)

    def step_time(self, out: SchedulerOutput) -> float:
        """Seconds to run one planned step."""
        num_tokens = 0
        num_context = 0  # KV entries read: each sequence's cache, once per step
        attn_pairs = 0  # (query, key) pairs: each new token attends to every token before it
        for seq in out.seqs:
            n, end = seq.num_new_tokens, seq.start + seq.num_new_tokens
            num_tokens += n
            num_context += end
            attn_pairs += n * seq.start + n * (n + 1) // 2
        return self.time_for(num_tokens=num_tokens, num_context=num_context, attn_pairs=attn_pairs)

    def time_for(self, *, num_tokens: int, num_context: int, attn_pairs: int) -> float:
        if num_tokens == 0:
            return 0.0
        if self.linear is not None:
            return self.linear.step_s(num_tokens, num_context)
        m, hw, tp = self.model, self.hardware, self.hardware.num_devices
        kv_bytes = self.kv_spec.bytes_per_token * (num_context + num_tokens)  # read + write, per device
        bytes_moved = m.weight_bytes / tp + kv_bytes
        # q.k and p.v: 2 FLOPs each per (query, key) pair per head dim per head per layer.
        attn_flops = 4 * attn_pairs * m.num_heads * m.head_dim * m.num_layers
        flops = (2 * m.num_params * num_tokens + attn_flops) / tp
        memory_s = bytes_moved / (hw.bandwidth * hw.bandwidth_efficiency)
        compute_s = flops / (hw.peak_flops * hw.flops_efficiency)
        comm_s = 0.0
        if tp > 1:  # two all-reduces of (tokens x hidden) per layer, ring: 2 (tp - 1) / tp of the data each
            data = 2 * m.num_layers * num_tokens * m.hidden_size * m.dtype_bytes
            comm_s = data * 2 * (tp - 1) / tp / hw.interconnect_bandwidth
        return max(memory_s, compute_s) + comm_s + hw.step_overhead_s


# Public figures: GPT-J-6B (EleutherAI), LLaMA-2 13B / 70B (Meta), A100-SXM4-80GB (NVIDIA spec sheet).
MODELS = {
    "gpt-j-6b": ModelSpec("gpt-j-6b", 6.05e9, 28, 4096, 16, 16, 256, max_seq_len=2048),
    "llama-2-13b": ModelSpec("llama-2-13b", 13.0e9, 40, 5120, 40, 40, 128, max_seq_len=4096),
    "llama-2-70b": ModelSpec("llama-2-70b", 69.0e9, 80, 8192, 64, 8, 128, max_seq_len=4096),
}

A100_80GB = HardwareSpec("A100-SXM4-80GB", memory_bytes=80 * GB, bandwidth=2039 * GB, peak_flops=312e12)

PRESETS = {
    "paper": CostModel(MODELS["gpt-j-6b"], A100_80GB),
    "llama-2-13b-a100": CostModel(MODELS["llama-2-13b"], A100_80GB),
    "llama-2-70b-8xa100": CostModel(MODELS["llama-2-70b"], dataclasses.replace(A100_80GB, num_devices=8)),
}
"""Named settings: `paper` is the S3 paper's (GPT-J-6B, fp16, one A100-80GB)."""


CALIBRATION_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs" / "calibration"
"""The shipped fit (tracked)."""
RUNS_CALIBRATION_DIR = pathlib.Path("runs") / "calibration"
"""Where `s3 simulate --calibrate-from` writes a new fit; read before the shipped one."""

SMOLLM2_CPU = CostModel(
    ModelSpec("smollm2-135m", 0.135e9, 30, 576, 9, 3, 64, max_seq_len=8192, dtype_bytes=4),
    HardwareSpec("2-core CPU", memory_bytes=24 * GB, bandwidth=10 * GB, peak_flops=100e9, activation_bytes=1 * GB),
)


def load_calibration(name: str) -> LinearCost | None:
    """The step-time fit ``name``.json of runs/calibration/, else of the shipped configs/calibration/; None if
    neither has one."""
    for folder in (RUNS_CALIBRATION_DIR, CALIBRATION_DIR):
        path = folder / f"{name}.json"
        if path.exists():
            return read_fit(path)
    return None


def read_fit(path: pathlib.Path) -> LinearCost:
    """A `LinearCost` from its JSON file; a file that is not one (empty, cut short, other keys) is named, with
    what to do, rather than failing in json or in the constructor."""
    fix = ("restore it (git checkout configs/calibration)" if path.parent.resolve() == CALIBRATION_DIR
           else "remove it or run `s3 simulate --calibrate-from` again")
    try:
        fit = LinearCost(**{**json.loads(path.read_text()), "fit_file": str(path.resolve())})
        coefficients = (fit.overhead_s, fit.per_token_s, fit.per_context_s)
        if not all(isinstance(c, (int, float)) and not isinstance(c, bool) and 0 <= c < math.inf for c in coefficients):
            raise ValueError(f"coefficients must be numbers >= 0, got {coefficients}")
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a step-time fit ({exc}); {fix}") from None
    return fit


def write_fit(fit: LinearCost, path: pathlib.Path) -> None:
    """Write ``fit`` to ``path`` whole or not at all (a temporary file, then a rename): an interrupted write would
    leave a file every later `--preset smollm2-cpu` run fails on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        tmp.write_text(json.dumps({k: v for k, v in dataclasses.asdict(fit).items() if k != "fit_file"}, indent=2))


def get_preset(name: str) -> CostModel:
    """A named preset; `smollm2-cpu` uses the fit `s3 simulate --calibrate-from` wrote to runs/calibration/, else
    the shipped configs/calibration/smollm2-cpu.json."""
    if name == "smollm2-cpu":
        return dataclasses.replace(SMOLLM2_CPU, linear=load_calibration(name))
    if name not in PRESETS:
        raise ValueError(f"unknown simulator preset {name!r}; choose one of {', '.join([*PRESETS, 'smollm2-cpu'])}")
    return PRESETS[name]
