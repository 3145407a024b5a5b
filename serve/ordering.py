"""The order in which a waiting queue is tried: shortest predicted remaining work first within a look-ahead
window, with aging so that no request waits past a bound (a fixed `aging_s`, or one that follows the queue: the
time the recent finish rate needs to admit everyone waiting)."""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterable, Iterator, Sequence

from core.request import Request
from serve.estimate import RemainingEstimator
from serve.policy_config import PolicyConfig


class FinishRate:
    """Requests finished per second over the last ``window`` finishes (None until ``min_finished``)."""

    def __init__(self, window: int = 64, min_finished: int = 8) -> None:
        self.times: collections.deque[float] = collections.deque(maxlen=window)
        self.min_finished = min_finished

    def observe(self, finish_time: float) -> None:
        self.times.append(finish_time)

    def per_s(self) -> float | None:
        if len(self.times) < self.min_finished:
            return None
        span = self.times[-1] - self.times[0]
        return (len(self.times) - 1) / span if span > 0 else float("inf")


def aged_first(waiting: Sequence[Request], now: float, bound: float, lookahead: int, key: Callable[[int], Any],
               prepare: Callable[[Sequence[Request]], None] | None = None) -> Iterator[int]:
    """Indices of ``waiting`` (in arrival order) to try: those that have waited ``bound`` seconds or more first,
    in arrival order (a prefix; yielded lazily, as admission usually stops long before the end of a long aged
    prefix), then the next ``lookahead`` by ``key`` ascending (``prepare`` is handed those requests first)."""
    num_aged = 0
    while num_aged < len(waiting) and now - waiting[num_aged].arrival_time >= bound:
        yield num_aged
        num_aged += 1
    window = range(num_aged, min(len(waiting), num_aged + lookahead))
    if prepare is not None:
        prepare(waiting[window.start:window.stop])
    yield from sorted(window, key=key)


class ShortestWorkFirst:
    """Policy mixin: shortest predicted remaining work first within a look-ahead window; aged requests first, in
    arrival order. Work is the steps a request still needs: its prompt at the prefill rate plus its mean
    remaining output."""

    config: PolicyConfig
    estimator: RemainingEstimator
    prefill_rate: int = 1
    finish_rate: FinishRate | None = None

    def work(self, request: Request) -> float:
        prefill = request.num_tokens / self.prefill_rate
        return prefill + self.estimator.estimate(request).mean_tokens

    def aging_bound(self, num_waiting: int) -> float:
        """How long a request may wait before nobody can overtake it: `aging_s`, or with `aging_queue_factor`
        k, k times the time the recent finish rate needs to admit ``num_waiting`` requests."""
        rate = None if self.finish_rate is None else self.finish_rate.per_s()
        if not self.config.aging_queue_factor or rate is None:
            return self.config.aging_s
        return self.config.aging_queue_factor * num_waiting / rate

    def observe_finished(self, request: Request) -> None:
        super().observe_finished(request)  # type: ignore[misc]
        # a request that never ran (aborted in the queue) says nothing of how fast the server admits: a burst of
        # them would make the rate infinite and the bound 0
        ran = request.first_scheduled_time is not None
        if self.config.aging_queue_factor and request.finish_time is not None and ran:
            self.finish_rate = self.finish_rate or FinishRate()
            self.finish_rate.observe(request.finish_time)

    def candidates(self, waiting: Sequence[Request], now: float) -> Iterable[int]:
        if self.config.resume_first:  # False sorts first: answers already streaming lead the window
            key = lambda i: (waiting[i].num_output_tokens == 0, self.work(waiting[i]))
        else:
            key = lambda i: self.work(waiting[i])
        return aged_first(waiting, now, self.aging_bound(len(waiting)), self.config.lookahead, key=key,
                          prepare=self.estimator.prepare)  # the window's estimates at once (a burst's are new)
