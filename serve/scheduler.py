"""The iteration-level scheduler: every step, which sequences run and how much KV memory each one holds.

One engine step is three calls (the engine and the simulator are two executors of the same loop)::

    out = scheduler.schedule()            # plan: which tokens of which sequences to compute
    res = executor.execute(out)           # run the model (or the cost model) -> one sampled token per seq
    done = scheduler.update_from_output(out, res)

CPU bookkeeping only: no torch, and time comes from an injected clock.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import time
from typing import Callable, Iterable, Sequence

from core.buckets import BucketSpec
from core.request import MispredictionEvent, Request, RequestStatus, TokenLogprobs
from serve import prefix
from serve.kv import BlockPool, blocks_for
from serve.peak import StepGate
from serve.policies import StepLimits, VictimFn, make_policy
from serve.sched_output import (
    NewRequestData, ScheduledSeq, SchedulerOutput, SchedulerSnapshot, SchedulerStats, StepResult,
)  # fmt: skip
from serve.scheduler_config import SchedulerConfig


class Scheduler:
    """Decides, every step, which requests run and how many KV blocks each one holds."""

    def __init__(
        self,
        config: SchedulerConfig,
        *,
        buckets: BucketSpec | None = None,
        clock: Callable[[], float] = time.monotonic,
        victim_fn: VictimFn | None = None,
    ) -> None:
        self.config = config
        self.policy = make_policy(config.policy, buckets, prefill_rate=self._prefill_rate(config))
        self.choose_victim: VictimFn = victim_fn or self.policy.choose_victim
        self.pool = BlockPool(config.num_blocks, config.block_size, prefix_caching=config.enable_prefix_caching)
        self.clock = clock
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []  # in arrival order (preempted requests go back to their place)
        self.running: list[Request] = []  # decoding ones first, then prefilling ones, each in admission order
        self.stats = SchedulerStats()
        self._watermark_blocks = int(self.policy.watermark * config.num_blocks)
        self._limits = StepLimits(
            capacity_tokens=self.pool.capacity_tokens,
            block_size=config.block_size,
            prefill_rate=self._prefill_rate(config),
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
            shared_blocks=functools.partial(prefix.shared_blocks, self.pool) if self.pool.prefix_caching else None,
        )
        self._order: dict[str, tuple[float, int]] = {}
        self._finished_ids: list[str] = []
        self._num_admissions = 0

    @staticmethod
    def _prefill_rate(config: SchedulerConfig) -> int:
        cap = config.long_prefill_token_threshold
        return min(cap, config.max_num_batched_tokens) if cap else config.max_num_batched_tokens

    # -- requests in and out ---------------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request. Raises ValueError when it can never fit (its worst case exceeds the whole pool)."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        worst_case = request.num_prompt_tokens + request.max_new_tokens
        if blocks_for(request.num_prompt_tokens + 1, self.pool.block_size) > self.pool.num_blocks:
            raise ValueError(f"request {request.request_id!r}'s prompt ({request.num_prompt_tokens} tokens, and one to "
                             f"generate) does not fit the KV pool ({self.pool.capacity_tokens} tokens): shorten the "
                             "prompt or give the KV cache more memory")
        if blocks_for(worst_case, self.pool.block_size) > self.pool.num_blocks:
            raise ValueError(
                f"request {request.request_id!r} needs up to {worst_case} tokens of KV cache but the pool holds "
                f"{self.pool.capacity_tokens}; lower max_new_tokens or give the KV cache more memory"
            )
        request.status = RequestStatus.WAITING
        if request.cache_salt and self.pool.prefix_caching:
            self.pool.salt(request.request_id, request.cache_salt)
        request.reserved_output_tokens, request.reserved_bucket = self.policy.initial_reservation(request)
        self.requests[request.request_id] = request
        self._order[request.request_id] = (request.arrival_time, len(self._order))
        self._enqueue(request)

    def abort(self, request_id: str, *, stopped: bool = False) -> Request | None:
        """End a request now and free all its blocks; None if it is unknown or already ended.

        ``stopped``: the caller found a stop string in the output, so the request ends as stopped (its
        answer is complete), not aborted (client gone)."""
        request = self.requests.get(request_id)
        if request is None or request.is_finished:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        if stopped:
            self._finish(request, RequestStatus.FINISHED_STOPPED)
            self.stats.num_finished += 1
        else:
            self._finish(request, RequestStatus.ABORTED)
            self.stats.num_aborted += 1
        return request

    def forget(self, request_id: str) -> None:
        """Drop an ended request from ``self.requests`` (a long-running server must; tests and the simulator
        read ended requests back). Live requests are kept."""
        request = self.requests.get(request_id)
        if request is not None and request.is_finished:
            del self.requests[request_id]
            del self._order[request_id]

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def snapshot(self) -> SchedulerSnapshot:
        block_size = self.pool.block_size
        return SchedulerSnapshot(
            num_waiting=len(self.waiting),
            num_running=len(self.running),
            num_kv_blocks=self.pool.num_blocks,
            num_kv_blocks_held=self.pool.num_used_blocks,
            num_kv_blocks_used=min(self.pool.num_used_blocks,  # shared prefix blocks are counted once held
                                   sum(blocks_for(r.num_computed_tokens, block_size) for r in self.running)),
            stats=dataclasses.replace(self.stats),
        )

    # -- one step ----------------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Plan one step: keep the running sequences going, then admit waiting ones into what is left."""
        now = self.clock()
        self.policy.begin_step()
        out = SchedulerOutput(time=now, finished_request_ids=self._finished_ids)
        self._finished_ids = []
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        # Memory was short this step: admitting now would only thrash (vLLM does the same).
        if not out.preempted_request_ids and not out.waited_request_ids:
            self._schedule_waiting(out, budget, now)
        return out

    def update_from_output(self, out: SchedulerOutput, result: StepResult) -> list[Request]:
        """Advance every scheduled sequence by its computed tokens; return the requests that finished."""
        now = self.clock()
        self.stats.num_steps += 1
        self.stats.num_batched_seqs += len(out.seqs)
        self.stats.num_batched_tokens += out.num_batched_tokens
        self.stats.step_time_s += now - out.time
        finished = []
        block_size = self.pool.block_size
        for seq in out.seqs:
            request = self.requests.get(seq.request_id)
            if request is None or request.is_finished:  # aborted (and maybe forgotten) while the step ran
                continue
            request.num_computed_tokens += seq.num_new_tokens
            if self.pool.prefix_caching and request.num_computed_tokens // block_size > seq.start // block_size:
                self.pool.cache_full_blocks(request.request_id, request.all_token_ids(), request.num_computed_tokens)
            if seq.request_id in result.prompt_logprobs:
                _keep_prompt_logprobs(request, *result.prompt_logprobs[seq.request_id])
            if not seq.samples:
                continue
            request.output_token_ids.append(result.sampled_token_ids[seq.request_id])
            if seq.request_id in result.logprobs:
                request.output_logprobs.append(result.logprobs[seq.request_id])
            self.stats.num_generated_tokens += 1
            if request.first_token_time is None:
                request.first_token_time = now
            else:
                request.longest_stall_s = max(request.longest_stall_s, now - request.last_token_time)
            request.last_token_time = now
            if seq.request_id in result.stopped_request_ids:
                status = RequestStatus.FINISHED_STOPPED
            elif request.num_output_tokens >= request.max_new_tokens:
                status = RequestStatus.FINISHED_LENGTH
            else:
                continue
            self.running.remove(request)
            self._finish(request, status)
            self.stats.num_finished += 1
            finished.append(request)
        return finished

    # -- internals -------------------------------------------------------------------------------------------

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        """Give each running sequence its next tokens, growing or preempting on memory; returns the budget left."""
        reserves, tracks_buckets = self.policy.reserves, self.policy.tracks_buckets
        # Decodes first (stable): a sequence still prefilling never takes a decoding one's token from the step's
        # budget, so a long prompt cannot stall running streams, and the peak test's finish times hold. Victims are
        # the policy's choice among everyone running (the least urgent class first), whatever their place here.
        self.running.sort(key=lambda r: (r.num_tokens - r.num_computed_tokens > 1, r.priority))
        limit = budget + out.num_batched_tokens  # a victim scheduled earlier in the step gives its tokens back
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if reserves and request.num_output_tokens >= request.reserved_output_tokens:
                ok, at = self._grow_reservation(request, i, out)
                if at < i:
                    budget = limit - out.num_batched_tokens
                i = at
                if not ok:
                    continue  # it was preempted; running[i] is now the next sequence
            elif tracks_buckets and request.reserved_bucket is not None:
                self._note_bucket_overrun(request)
            num_new = self._num_new_tokens(request, budget)
            if not reserves and self._waits(request, request.num_computed_tokens + num_new):
                out.waited_request_ids.append(request.request_id)
                i += 1
                continue
            if not reserves:
                ok, at = self._allocate(request, request.num_computed_tokens + num_new, i, out)
                if at < i:  # victims scheduled earlier in the step gave their tokens back
                    budget = limit - out.num_batched_tokens
                i = at
                if not ok:
                    continue
            request.num_waited_steps = 0
            out.seqs.append(self._scheduled(request, num_new))
            budget -= num_new
            i += 1
        if out.waited_request_ids and not out.seqs:
            # Nobody could run: waiting would stall the whole server, so victims are taken as usual.
            for request_id in out.waited_request_ids:
                self.requests[request_id].num_waited_steps = self.policy.config.wait_steps
            out.waited_request_ids.clear()
            return self._schedule_running(out, budget)
        return budget

    def _grow_reservation(self, request: Request, index: int, out: SchedulerOutput) -> tuple[bool, int]:
        """The misprediction path: reach the reservation -> grow to the next bucket, or preempt -> event.
        Returns `_allocate`'s answer."""
        self.stats.num_mispredictions += 1
        event = MispredictionEvent(
            request_id=request.request_id,
            prompt=request.prompt,
            predicted_bucket=request.reserved_bucket if request.reserved_bucket is not None else -1,
            reserved_output_tokens=request.reserved_output_tokens,
            num_output_tokens=request.num_output_tokens,
            probs=request.prediction.probs if request.prediction else None,
        )
        request.mispredictions.append(event)
        request.reserved_output_tokens, request.reserved_bucket = self.policy.grown_reservation(request)
        total = request.num_prompt_tokens + request.reserved_output_tokens
        ok, index = self._allocate(request, total, index, out)
        event.preempted = not ok
        return ok, index

    def _note_bucket_overrun(self, request: Request) -> None:
        """Paged policies with a predictor reserve nothing, but a request that passes its predicted bucket's
        upper edge is still a misprediction: note the event (training data) and move on to the next bucket."""
        buckets = self.policy.buckets
        bucket = request.reserved_bucket
        while bucket < buckets.num_buckets - 1 and request.num_output_tokens >= buckets.upper_edge(bucket):
            self.stats.num_mispredictions += 1
            request.mispredictions.append(MispredictionEvent(
                request_id=request.request_id,
                prompt=request.prompt,
                predicted_bucket=bucket,
                reserved_output_tokens=buckets.upper_edge(bucket),
                num_output_tokens=request.num_output_tokens,
                probs=request.prediction.probs if request.prediction else None,
            ))
            bucket += 1
        request.reserved_bucket = bucket

    def _waits(self, request: Request, num_tokens: int) -> bool:
        """True when ``request`` should sit this step out rather than take a victim's memory: its next block is
        not free, and the policy expects a running sequence to finish and free blocks before long."""
        if self.pool.num_new_blocks(request.request_id, num_tokens) <= self.pool.num_free_blocks:
            return False
        if not self.policy.may_wait(request, self.running):
            return False
        request.num_waited_steps += 1
        return True

    def _allocate(self, request: Request, num_tokens: int, index: int, out: SchedulerOutput) -> tuple[bool, int]:
        """Make ``request``'s (``running[index]``) table cover ``num_tokens``, preempting the policy's victims
        among every running sequence: one already scheduled (or sat out) this step is taken back out of the step,
        its tokens returned to the budget, as vLLM does. Returns whether ``request`` is still running, and its
        index in ``running`` now (where the next sequence is, when it was preempted)."""
        while self.pool.allocate(request.request_id, num_tokens) is None:
            victim = self._victim(self.running, request)
            if self.running.index(victim) < index:
                index -= 1
                _unschedule(out, victim.request_id)
            self._preempt(victim, out)
            if victim is request:
                return False, index
        return True, index

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        """Free the sequence's blocks and requeue it; its generated tokens are kept and recomputed later."""
        self.pool.free(request.request_id)
        self.running.remove(request)
        self.stats.num_preemptions += 1
        request.num_preempted_tokens = request.num_computed_tokens  # recomputed from re-admission on (`_admit`)
        request.num_computed_tokens = request.num_waited_steps = 0
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        self._enqueue(request)
        out.preempted_request_ids.append(request.request_id)

    def _schedule_waiting(self, out: SchedulerOutput, budget: int, now: float) -> None:
        """Admit waiting requests in the policy's order while memory, batch size and token budget allow."""
        if not self._has_room(budget):
            return  # not even the order is worth computing
        admitted: list[int] = []
        num_waiting, computing = len(self.waiting), None
        gate = StepGate(lambda: self.policy.admission_gate(self.running, self._limits, num_waiting))
        for index in self._candidates(now):
            if not self._has_room(budget):
                break
            request = self.waiting[index]
            keys = prefix.lookup_keys(self.pool, request)
            cached = None if keys is None else self.pool.cached_blocks(keys)
            if keys is not None:
                computing = prefix.keys_in_progress(self.pool, self.running) if computing is None else computing
                if len(keys) > len(cached) and keys[len(cached)] in computing:
                    continue  # a running sequence is computing its next block: wait, and find it cached
            request.num_computed_tokens = len(cached or ()) * self.pool.block_size
            num_new = self._num_new_tokens(request, budget)
            if not self._admit(request, num_new, gate, cached):
                request.num_computed_tokens = 0
                if self.policy.must_stop(request, now):
                    break
                continue
            admitted.append(index)
            if self.policy.tracks_buckets and request.reserved_bucket is not None:
                self._note_bucket_overrun(request)  # resumed past its bucket: its next token would go unnoted
            if keys is not None:
                computing.update(keys[len(cached):])
            out.seqs.append(self._scheduled(request, num_new))
            out.new_requests.append(NewRequestData(
                request.request_id, request.prompt_token_ids, tuple(request.output_token_ids), request.sampling,
            ))
            budget -= num_new
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
        if admitted:
            taken, end = set(admitted), max(admitted) + 1
            self.waiting[:end] = [r for i, r in enumerate(self.waiting[:end]) if i not in taken]

    def _has_room(self, budget: int) -> bool:
        """Whether one more sequence may join this step: a seat free and tokens left in the step's budget."""
        return budget > 0 and len(self.running) < self.config.max_num_seqs

    def _candidates(self, now: float) -> Iterable[int]:
        """Indices of waiting requests to try, in the policy's order; with priorities, the most urgent class first,
        each class in the policy's order (its aging and look-ahead apply within the class)."""
        if not any(r.priority for r in self.waiting):
            return self.policy.candidates(self.waiting, now)
        classes: dict[int, list[int]] = {}
        for i, request in enumerate(self.waiting):  # each class keeps arrival order
            classes.setdefault(request.priority, []).append(i)
        return (indices[j] for _, indices in sorted(classes.items())
                for j in self.policy.candidates([self.waiting[i] for i in indices], now))

    def _victim(self, candidates: Sequence[Request], needy: Request) -> Request:
        """The policy's victim among the least urgent of ``candidates`` (``needy`` among them): a sequence yields
        only to one at least as urgent."""
        worst = max(r.priority for r in candidates)
        least = [r for r in candidates if r.priority == worst]
        return self.choose_victim(least, needy if needy.priority == worst else least[-1])

    def _admit(self, request: Request, num_new: int, gate: StepGate, cached: list[int] | None) -> bool:
        """Take the request's blocks (its whole reservation, or its first chunk when paged) after the ``cached``
        ones it starts on; False if short or when the policy's projected peak would not fit."""
        shared = cached or []
        end = request.num_computed_tokens + num_new
        if self.policy.reserves:
            end = request.num_prompt_tokens + request.reserved_output_tokens
            assert end >= request.num_tokens
        needed = blocks_for(end, self.pool.block_size) - len(shared) + self.pool.num_reclaimed(shared)
        # The watermark keeps room for running sequences to grow; with none running it would only starve a
        # request that fits the pool but not the pool less the watermark.
        watermark = self._watermark_blocks if self.running and not self.policy.reserves else 0
        if needed + watermark > self.pool.num_free_blocks or not gate.fits(request):
            return False
        if cached is not None:  # counted as vLLM counts: the tokens each admission looked up, and found
            self.stats.num_prefix_query_tokens += request.num_tokens - 1
            self.stats.num_prefix_hit_tokens += request.num_computed_tokens
        if shared:
            self.pool.share(request.request_id, shared)
            if request.num_output_tokens == 0 and request.num_preemptions == 0:
                request.num_cached_tokens = request.num_computed_tokens
        self.pool.allocate(request.request_id, end)
        if request.num_preempted_tokens:  # what it lost, less what the prefix cache kept of it
            redo = max(0, request.num_preempted_tokens - request.num_computed_tokens)
            self.stats.num_recomputed_tokens += redo
            request.num_recomputed_tokens += redo
            request.num_preempted_tokens = 0
        request.status = RequestStatus.RUNNING  # before the gate counts it: it holds its share of its blocks
        request.admission_index, self._num_admissions = self._num_admissions, self._num_admissions + 1
        gate.add(request)
        self.running.append(request)
        return True

    def _num_new_tokens(self, request: Request, budget: int) -> int:
        """Tokens to compute for ``request`` this step: what is left, within the budget and the prefill cap."""
        num_new = min(request.num_tokens - request.num_computed_tokens, budget)
        cap = self.config.long_prefill_token_threshold
        return min(num_new, cap) if cap else num_new

    def _scheduled(self, request: Request, num_new: int) -> ScheduledSeq:
        start = request.num_computed_tokens
        return ScheduledSeq(
            request_id=request.request_id,
            start=start,
            num_new_tokens=num_new,
            block_ids=self.pool.block_table(request.request_id),
            samples=start + num_new == request.num_tokens,
        )

    def _enqueue(self, request: Request) -> None:
        bisect.insort(self.waiting, request, key=lambda r: self._order[r.request_id])

    def _finish(self, request: Request, status: RequestStatus) -> None:
        self.pool.free(request.request_id)
        self.pool.forget(request.request_id)
        request.status = status
        request.finish_time = self.clock()
        final = request.num_output_tokens if status != RequestStatus.ABORTED else None
        for event in request.mispredictions:
            event.final_output_tokens, event.finish_reason = final, request.finish_reason
        self._finished_ids.append(request.request_id)
        self.policy.observe_finished(request)

    def check_invariants(self) -> None:
        """Internal consistency, for tests: the pool is whole and every live request is in one queue."""
        self.pool.check()
        assert len(set(map(id, self.waiting)) & set(map(id, self.running))) == 0
        assert all(not r.is_finished for r in self.waiting + self.running)
        assert len(self.running) <= self.config.max_num_seqs
        if self.policy.reserves:
            for r in self.running:
                held = self.pool.num_blocks_held(r.request_id)
                assert held == blocks_for(r.num_prompt_tokens + r.reserved_output_tokens, self.pool.block_size)
        if not self.has_unfinished():
            assert self.pool.num_free_blocks == self.pool.num_blocks, "blocks leaked after all requests ended"


def _unschedule(out: SchedulerOutput, request_id: str) -> None:
    """Take a sequence that becomes a victim back out of the step it was scheduled (or sat out) in."""
    out.seqs = [seq for seq in out.seqs if seq.request_id != request_id]
    if request_id in out.waited_request_ids:
        out.waited_request_ids.remove(request_id)


def _keep_prompt_logprobs(request: Request, first: int, found: list[TokenLogprobs]) -> None:
    """Add the prompt log-probabilities of positions ``first``.. that ``request`` does not have yet (a recompute
    after a preemption scores its prompt again)."""
    have = len(request.prompt_logprobs)  # positions 1 .. have
    assert first - 1 <= have, f"{request.request_id}: prompt log-probabilities from position {first} after {have}"
    request.prompt_logprobs += found[have - (first - 1):]
