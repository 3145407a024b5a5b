"""The official openai client against a live server: chat and completions, streamed and not, stop strings,
seeds, usage, models, health, metrics and the misprediction feedback."""

from __future__ import annotations

import httpx
import openai
import pytest

from serve.feedback import read_feedback
from tests.server.conftest import API_KEY, client, wait_idle
from serve.server.admission import default_frequency_penalty
from tests.server.fakes import BUCKETS, MAX_NEW_TOKENS, CharTokenizer, FakePredictor, serve_config

GREEDY = {"model": "tiny", "temperature": 0}  # the OpenAI default temperature is 1
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Name three colours."}]


def _chat_prompt_tokens(messages) -> int:
    return len(CharTokenizer().apply_chat_template(messages, add_generation_prompt=True)["input_ids"])


def _stream_text(chunks, *, chat: bool) -> tuple[str, str | None, list]:
    chunks = list(chunks)
    with_choices = [c for c in chunks if c.choices]
    pieces = [(c.choices[0].delta.content if chat else c.choices[0].text) or "" for c in with_choices]
    return "".join(pieces), with_choices[-1].choices[0].finish_reason, chunks


def test_models_health_and_version(server):
    (model,) = client(server).models.list()
    assert model.id == "tiny" and model.max_model_len == server.stack.state.max_model_len  # vLLM's field
    assert client(server).models.retrieve("tiny") == model  # OpenAI's GET /v1/models/{model} (was a 404)
    with pytest.raises(openai.NotFoundError):
        client(server).models.retrieve("other")
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}  # no key needed
    assert httpx.get(f"{server.url}/version").json()["version"]  # no key needed, as vLLM's


def test_answers_carry_a_request_id_header(server):
    """X-Request-Id: the client's own when it sent one (a proxy's trace id), else the answer's id; errors too."""
    c = client(server)
    raw = c.completions.with_raw_response.create(model="tiny", prompt="a", max_tokens=2)
    assert raw.headers["x-request-id"] == raw.parse().id
    traced = c.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "a"}], max_tokens=2, stream=True,
        extra_headers={"X-Request-Id": "trace-42"})
    assert traced.headers["x-request-id"] == "trace-42"
    list(traced.parse())
    refused = httpx.post(f"{server.url}/v1/completions", json={"model": "nope", "prompt": "a"},
                         headers={"Authorization": f"Bearer {API_KEY}", "X-Request-Id": "trace-43"})
    assert refused.status_code == 404 and refused.headers["x-request-id"] == "trace-43"


def test_chat_streamed_and_not_give_the_same_answer(server):
    c = client(server)
    whole = c.chat.completions.create(**GREEDY, messages=CHAT, max_tokens=20)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens == _chat_prompt_tokens(CHAT)
    assert whole.usage.completion_tokens <= 20 and whole.usage.total_tokens == sum(
        [whole.usage.prompt_tokens, whole.usage.completion_tokens])
    stream = c.chat.completions.create(**GREEDY, messages=CHAT, max_tokens=20, stream=True,
                                       stream_options={"include_usage": True})
    text, finish, chunks = _stream_text(stream, chat=True)
    assert (text, finish) == (choice.message.content, choice.finish_reason)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage == whole.usage
    assert len({chunk.id for chunk in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


def test_completion_streamed_and_not_give_the_same_answer(server):
    c = client(server)
    whole = c.completions.create(**GREEDY, prompt="Once upon a time", max_tokens=MAX_NEW_TOKENS)
    text, finish, _ = _stream_text(c.completions.create(**GREEDY, prompt="Once upon a time",
                                                        max_tokens=MAX_NEW_TOKENS, stream=True), chat=False)
    assert (text, finish) == (whole.choices[0].text, whole.choices[0].finish_reason)
    assert whole.usage.prompt_tokens == len("Once upon a time")
    if finish == "length":
        assert whole.usage.completion_tokens == MAX_NEW_TOKENS == len(text)


def test_token_id_prompt_and_default_max_tokens(server):
    ids = CharTokenizer().encode("Once upon a time")
    by_ids = client(server).completions.create(**GREEDY, prompt=ids)
    by_text = client(server).completions.create(**GREEDY, prompt="Once upon a time")
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.completion_tokens <= MAX_NEW_TOKENS  # no max_tokens: the server's cap


def test_stop_string_truncates_before_it(server):
    c = client(server)
    prompt = "The answer is"
    reference = c.completions.create(**GREEDY, prompt=prompt, max_tokens=MAX_NEW_TOKENS).choices[0].text
    assert len(reference) >= 12, reference
    stop = reference[8:10]
    cut = reference.index(stop)
    got = c.completions.create(**GREEDY, prompt=prompt, max_tokens=MAX_NEW_TOKENS, stop=[stop, "never seen"])
    assert (got.choices[0].text, got.choices[0].finish_reason) == (reference[:cut], "stop")
    assert got.usage.completion_tokens == cut + len(stop)  # one character per token
    text, finish, _ = _stream_text(c.completions.create(**GREEDY, prompt=prompt, max_tokens=MAX_NEW_TOKENS,
                                                        stop=stop, stream=True), chat=False)
    assert (text, finish) == (reference[:cut], "stop")


def test_seeded_sampling_is_reproducible(server):
    c = client(server)
    ask = lambda seed: c.completions.create(model="tiny", prompt="Roll the dice", max_tokens=16, temperature=1.0,
                                            top_p=0.95, seed=seed).choices[0].text  # noqa: E731
    assert ask(7) == ask(7)


def test_different_seeds_sample_differently(server):
    c = client(server)
    ask = lambda seed: c.completions.create(model="tiny", prompt="Roll the dice", max_tokens=16, temperature=1.0,
                                            seed=seed).choices[0].text  # noqa: E731
    assert len({ask(s) for s in range(4)}) > 1


def test_frequency_penalty_reaches_the_sampler(server):
    c = client(server)
    ask = lambda penalty: c.completions.create(**GREEDY, prompt="The answer is", max_tokens=MAX_NEW_TOKENS,
                                               frequency_penalty=penalty).choices[0].text  # noqa: E731
    plain, penalised = ask(0.0), ask(2.0)
    assert len(set(plain)) < len(plain)  # greedy repeats characters (one per token) ...
    assert penalised != plain  # ... which the penalty discourages
    state = server.stack.state
    state.default_frequency_penalty = 2.0  # what a predictor trained on penalised labels sets
    try:
        unset = c.completions.create(**GREEDY, prompt="The answer is", max_tokens=MAX_NEW_TOKENS).choices[0].text
    finally:
        state.default_frequency_penalty = 0.0
    assert unset == penalised and ask(0.0) == plain  # the default fills only a left-out field


def test_default_frequency_penalty_follows_the_predictors_labels(tmp_path):
    labelled = FakePredictor()
    labelled.decoding = {"frequency_penalty": 0.5}
    assert default_frequency_penalty(serve_config(tmp_path), labelled) == 0.5
    assert default_frequency_penalty(serve_config(tmp_path, default_frequency_penalty=0.0), labelled) == 0.0
    assert default_frequency_penalty(serve_config(tmp_path), FakePredictor()) == 0.0
    assert default_frequency_penalty(serve_config(tmp_path), None) == 0.0


def test_metrics_show_engine_state_and_latencies(server):
    client(server).chat.completions.create(**GREEDY, messages=CHAT, max_tokens=12)
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    for name in ("s3_num_requests_waiting", "s3_num_requests_running", "s3_kv_blocks_used", "s3_kv_blocks_reserved",
                 "s3_preemptions_total", "s3_mispredictions_total", "s3_generated_tokens_total",
                 "s3_time_to_first_token_seconds_bucket", "s3_time_per_output_token_seconds_bucket",
                 's3_admission_info{checkpoint_id="fake-checkpoint",policy="s3"} 1.0'):
        assert name in text, name
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert values["s3_time_to_first_token_seconds_count"] >= 1 and values["s3_generated_tokens_total"] >= 12
    assert values["s3_batched_sequences_total"] >= 12 and values["s3_engine_steps_total"] >= 12
    assert values["s3_batched_tokens_total"] >= 12 and values["s3_engine_step_seconds_total"] > 0
    assert values["s3_kv_blocks_capacity"] == 128 and "s3_kv_blocks_total" not in values  # _total: counters only
    assert values['s3_request_latency_seconds_bucket{le="7680.0"}'] >= 1  # a CPU server answers in minutes
    assert values["s3_feedback_records_total"] >= 0 and values["s3_feedback_records_lost_total"] == 0


def test_metrics_score_the_predictor_on_the_requests_whose_length_is_a_label(server):
    """`/metrics` counts how each prediction turned out once its request ends of itself or at the predictor's
    largest length; a request its own max_tokens cut says nothing and is not counted."""
    def scored() -> dict[str, float]:
        text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
        rows = [line.split() for line in text.splitlines() if line.startswith("s3_prediction_")]
        return {name: float(value) for name, value in rows}

    before = scored()
    c = client(server)
    whole = c.completions.create(**GREEDY, prompt="score me", max_tokens=MAX_NEW_TOKENS)
    cut = c.completions.create(**GREEDY, prompt="score me too", max_tokens=3)
    after = scored()
    counted = {name: after[name] - before.get(name, 0.0) for name in after}
    n = whole.usage.completion_tokens
    outcome = {0: "exact", 1: "one_under"}.get(BUCKETS.bucket_of(n), "under")  # the fake predicts bucket 0
    expected = 1 + (cut.choices[0].finish_reason == "stop")
    assert sum(v for name, v in counted.items() if name.startswith("s3_prediction_outcomes_total")) == expected
    assert counted[f's3_prediction_outcomes_total{{outcome="{outcome}"}}'] >= 1
    assert counted["s3_prediction_abs_error_tokens_total"] >= abs(n - BUCKETS.midpoint(0))


def test_mispredicted_requests_are_written_as_feedback(server):
    c = client(server)
    for prompt in ("feedback one", "feedback two"):
        c.completions.create(**GREEDY, prompt=prompt, max_tokens=MAX_NEW_TOKENS, stop="\x00never")
    wait_idle(server)
    server.stack.engine_loop.call(lambda engine: None).result(10)  # records are written before this runs
    records = {r["prompt"]: r for r in read_feedback(server.stack.engine_loop.feedback.writer.directory)}
    for prompt in ("feedback one", "feedback two"):
        record = records[prompt]
        assert record["predicted_bucket"] == 0 and record["num_mispredictions"] >= 1
        assert record["true_bucket"] >= 1 and record["checkpoint_id"] == "fake-checkpoint"
        assert record["num_output_tokens"] > 8 or not record["finished"]


def test_chat_uses_the_last_user_message_for_the_predictor(server):
    predictor = server.stack.admission.predictor
    client(server).chat.completions.create(**GREEDY, messages=CHAT, max_tokens=1)
    assert any("Name three colours." in batch for batch in predictor.calls)


@pytest.mark.parametrize("max_tokens", [1, 2])
def test_tiny_answers(server, max_tokens):
    got = client(server).completions.create(**GREEDY, prompt="x", max_tokens=max_tokens)
    assert got.usage.completion_tokens <= max_tokens
