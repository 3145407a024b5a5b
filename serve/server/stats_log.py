"""A periodic line on `s3 serve`'s log with what the engine did since the last one (as vLLM's stats logger): tokens
per second, the queue, KV memory, preemptions, the prefix cache and the length predictor's live accuracy. Read
from the engine loop's snapshot, so it never touches the scheduler; quiet while the server idles."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable

from serve.server.engine_loop import EngineSnapshot

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Mark:
    time: float
    generated: int
    batched: int
    preemptions: int
    prefix_queries: int
    prefix_hits: int


class StatsLogger:
    """Every ``interval_s`` (a thread of its own), one INFO line while requests run or wait, or anything was done
    since the last line. ``outcomes``: the predictor's live score (`serve.outcomes.PredictionOutcomes`), if any."""

    def __init__(self, snapshot: Callable[[], EngineSnapshot], *, interval_s: float, outcomes=None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.snapshot = snapshot
        self.interval_s = interval_s
        self.outcomes = outcomes
        self.clock = clock
        self._last = self._mark(snapshot())
        self._stale_said_at = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stats-log", daemon=True)

    def start(self) -> "StatsLogger":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            text = self.line()
            if text is not None:
                log.info(text)
            stale = self.stale()
            if stale is not None:
                log.warning(stale)

    def stale(self) -> str | None:
        """`PredictionOutcomes.stale`'s warning, said once and again only after twice as many requests scored
        (or after a reload starts the count again), so that a stale predictor does not flood the log."""
        outcomes = self.outcomes
        if outcomes is None:
            return None
        n = outcomes.num_observed
        if n < self._stale_said_at:  # counted again from a reload
            self._stale_said_at = 0
        reason = outcomes.stale()
        if reason is None or (self._stale_said_at and n < 2 * self._stale_said_at):
            return None
        self._stale_said_at = n
        return reason

    def _mark(self, snap: EngineSnapshot) -> _Mark:
        stats = snap.stats
        return _Mark(self.clock(), stats.num_generated_tokens, stats.num_batched_tokens, stats.num_preemptions,
                     stats.num_prefix_query_tokens, stats.num_prefix_hit_tokens)

    def line(self) -> str | None:
        """What happened since the previous call; None when nothing ran, waited or was done."""
        snap = self.snapshot()
        now, last = self._mark(snap), self._last
        self._last = now
        generated, batched = now.generated - last.generated, now.batched - last.batched
        if not (generated or batched or snap.num_running or snap.num_waiting):
            return None
        elapsed = max(now.time - last.time, 1e-9)
        parts = [f"prompt {(batched - generated) / elapsed:.1f} tokens/s", f"generation {generated / elapsed:.1f} "
                 f"tokens/s", f"running {snap.num_running}", f"waiting {snap.num_waiting}",
                 f"KV cache {snap.num_kv_blocks_used / max(1, snap.num_kv_blocks):.1%} used"
                 f" ({snap.num_kv_blocks_held / max(1, snap.num_kv_blocks):.1%} held)",
                 f"preemptions {now.preemptions - last.preemptions}"]
        queries = now.prefix_queries - last.prefix_queries
        if queries:
            parts.append(f"prefix cache hit rate {(now.prefix_hits - last.prefix_hits) / queries:.1%}")
        if self.outcomes is not None and self.outcomes.num_observed:
            n = self.outcomes.num_observed
            parts.append(f"predictor {self.outcomes.num_within_one / n:.0%} within one bucket over {n:,} requests")
        return ", ".join(parts)
