"""A small head over the target model's own prompt representation, beside the trained predictor (TRAIL-style).

    .venv/bin/python benchmarks/target_head.py [--data data/labelled] [--predictor runs/predictor] \
        [--max-train-rows-per-source 300] [--output-dir runs/target_head]

Runs SmolLM2 over every labelled prompt (chat-formatted as `s3 generate` labelled it), keeps four vectors of
its hidden states (mean over the prompt and at its last token, from the middle and the final layer), trains a
two-layer head on the train split with early stopping on validation NLL, fits a temperature on validation, and
evaluates it on the test split with the same metrics and baselines as `s3 evaluate`, beside the trained
predictor. Prints both tables and the cost per prompt; writes `target_head.json` and the plots to the output
folder. Features are cached in the output folder (delete `features.pt` after relabelling or changing the cap).

The head is a comparison row, not the predictor the server uses: a server has these states only after the
prompt's prefill, so admitting by them would mean prefilling before admission (or a second forward pass).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from core.buckets import BucketSpec  # noqa: E402
from core.records import json_text  # noqa: E402
from pipeline.labelled import labelled_data  # noqa: E402
from pipeline.prompts import format_prompt  # noqa: E402
from predictor_train.calibration import fit_temperature  # noqa: E402
from predictor_train.data import cap_per_source, labels_of, load_records, split_records  # noqa: E402
from predictor_train.evaluate import evaluate_rows  # noqa: E402
from predictor_train.inference import LengthPredictor  # noqa: E402
from serve.engine.loader import load_model  # noqa: E402

MAX_PROMPT_TOKENS = 1024  # the engine's context; longer prompts keep their last tokens


@torch.inference_mode()
def prompt_features(model, tokenizer, prompts: list[str]) -> tuple[torch.Tensor, float]:
    """(features [n, 4 * hidden], mean seconds per prompt): one forward pass per prompt, no padding."""
    rows, start = [], time.perf_counter()
    for prompt in tqdm(prompts, desc="features", unit="prompt"):
        ids = torch.tensor([format_prompt(tokenizer, prompt)[-MAX_PROMPT_TOKENS:]])
        states = model.model(input_ids=ids, output_hidden_states=True).hidden_states
        middle, final = states[len(states) // 2][0], states[-1][0]
        rows.append(torch.cat([middle.mean(0), middle[-1], final.mean(0), final[-1]]))
    return torch.stack(rows), (time.perf_counter() - start) / max(len(prompts), 1)


def cached_features(model_and_tokenizer, splits: dict, path: Path) -> dict:
    if path.exists():
        return torch.load(path)
    model, tokenizer = model_and_tokenizer()
    cache, seconds = {}, 0.0
    for name, rows in splits.items():
        cache[name], per_prompt = prompt_features(model, tokenizer, list(rows["prompt"]))
        seconds += per_prompt * len(rows)
    cache["seconds_per_prompt"] = seconds / sum(len(rows) for rows in splits.values())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(cache, path)
    return cache


def train_head(x_train, y_train, x_val, y_val, num_buckets: int, *, epochs: int = 300, patience: int = 25,
               seed: int = 0) -> torch.nn.Module:
    """LayerNorm -> Linear(256) -> GELU -> Dropout -> Linear; AdamW, minibatches of 64, best validation NLL."""
    torch.manual_seed(seed)
    head = torch.nn.Sequential(
        torch.nn.LayerNorm(x_train.shape[1]), torch.nn.Linear(x_train.shape[1], 256), torch.nn.GELU(),
        torch.nn.Dropout(0.2), torch.nn.Linear(256, num_buckets),
    )  # fmt: skip
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.05)
    loss_fn = torch.nn.CrossEntropyLoss()
    best, best_state, waited = float("inf"), None, 0
    for _ in range(epochs):
        head.train()
        for idx in torch.randperm(len(x_train)).split(64):
            optimizer.zero_grad()
            loss_fn(head(x_train[idx]), y_train[idx]).backward()
            optimizer.step()
        head.eval()
        with torch.no_grad():
            val = loss_fn(head(x_val), y_val).item()
        if val < best - 1e-4:
            best, best_state, waited = val, {k: v.clone() for k, v in head.state_dict().items()}, 0
        else:
            waited += 1
            if waited >= patience:
                break
    head.load_state_dict(best_state)
    return head.eval()


class HeadPredictor:
    """What evaluate_rows needs of a predictor, over precomputed features looked up by prompt."""

    checkpoint_id = "smollm2-hidden-state head"

    def __init__(self, head, features: dict[str, torch.Tensor], buckets: BucketSpec, temperature: float) -> None:
        self.head, self.features, self.buckets, self.temperature = head, features, buckets, temperature

    @torch.no_grad()
    def predict_logits(self, prompts, *, batch_size: int = 32) -> torch.Tensor:
        return self.head(torch.stack([self.features[p] for p in prompts]))


@click.command()
@click.option("--data", default="data/labelled", show_default=True)
@click.option("--predictor", "predictor_dir", default="runs/predictor", show_default=True,
              help="The trained predictor to compare with (its bucket scheme is used for the head too).")
@click.option("--max-train-rows-per-source", type=int, default=0, show_default=True,
              help="Train the head on at most this many rows per source (0: all), as TrainConfig's option.")
@click.option("--output-dir", default="runs/target_head", show_default=True)
def main(data, predictor_dir, max_train_rows_per_source, output_dir):
    out = Path(output_dir)
    predictor = LengthPredictor.load(predictor_dir)
    spec = predictor.buckets
    dataset, _recipe = labelled_data(data)
    splits = split_records(load_records(dataset))
    full_train = splits["train"]  # the baselines are fitted on all of it, as `s3 evaluate` does
    splits["train"] = cap_per_source(full_train, max_train_rows_per_source)
    cache = cached_features(load_model, splits, out / "features.pt")
    labels = {name: torch.tensor(labels_of(splits[name]["num_output_tokens"], spec)) for name in splits}
    start = time.perf_counter()
    head = train_head(cache["train"], labels["train"], cache["validation"], labels["validation"], spec.num_buckets)
    train_s = time.perf_counter() - start
    with torch.no_grad():
        temperature = fit_temperature(head(cache["validation"]), labels["validation"].tolist())
        start = time.perf_counter()
        head(cache["test"][:1])
        head_ms = (time.perf_counter() - start) * 1e3
    features = {p: cache[name][i] for name in splits for i, p in enumerate(splits[name]["prompt"])}
    rows, train = splits["test"], full_train
    head_report = evaluate_rows(HeadPredictor(head, features, spec, temperature), rows, train=train,
                                out_dir=out, title="test split")
    predictor_report = evaluate_rows(predictor, rows, train=train, title="test split")
    click.echo(f"SmolLM2 hidden-state head (temperature {temperature:.2f}, trained in {train_s:.0f} s):")
    click.echo(head_report.table)
    click.echo(f"\ntrained predictor {predictor.checkpoint_id}:")
    click.echo(predictor_report.table)
    seconds = cache["seconds_per_prompt"]
    click.echo(f"\ncost per prompt: SmolLM2 forward over the prompt {seconds * 1e3:.1f} ms (batch 1, a server's "
               f"prefill computes it anyway), head {head_ms:.2f} ms")
    report = {
        "head": {"metrics": head_report.metrics["predictor"], "per_source": head_report.per_source,
                 "probabilities": head_report.probabilities, "temperature": temperature},
        "predictor": {"checkpoint_id": predictor.checkpoint_id, "metrics": predictor_report.metrics["predictor"],
                      "per_source": predictor_report.per_source, "probabilities": predictor_report.probabilities},
        "baselines": {k: v for k, v in head_report.metrics.items() if k != "predictor"},
        "feature_ms_per_prompt": seconds * 1e3, "head_ms_per_prompt": head_ms,
        "num_rows": {name: len(splits[name]) for name in splits},
    }  # fmt: skip
    (out / "target_head.json").write_text(json_text(report, indent=2))
    click.echo(f"wrote {out / 'target_head.json'}")


if __name__ == "__main__":
    main()
