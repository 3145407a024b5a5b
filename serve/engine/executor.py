"""The model as an `Executor` (serve/step.py): the scheduler's plan -> one forward pass -> sampled tokens and stops.

It keeps each request's tokens and sampling parameters itself, from `SchedulerOutput.new_requests` on, so it
never reads the scheduler. Under tensor parallelism rank 0 broadcasts every step's plan and the other ranks run
it in `follow`.
"""

from __future__ import annotations

import dataclasses

import torch

from serve.engine.plan import GREEDY, SamplingParams, SequenceStep
from serve.engine.runner import ModelRunner
from serve.engine.structured import Follower, GrammarCache
from serve.sched_output import SchedulerOutput, StepResult


@dataclasses.dataclass
class _Sequence:
    token_ids: list[int]
    """Prompt, then every generated token."""
    num_prompt_tokens: int
    sampling: SamplingParams
    grammar: Follower | None = None
    """The answer's format, when its sampling asks for one."""
    _prompt_set: tuple[int, ...] | None = None

    @property
    def prompt_set(self) -> tuple[int, ...]:
        """The prompt's distinct tokens (the repetition penalty's), found once."""
        if self._prompt_set is None:
            self._prompt_set = tuple(sorted(set(self.token_ids[: self.num_prompt_tokens])))
        return self._prompt_set

    @property
    def output_token_ids(self) -> tuple[int, ...]:
        return tuple(self.token_ids[self.num_prompt_tokens :])


class ModelExecutor:
    """Runs plans on a ModelRunner; ends a sequence at an EOS token unless its sampling says `ignore_eos`."""

    def __init__(self, runner: ModelRunner, *, eos_token_ids: set[int], tensor_parallel: int = 1,
                 grammars: GrammarCache | None = None) -> None:
        self.runner = runner
        self.eos_token_ids = eos_token_ids
        self.tensor_parallel = tensor_parallel
        self.grammars = grammars
        """Compiled formats, for requests whose sampling asks for structured output (None: none may)."""
        self._seqs: dict[str, _Sequence] = {}

    def execute(self, out: SchedulerOutput) -> StepResult:
        for request_id in out.finished_request_ids:
            self._seqs.pop(request_id, None)
        for new in out.new_requests:
            sampling = new.sampling or GREEDY
            grammar = None
            if sampling.structured is not None:  # LLMEngine.add_request made sure it compiles
                grammar = Follower(self.grammars, sampling.structured, new.output_token_ids)
            self._seqs[new.request_id] = _Sequence(
                [*new.prompt_token_ids, *new.output_token_ids], len(new.prompt_token_ids), sampling, grammar
            )
        plan = [self._step_of(seq) for seq in out.seqs]
        self._broadcast(plan)
        output = self.runner.execute(plan)
        sampled = output.sampled_token_ids
        stopped = set()
        for request_id, token in sampled.items():
            seq = self._seqs[request_id]
            seq.token_ids.append(token)
            if (token in self.eos_token_ids and not seq.sampling.ignore_eos) or token in seq.sampling.stop_token_ids:
                stopped.add(request_id)
            if seq.grammar is not None and (not seq.grammar.accept(token) or seq.grammar.finished):
                stopped.add(request_id)  # the format's end taken (with ignore_eos, nothing else may follow)
        return StepResult(dict(sampled), stopped, output.logprobs, output.prompt_logprobs)

    def _step_of(self, scheduled) -> SequenceStep:
        seq = self._seqs[scheduled.request_id]
        penalised = scheduled.samples and seq.sampling.has_penalties
        start, end = scheduled.start, scheduled.start + scheduled.num_new_tokens
        # Positions start .. end-1 score the prompt token after each, up to the prompt's last token.
        targets = (tuple(seq.token_ids[start + 1 : min(end, seq.num_prompt_tokens - 1) + 1])
                   if seq.sampling.prompt_logprobs is not None else ())
        return SequenceStep(
            request_id=scheduled.request_id,
            token_ids=seq.token_ids[scheduled.start : scheduled.start + scheduled.num_new_tokens],
            num_computed_tokens=scheduled.start,
            block_table=list(scheduled.block_ids),
            sample=scheduled.samples,
            sampling=seq.sampling,
            output_token_ids=seq.output_token_ids if penalised else (),
            prompt_token_ids=seq.prompt_set if penalised and seq.sampling.repetition_penalty != 1.0 else (),
            prompt_targets=targets,
            banned_token_ids=self._banned(seq) if scheduled.samples else (),
            allowed_tokens=seq.grammar.allowed() if scheduled.samples and seq.grammar is not None else None,
        )

    def _banned(self, seq: _Sequence) -> tuple[int, ...]:
        """What ends the sequence, while it is short of its `min_tokens`; and the last token of each bad word whose
        other tokens the answer ends with."""
        sampling, num_output = seq.sampling, len(seq.token_ids) - seq.num_prompt_tokens
        banned: tuple[int, ...] = ()
        if num_output < sampling.min_tokens:
            banned = (() if sampling.ignore_eos else tuple(sorted(self.eos_token_ids))) + sampling.stop_token_ids
        for word in sampling.bad_words:
            if len(word) - 1 <= num_output and tuple(seq.token_ids[len(seq.token_ids) - len(word) + 1:]) == word[:-1]:
                banned += word[-1:]
        return banned

    # -- tensor parallel --------------------------------------------------------------------------------------

    def _broadcast(self, plan: list[SequenceStep] | None) -> None:
        if self.tensor_parallel > 1:
            torch.distributed.broadcast_object_list([plan], src=0)

    def follow(self) -> None:
        """Ranks other than 0: run rank 0's plans until it sends None (see `shutdown`)."""
        while True:
            box = [None]
            torch.distributed.broadcast_object_list(box, src=0)
            if box[0] is None:
                return
            self.runner.execute(box[0])

    def shutdown(self) -> None:
        """Rank 0: release the ranks in `follow`."""
        self._broadcast(None)
