"""Does the length predictor slow the engine's decode steps when both run in one server process on the CPU?

    .venv/bin/python benchmarks/predictor_contention.py --predictor runs/predictor_9k --output runs/contention.json

SmolLM2 decodes a batch of ``--batch`` sequences while another thread classifies one prompt every ``--period``
seconds, as a predictor thread does with requests arriving at that rate: (1) alone, (2) at the same time as
the steps (the server on a GPU, `predictor_thread`), (3) from the other thread but taking turns (each
prediction waits for the step under way, the next step waits for it), (4) in the stepping thread itself, before
a step (the server on a CPU), (5) alone again, to show the machine's drift. Prints and writes milliseconds per
decode step and predictions made, under ``results``. Not a test; run it with nothing else heavy running.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402
import torch  # noqa: E402

from core.files import output_file  # noqa: E402
from core.records import json_text  # noqa: E402
from predictor_train.inference import LengthPredictor  # noqa: E402
from serve.engine.llm import EngineConfig, LLMEngine  # noqa: E402
from serve.policy_config import PolicyConfig  # noqa: E402

PROMPT = "Write a long story about a dragon who learns to cook, with a recipe in every chapter. " * 4
QUESTION = "Explain how a language model decides how long its answer will be, with examples."


class Turns:
    """The other thread predicts only between two steps: it asks, the stepping thread lets it go and waits."""

    def __init__(self) -> None:
        self.asked, self.go, self.done = threading.Event(), threading.Event(), threading.Event()

    @contextlib.contextmanager
    def prediction(self):
        self.asked.set()
        self.go.wait()
        self.go.clear()
        try:
            yield
        finally:
            self.done.set()

    def between_steps(self) -> None:
        if self.asked.is_set():
            self.asked.clear()
            self.go.set()
            self.done.wait()
            self.done.clear()


def predict_every(predictor: LengthPredictor, period: float, stop: threading.Event, turns: Turns | None,
                  made: list[int]) -> None:
    while not stop.wait(period):
        with turns.prediction() if turns is not None else contextlib.nullcontext():
            predictor.predict([QUESTION])
        made[0] += 1


def ms_per_step(engine: LLMEngine, predictor: LengthPredictor, *, batch: int, steps: int, period: float | None,
                turns: Turns | None, inline: bool = False) -> tuple[float, int]:
    """Mean decode-step time with ``batch`` sequences, and how many predictions were made meanwhile (by another
    thread, or with ``inline`` by the stepping thread itself before a step, its time counted in the step's)."""
    ids = engine.tokenizer(PROMPT)["input_ids"]
    requests = [engine.add_request(f"{time.monotonic_ns()}-{i}", ids, max_new_tokens=steps + 16)
                for i in range(batch)]
    while any(not r.output_token_ids for r in requests):  # prefill
        engine.step()
    stop, made = threading.Event(), [0]
    thread = None
    if period is not None and not inline:
        thread = threading.Thread(target=predict_every, args=(predictor, period, stop, turns, made), daemon=True)
        thread.start()
    start = last = time.perf_counter()
    for _ in range(steps):
        if inline and time.perf_counter() - last >= period:
            predictor.predict([QUESTION])
            made[0] += 1
            last = time.perf_counter()
        if turns is not None:
            turns.between_steps()
        engine.step()
    elapsed = time.perf_counter() - start
    stop.set()
    if turns is not None:  # a prediction that asked after the last step
        turns.between_steps()
    if thread is not None:
        thread.join()
    for request in requests:
        engine.abort(request.request_id)
    return 1000 * elapsed / steps, made[0]


@click.command()
@click.option("--predictor", "predictor_dir", required=True, help="A trained predictor checkpoint folder.")
@click.option("--batch", type=int, default=16, show_default=True, help="Sequences decoding at once.")
@click.option("--steps", type=click.IntRange(min=1), default=60, show_default=True, help="Decode steps timed per mode.")
@click.option("--period", type=float, default=0.5, show_default=True, help="Seconds between two predictions.")
@click.option("--torch-threads", type=int, default=2, show_default=True)
@click.option("--output", default=None, help="JSON file to write.")
def main(predictor_dir, batch, steps, period, torch_threads, output):
    try:  # a bad output path fails now, not after the measurement
        output = output and output_file(output)
    except OSError as exc:
        raise click.ClickException(str(exc)) from None
    torch.set_num_threads(torch_threads)
    predictor = LengthPredictor.load(predictor_dir)
    engine = LLMEngine(EngineConfig(kv_cache_tokens=batch * 1024, policy=PolicyConfig(policy="paged")))
    predictor.predict([QUESTION] * 4)  # warm up both
    ms_per_step(engine, predictor, batch=batch, steps=4, period=None, turns=None)
    results = []
    modes = (("alone", None, None, False), ("at the same time", period, None, False),
             ("taking turns", period, Turns(), False), ("in the engine thread", period, None, True),
             ("alone again", None, None, False))
    for mode, every, turns, inline in modes:
        ms, made = ms_per_step(engine, predictor, batch=batch, steps=steps, period=every, turns=turns, inline=inline)
        results.append({"mode": mode, "ms_per_step": ms, "predictions": made})
        click.echo(f"{mode:18s} {ms:7.1f} ms per step, {made} predictions")
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 3:
        predictor.predict([QUESTION])
        n += 1
    click.echo(f"one prediction alone: {3000 / n:.1f} ms")
    if output:
        meta = {"batch": batch, "steps": steps, "period_s": period, "torch_threads": torch_threads,
                "prediction_ms": 3000 / n, "predictor": predictor_dir}
        Path(output).write_text(json_text({"config": meta, "results": results}, indent=2))
        click.echo(f"wrote {output}")


if __name__ == "__main__":
    main()
