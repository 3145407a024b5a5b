"""vLLM's ``priority`` extension: refused unless the server schedules by priority, and handed to the scheduler with
every choice when it does."""

from __future__ import annotations

import openai
import pytest

from tests.server.conftest import client, wait_idle
from tests.server.fakes import serve_config, start_server


@pytest.fixture(scope="module")
def priority_server(tmp_path_factory):
    srv = start_server(serve_config(tmp_path_factory.mktemp("s3-priority"), policy="paged", priority_scheduling=True))
    seen = []
    add_request = srv.stack.engine.add_request

    def recording(request_id, *args, **kwargs):
        seen.append((request_id, kwargs.get("priority", 0)))
        return add_request(request_id, *args, **kwargs)

    srv.stack.engine.add_request = recording
    srv.seen = seen
    yield srv
    srv.stop()


def test_a_priority_is_refused_by_a_server_without_priority_scheduling(server):
    with pytest.raises(openai.BadRequestError) as info:
        client(server).completions.create(model="tiny", prompt="a", max_tokens=2, extra_body={"priority": 1})
    assert info.value.body["param"] == "priority" and "--priority-scheduling" in info.value.body["message"]
    answer = client(server).completions.create(model="tiny", prompt="a", max_tokens=2, extra_body={"priority": 0})
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_every_choice_carries_the_request_priority(priority_server):
    api = client(priority_server)
    api.completions.create(model="tiny", prompt="abc", max_tokens=2, n=2, extra_body={"priority": -3})
    api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                extra_body={"priority": 7})
    api.completions.create(model="tiny", prompt="abc", max_tokens=2)
    wait_idle(priority_server)
    assert [priority for _, priority in priority_server.seen] == [-3, -3, 7, 0]


def test_a_priority_must_be_an_integer(priority_server):
    for value in ("high", 1.5, 2**63):
        with pytest.raises(openai.BadRequestError) as info:
            client(priority_server).completions.create(model="tiny", prompt="a", max_tokens=2,
                                                       extra_body={"priority": value})
        assert info.value.body["param"] == "priority"
