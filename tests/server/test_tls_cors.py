"""HTTPS (`--ssl-certfile` / `--ssl-keyfile`) and browser access (`--allowed-origins`, CORS)."""

from __future__ import annotations

import shutil
import ssl
import subprocess

import httpx
import pytest

from serve.server.config import ServeConfig
from tests.server.conftest import API_KEY
from tests.server.fakes import serve_config, start_server

UI = "https://chat.example.com"
PREFLIGHT = {"Origin": UI, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization,content-type"}
BODY = {"model": "tiny", "prompt": "a", "max_tokens": 2}


def test_browsers_of_an_allowed_origin_may_call_the_api_and_no_other(tmp_path):
    srv = start_server(serve_config(tmp_path, policy="paged", allowed_origins=(UI,)))
    try:
        preflight = httpx.options(f"{srv.url}/v1/completions", headers=PREFLIGHT)  # no key: browsers send none
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == UI
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        stranger = httpx.options(f"{srv.url}/v1/completions", headers=PREFLIGHT | {"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in stranger.headers
        answer = httpx.post(f"{srv.url}/v1/completions", json=BODY,
                            headers={"Origin": UI, "Authorization": f"Bearer {API_KEY}"})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == UI
        refused = httpx.post(f"{srv.url}/v1/completions", json=BODY, headers={"Origin": UI})
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == UI  # readable
    finally:
        srv.stop()


def test_a_server_without_allowed_origins_sends_no_cors_headers(server):
    answer = httpx.post(f"{server.url}/v1/completions", json=BODY,
                        headers={"Origin": UI, "Authorization": f"Bearer {API_KEY}"})
    assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_https_with_a_certificate(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    srv = start_server(serve_config(tmp_path, policy="paged", ssl_certfile=str(cert), ssl_keyfile=str(key)))
    try:
        assert srv.url.startswith("https://")
        trusted = ssl.create_default_context(cafile=str(cert))
        answer = httpx.post(f"{srv.url}/v1/completions", json=BODY, headers={"Authorization": f"Bearer {API_KEY}"},
                            verify=trusted)
        assert answer.status_code == 200 and answer.json()["choices"]
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{srv.url.replace('https', 'http')}/health", timeout=5)  # no plain HTTP on that port
    finally:
        srv.stop()


def test_tls_settings_are_checked_before_a_model_loads(tmp_path):
    with pytest.raises(ValueError, match="both ssl_certfile and ssl_keyfile"):
        ServeConfig(ssl_certfile="cert.pem")
    with pytest.raises(FileNotFoundError, match="ssl_keyfile"):
        (tmp_path / "cert.pem").write_text("x")
        ServeConfig(ssl_certfile=str(tmp_path / "cert.pem"), ssl_keyfile=str(tmp_path / "missing.pem")).check_tls()
    with pytest.raises(ValueError, match="allowed_origins"):
        ServeConfig(allowed_origins=("",))
