"""Structured outputs: answers held to a JSON schema, any JSON object, a regular expression, one of a list of
strings, or an EBNF grammar, by masking at every step the tokens that cannot continue a valid answer.

The grammars are compiled and matched by xgrammar (what vLLM and SGLang use), against the served tokenizer's
vocabulary; `GrammarCache` compiles each distinct request format once. A request's `GrammarMatcher` follows its
answer token by token in the executor (serve/engine/executor.py), which hands the runner each step's allowed-token
bitmask (`SequenceStep.allowed_tokens`). xgrammar is imported on first use, so the engine runs without it until a
request asks for a format.
"""

from __future__ import annotations

import collections
import json
import re
import threading
from typing import Any, Sequence

from serve.engine.plan import StructuredOutput


class StructuredOutputError(ValueError):
    """A format the grammar compiler refuses (a bad schema, regex or grammar), or xgrammar missing."""


def _xgrammar():
    try:
        import xgrammar
    except ImportError as exc:  # installed by `make setup` (Makefile); optional for the engine itself
        raise StructuredOutputError(f"structured outputs need the xgrammar package ({exc}); install "
                                    "xgrammar==0.2.8 apache-tvm-ffi (pip --no-deps: its triton is for GPU kernels "
                                    "this project does not use)") from None
    return xgrammar


class GrammarCache:
    """Compiled grammars of one tokenizer, the most recent ``size`` kept; safe to share between threads (the
    server compiles a request's format on arrival to refuse a bad one with a 400, the engine finds it compiled)."""

    def __init__(self, tokenizer: Any, *, vocab_size: int, stop_token_ids: Sequence[int], size: int = 128) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.size = size
        self._compiled: collections.OrderedDict[StructuredOutput, Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._compiler = None

    def compile(self, fmt: StructuredOutput) -> Any:
        """The compiled grammar of ``fmt``; raises StructuredOutputError with the compiler's reason."""
        with self._lock:
            if fmt in self._compiled:
                self._compiled.move_to_end(fmt)
                return self._compiled[fmt]
            compiled = self._compile(fmt)
            self._compiled[fmt] = compiled
            if len(self._compiled) > self.size:
                self._compiled.popitem(last=False)
            return compiled

    def matcher(self, fmt: StructuredOutput) -> Any:
        """A fresh matcher of ``fmt``, at the start of an answer."""
        return _xgrammar().GrammarMatcher(self.compile(fmt))

    def _compile(self, fmt: StructuredOutput) -> Any:
        compiler = self._grammar_compiler()
        try:
            if fmt.kind == "json":
                return compiler.compile_json_schema(fmt.spec, any_whitespace=False)
            if fmt.kind == "json_object":  # an object, as OpenAI's JSON mode (xgrammar's built-in JSON takes arrays)
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if fmt.kind == "regex":
                return compiler.compile_regex(fmt.spec)
            if fmt.kind == "choice":
                return compiler.compile_regex("|".join(re.escape(c) for c in json.loads(fmt.spec)))
            return compiler.compile_grammar(fmt.spec)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise StructuredOutputError(f"the {fmt.kind} format does not compile: {exc}") from None

    def _grammar_compiler(self) -> Any:
        if self._compiler is None:
            xgr = _xgrammar()
            from transformers import PreTrainedTokenizerBase

            if isinstance(self.tokenizer, PreTrainedTokenizerBase):
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_token_ids)
            else:  # any tokenizer with decode(): each token's text taken as it is
                vocab = [self.tokenizer.decode([i]) for i in range(self.vocab_size)]
                info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, vocab_size=self.vocab_size,
                                         stop_token_ids=self.stop_token_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        return self._compiler


class Follower:
    """One answer's grammar state: the tokens it may take next, and each token it took."""

    def __init__(self, cache: GrammarCache, fmt: StructuredOutput, output_token_ids: Sequence[int] = ()) -> None:
        self.matcher = cache.matcher(fmt)
        self._xgr = _xgrammar()
        self._bitmask = self._xgr.allocate_token_bitmask(1, cache.vocab_size)
        for token in output_token_ids:  # a recompute after preemption: the answer so far again
            self.accept(token)

    def allowed(self) -> Any:
        """The bitmask of the tokens that may come next ((1, ceil(V / 32)) int32 words, a copy)."""
        self.matcher.fill_next_token_bitmask(self._bitmask)
        return self._bitmask.clone()

    def accept(self, token: int) -> bool:
        """Take the next token; False when the format does not allow it (the sampler had no allowed token left to
        draw: nothing should bring that about, and the executor then ends the answer rather than the engine)."""
        return self.matcher.accept_token(token)

    @property
    def finished(self) -> bool:
        """The format is complete and its end (a stop token) taken: nothing more may come."""
        return self.matcher.is_terminated()
