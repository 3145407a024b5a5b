"""Safe by default: JSON bodies only, no keyless server on the network unless asked for, the key from the
environment, a deadline on request bodies, and client hang-ups that are neither logged as errors nor counted
as 5xx."""

from __future__ import annotations

import logging
import socket
import time

import httpx
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from serve.server.config import ServeConfig, is_loopback
from tests.server.conftest import API_KEY, wait_for
from tests.server.fakes import serve_config, start_server

AUTH = {"Authorization": f"Bearer {API_KEY}"}
BODY = b'{"model": "tiny", "prompt": "hi", "max_tokens": 2}'


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonx"])
def test_a_body_not_declared_json_is_415_and_not_served(server, content_type):
    before = server.stack.engine_loop.snapshot.stats.num_finished
    headers = AUTH | ({"Content-Type": content_type} if content_type else {})
    for path in ("/v1/completions", "/v1/chat/completions"):
        response = httpx.post(f"{server.url}{path}", content=BODY, headers=headers)
        assert response.status_code == 415, response.text
        assert "application/json" in response.json()["error"]["message"]
    assert server.stack.engine_loop.snapshot.stats.num_finished == before


def test_json_with_a_charset_is_served(server):
    response = httpx.post(f"{server.url}/v1/completions", content=BODY,
                          headers=AUTH | {"Content-Type": "Application/JSON; charset=utf-8"})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] <= 2


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_hosts(host):
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "example.com", ""])
def test_a_network_host_without_a_key_refuses_to_start(monkeypatch, host):
    monkeypatch.delenv("S3_API_KEY", raising=False)
    with pytest.raises(ValueError, match="no API key is set.*S3_API_KEY.*--allow-insecure-no-auth"):
        ServeConfig(host=host).check_exposure()
    ServeConfig(host=host, api_key="k").check_exposure()
    ServeConfig(host=host, allow_insecure_no_auth=True).check_exposure()
    monkeypatch.setenv("S3_API_KEY", "from-env")
    ServeConfig(host=host).check_exposure()
    assert ServeConfig(host=host).resolved_api_key() == "from-env"
    assert ServeConfig(host=host, api_key="flag").resolved_api_key() == "flag"


def test_s3_serve_refuses_before_loading_anything(monkeypatch):
    monkeypatch.delenv("S3_API_KEY", raising=False)
    result = CliRunner().invoke(main, ["serve", "--host", "0.0.0.0", "--set", "engine.model=/no/such/model"])
    assert result.exit_code == 2 and "no API key is set" in result.output, result.output


def test_allow_insecure_no_auth_is_a_serve_flag(monkeypatch):
    monkeypatch.delenv("S3_API_KEY", raising=False)
    configs = []
    monkeypatch.setattr("serve.server.launch.serve_main", lambda config, **kwargs: configs.append(config))
    args = ["serve", "--host", "0.0.0.0", "--set", "engine.model=/no/such/model"]
    result = CliRunner().invoke(main, [*args, "--allow-insecure-no-auth"])
    assert result.exit_code == 0, result.output
    assert configs[-1].allow_insecure_no_auth and configs[-1].host == "0.0.0.0"
    configs[-1].check_exposure()  # the flag is what lets a keyless network host start
    result = CliRunner().invoke(main, args)  # without the flag: the YAML's false stands
    assert result.exit_code == 0 and not configs[-1].allow_insecure_no_auth, result.output
    with pytest.raises(ValueError, match="--allow-insecure-no-auth"):
        configs[-1].check_exposure()
    assert "--allow-insecure-no-auth" in CliRunner().invoke(main, ["serve", "--help"]).output


@pytest.fixture(scope="module")
def impatient_server(tmp_path_factory):
    """A request body must arrive within 1 s (30 s by default; the shared fixture's load test needs more)."""
    srv = start_server(serve_config(tmp_path_factory.mktemp("s3-impatient"), policy="paged", body_timeout_s=1.0))
    yield srv
    srv.stop()


def _send_partial_body(srv, *, declared: int, sent: bytes) -> socket.socket:
    sock = socket.create_connection((srv.host, srv.port), timeout=10)
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n")
    sock.sendall(head.encode() + sent)
    return sock


def test_a_body_that_never_arrives_is_408_after_the_timeout(impatient_server):
    start = time.monotonic()
    with _send_partial_body(impatient_server, declared=1000, sent=BODY[:10]) as sock:
        reply = b""
        while chunk := sock.recv(65536):  # until the server closes the connection
            reply += chunk
    reply, elapsed = reply.decode(), time.monotonic() - start
    assert reply.startswith("HTTP/1.1 408"), reply
    assert "did not arrive within 1 s (10 bytes came)" in reply
    assert 0.9 < elapsed < 5, elapsed  # body_timeout_s = 1; the connection closes with the answer


def _errors(srv) -> dict[str, float]:
    text = httpx.get(f"{srv.url}/metrics", headers=AUTH).text
    return {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
            if line.startswith("s3_http_errors_total{")}


def test_a_client_hanging_up_mid_body_is_one_debug_line_and_no_5xx(server, caplog):
    caplog.set_level(logging.DEBUG, logger="serve.server")
    before = _errors(server).get("499", 0)
    for _ in range(3):
        _send_partial_body(server, declared=1000, sent=BODY[:10]).close()
    wait_for(lambda: _errors(server).get("499", 0) == before + 3, what="three hang-ups counted")
    errors = _errors(server)
    assert not any(status.startswith("5") for status in errors), errors
    mine = [r for r in caplog.records if r.name.startswith("serve.server")]
    assert not [r for r in mine if r.levelno >= logging.WARNING], [r.getMessage() for r in mine]
    hangups = [r for r in mine if "hung up" in r.getMessage()]
    assert len(hangups) == 3 and all(r.levelno == logging.DEBUG and not r.exc_info for r in hangups)
