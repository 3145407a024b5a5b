"""Small synthetic length data: an instruction word sets the output length, so a tiny model can learn it."""

from __future__ import annotations

import random

# (instruction, low, high): output length drawn uniformly in [low, high] tokens. With
# BucketSpec.uniform(MAX_TOKENS, 5) each style fills exactly one bucket (0, 1 and 3).
MAX_TOKENS = 500
NUM_BUCKETS = 5
STYLES = (
    ("Answer in one word:", 5, 95),
    ("Briefly explain", 105, 195),
    ("Write a detailed essay about", 305, 395),
)
TOPICS = ("rivers", "bread", "volcanoes", "chess", "trains", "bees", "jazz", "glaciers", "coffee", "maps",
          "kites", "clocks", "owls", "tides", "gardens", "robots")


def make_records(num_records: int, *, seed: int = 0) -> list[dict]:
    """Records with the columns of the generate stage; longer prompts also get somewhat longer outputs."""
    rng = random.Random(seed)
    records = []
    for i in range(num_records):
        instruction, low, high = STYLES[i % len(STYLES)]
        topics = rng.sample(TOPICS, k=rng.randint(1, 4))
        prompt = f"{instruction} {' and '.join(topics)} (#{i})"
        records.append({
            "prompt": prompt,
            "source": "synthetic",
            "num_prompt_tokens": len(prompt.split()) + 2 * (i % len(STYLES)),
            "num_output_tokens": rng.randint(low, high),
            "finished": True,
        })
    return records
