"""Serving-side use of a trained length predictor: load a checkpoint, predict buckets for prompts, time it."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from predictor_train.backbone import model_input_names, prepare_tokenizer, usable_prompt_tokens
from core.buckets import BucketSpec
from predictor_train.checkpoint import PREDICTOR_FILE, CheckpointInfo, describe_buckets, read_info
from predictor_train.data import encode
from predictor_train.familiarity import Familiarity, mean_pooled
from core.predictors import checked_prompts
from core.request import LengthPrediction  # pure Python: the serving side owns the type

log = logging.getLogger(__name__)

BENCHMARK_PROMPTS = (
    "Hi!",
    "What is the capital of France?",
    "Write a short poem about the sea at night.",
    "Explain, step by step, how a transformer language model turns a prompt into its next token.",
    "Summarise the following paragraph in two sentences: " + "The committee met to discuss the budget. " * 12,
    "Write a Python function that parses a CSV file, skips malformed rows, and returns per-column averages.",
    "Translate into German: The weather was lovely, so we walked along the river until the sun went down.",
    "List ten ideas for a birthday party for a seven-year-old who loves dinosaurs and space.",
)


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
"""What `from_pretrained` loads a model's weights from (familiarity.safetensors, beside them, is not one)."""


class LengthPredictor:
    """A trained bucket classifier with the checkpoint facts that serving must agree with."""

    def __init__(self, model, tokenizer, info: CheckpointInfo, *, device: str | torch.device = "cpu",
                 familiarity: Familiarity | None = None) -> None:
        num_labels = model.config.num_labels
        if num_labels != info.buckets.num_buckets:
            raise ValueError(f"the classifier has {num_labels} outputs but {PREDICTOR_FILE} names "
                             f"{info.buckets.num_buckets} buckets: the folder mixes two checkpoints; train it again")
        vocab = getattr(model.config, "vocab_size", None)
        if vocab and 2 * len(tokenizer) < vocab:  # a folder without its tokenizer files gets a stub of a few tokens
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens for a model of {vocab}: the checkpoint's "
                             "tokenizer files are missing or another model's; copy the whole checkpoint folder")
        self.model = model.to(device).eval()
        prepare_tokenizer(tokenizer, model)
        self.tokenizer = tokenizer
        self.info = info
        self.device = torch.device(device)
        self.max_prompt_tokens = int(info.train_config.get("max_prompt_tokens", 256))
        usable = usable_prompt_tokens(tokenizer, model)
        if usable is not None and self.max_prompt_tokens > usable:  # a checkpoint from before training checked it
            log.warning("the checkpoint reads prompts up to %d tokens, more than its encoder takes (%d): cut at %d",
                        self.max_prompt_tokens, usable, usable)
            self.max_prompt_tokens = usable
        self.prompt_truncation = info.train_config.get("prompt_truncation", "head")
        self.input_names = model_input_names(model)
        self.familiarity = familiarity
        """The training prompts' embeddings and the unfamiliar threshold (None: the checkpoint keeps none)."""

    @property
    def buckets(self) -> BucketSpec:
        return self.info.buckets

    @property
    def length_prior(self) -> tuple[float, ...] | None:
        """The training lengths' bucket frequencies (None for checkpoints older than this field)."""
        return None if self.info.length_prior is None else tuple(self.info.length_prior)

    @property
    def length_shape(self) -> tuple[tuple[float, ...], ...] | None:
        """Where the training lengths fell inside each bucket (None for checkpoints older than this field)."""
        shape = self.info.length_shape
        return None if shape is None else tuple(tuple(row) for row in shape)

    @property
    def temperature(self) -> float:
        """The calibration temperature the logits are divided by (stored in the checkpoint)."""
        return float(self.info.temperature)

    @property
    def checkpoint_id(self) -> str:
        return self.info.checkpoint_id

    @property
    def target_model(self) -> str:
        return self.info.target_model

    @property
    def decoding(self) -> dict:
        """The decoding settings the training labels were generated with (serve with the same)."""
        return self.info.decoding

    @property
    def expected_within_one(self) -> float | None:
        """Within-one-bucket accuracy on the validation split (the checkpoint's metrics; with a blend, the blended
        answers'): what a server should see on traffic like the training data's."""
        blended = self.familiarity.validation_within_one if self.familiarity is not None else None
        value = self.info.metrics.get("within_one_accuracy") if blended is None else blended
        return None if value is None else float(value)

    @classmethod
    def load(cls, checkpoint_dir: str | Path, expected_target_model: str | None = None,
             expected_buckets: BucketSpec | None = None, *, device: str | torch.device = "cpu") -> "LengthPredictor":
        """Load a checkpoint written by training; refuse one made for another target LLM or other buckets."""
        info = read_info(checkpoint_dir)
        check_compatible(info, checkpoint_dir, expected_target_model=expected_target_model,
                         expected_buckets=expected_buckets)
        if not any((Path(checkpoint_dir) / name).is_file() for name in WEIGHT_FILES):
            raise ValueError(f"{checkpoint_dir} has no weights ({', '.join(WEIGHT_FILES)}) beside its "
                             f"{PREDICTOR_FILE}: copy the whole checkpoint folder")
        model = AutoModelForSequenceClassification.from_pretrained(
            checkpoint_dir, dtype=torch.float32, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir, local_files_only=True)
        familiarity = Familiarity.load(checkpoint_dir, info)
        if read_info(checkpoint_dir).checkpoint_id != info.checkpoint_id:  # its weights may be another's
            raise ValueError(f"{checkpoint_dir} changed while it was loaded (a training run published another "
                             "checkpoint into it); load it again")
        return cls(model, tokenizer, info, device=device, familiarity=familiarity)

    @torch.inference_mode()
    def forward(self, prompts: Sequence[str], *, batch_size: int = 32,
                embed: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw logits ``(len(prompts), num_buckets)`` and, with ``embed``, the prompts' pooled last hidden states
        (predictor_train/familiarity.py), both on the CPU in the input order."""
        prompts = checked_prompts(prompts)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        logits = torch.empty(len(prompts), self.buckets.num_buckets)
        pooled = torch.empty(len(prompts), self.model.config.hidden_size) if embed else None
        # Longest first, so each batch pads to similar lengths; results go back to the input order.
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = encode(self.tokenizer, [prompts[i] for i in rows], max_prompt_tokens=self.max_prompt_tokens,
                           input_names=self.input_names, truncation=self.prompt_truncation)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            out = self.model(**batch, output_hidden_states=embed)
            logits[rows] = out.logits.float().cpu()
            if embed:
                pooled[rows] = mean_pooled(out.hidden_states[-1], batch["attention_mask"]).cpu()
        return logits, pooled

    def predict_logits(self, prompts: Sequence[str], *, batch_size: int = 32) -> torch.Tensor:
        """Raw bucket logits (before the temperature), ``(len(prompts), num_buckets)``, on the CPU."""
        return self.forward(prompts, batch_size=batch_size)[0]

    def embed(self, prompts: Sequence[str], *, batch_size: int = 32) -> torch.Tensor:
        """The encoder's view of each prompt (predictor_train/familiarity.py), ``(len(prompts), hidden_size)``."""
        return self.forward(prompts, batch_size=batch_size, embed=True)[1]

    def predict_probs(self, prompts: Sequence[str], *, batch_size: int = 32) -> torch.Tensor:
        """Calibrated bucket probabilities, ``softmax(logits / temperature)`` blended with the neighbours' vote where
        the checkpoint fitted one (predictor_train/familiarity.py), ``(len(prompts), num_buckets)``."""
        return self.outputs(prompts, batch_size=batch_size)[1]

    def outputs(self, prompts: Sequence[str], *,
                batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """From one pass: the raw logits, the calibrated (and blended) probabilities, and each prompt's familiarity
        (None when the checkpoint keeps no training-prompt embeddings)."""
        logits, pooled = self.forward(prompts, batch_size=batch_size, embed=self.familiarity is not None)
        probs = (logits / self.temperature).softmax(dim=-1)
        if pooled is None:
            return logits, probs, None
        return logits, self.familiarity.blend(probs, pooled), self.familiarity.scores(pooled)

    def familiarity_scores(self, prompts: Sequence[str], *, batch_size: int = 32) -> torch.Tensor | None:
        """Each prompt's familiarity (None when the checkpoint keeps no training-prompt embeddings)."""
        return self.outputs(prompts, batch_size=batch_size)[2]

    def predict(self, prompts: Sequence[str], *, batch_size: int = 32,
                quantile: float | None = None) -> list[LengthPrediction]:
        """One prediction per prompt: the arg-max bucket, or with ``quantile`` the smallest bucket whose cumulative
        probability reaches it (e.g. 0.9 reserves more and under-predicts less); with the prompt's familiarity when
        the checkpoint keeps its training prompts' embeddings."""
        if quantile is not None and not 0 < quantile <= 1:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        prompts = checked_prompts(prompts)
        if not prompts:
            return []
        _, probs, scores = self.outputs(prompts, batch_size=batch_size)
        unfamiliar = None if scores is None else self.familiarity.unfamiliar(scores)
        out = []
        for i, row in enumerate(probs.tolist()):
            bucket = max(range(len(row)), key=row.__getitem__) if quantile is None else \
                self.buckets.quantile_bucket(row, quantile)
            familiar = {} if scores is None else {"familiarity": float(scores[i]), "unfamiliar": bool(unfamiliar[i])}
            # num_tokens stays None: it means an exact length (the oracle's); the reservation comes from the bucket.
            out.append(LengthPrediction(bucket=bucket, probs=tuple(row), num_tokens=None, **familiar,
                                        checkpoint_id=self.checkpoint_id))
        return out

    def benchmark_latency(self, batch_sizes: Sequence[int] = (1, 32), *, num_prompts: int = 32,
                          num_repeats: int = 3, prompts: Sequence[str] = BENCHMARK_PROMPTS) -> dict[int, float]:
        """Seconds per prompt at each batch size: the same ``num_prompts`` prompts (``prompts`` cycled) predicted
        in batches of that size, median of ``num_repeats`` timed passes after a warm-up pass."""
        workload = [prompts[i % len(prompts)] for i in range(num_prompts)]
        result = {}
        for batch_size in batch_sizes:
            self.predict_probs(workload, batch_size=batch_size)  # warm-up: allocator, kernels, thread pool
            times = []
            for _ in range(num_repeats):
                start = time.perf_counter()
                self.predict_probs(workload, batch_size=batch_size)
                times.append(time.perf_counter() - start)
            result[batch_size] = sorted(times)[len(times) // 2] / num_prompts
        return result


def check_compatible(info: CheckpointInfo, where: str | Path, *, expected_target_model: str | None = None,
                     expected_buckets: BucketSpec | None = None) -> None:
    """Raise ValueError, saying what to change, if a checkpoint was made for another target model or buckets."""
    if expected_target_model is not None and info.target_model != expected_target_model:
        raise ValueError(
            f"predictor checkpoint {where} (id {info.checkpoint_id}) learned the output lengths of "
            f"{info.target_model!r}, but it would predict them for {expected_target_model!r}; train a predictor on "
            f"data generated with {expected_target_model!r}, pass a checkpoint made for it, or set "
            "check_target_model=false to use it anyway"
        )
    if expected_buckets is not None and info.buckets != expected_buckets:
        raise ValueError(
            f"predictor checkpoint {where} (id {info.checkpoint_id}) predicts {describe_buckets(info)} with upper "
            f"edges {list(info.buckets.upper_edges)}, but the server expects upper edges "
            f"{list(expected_buckets.upper_edges)}; set the server's buckets to match or retrain the predictor "
            "with the server's bucket settings"
        )
