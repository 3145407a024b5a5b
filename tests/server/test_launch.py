"""Starting a server: the shipped config, which policy runs with or without a predictor, a real predictor
checkpoint in the admission path, and `serve_main` as a process that shuts down cleanly on SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from pipeline.cli import load_predictor_checkpoint
from pipeline.config import load_config
from serve.server.admission import ServeSetupError, TablePredictor, check_target_model, resolve_admission
from serve.server.config import ServeConfig
from serve.server.launch import _uvicorn_config, served_model_name
from tests.engine.engine_driver import tiny_llama
from tests.server.conftest import API_KEY, client, wait_idle
from tests.server.fakes import BUCKETS, FakePredictor, serve_config, start_server

ROOT = Path(__file__).parents[2]


def test_the_shipped_config_loads_and_flags_override_it():
    config = load_config(ServeConfig, ROOT / "configs/serve_cpu.yaml", ["engine.kv_cache_tokens=4096"],
                         values={"engine.policy.policy": "paged", "port": 9000})
    assert (config.policy, config.port, config.engine.kv_cache_tokens) == ("paged", 9000, 4096)
    assert config.host == "127.0.0.1" and config.predictor == "runs/predictor"
    with pytest.raises(ValueError, match="fallback_policy"):
        load_config(ServeConfig, values={"fallback_policy": "s3"})


def test_idle_connections_stay_open_longer_than_pooling_clients_keep_them():
    # httpx (and the OpenAI SDK over it) drops an idle pooled connection after 5 s; a server that closes it at the
    # same moment races the client's next request on it (a ReadError, the request lost).
    config = load_config(ServeConfig, ROOT / "configs/serve_cpu.yaml")
    assert config.keep_alive_s == ServeConfig.keep_alive_s > httpx.Limits().keepalive_expiry
    assert _uvicorn_config(FastAPI(), "127.0.0.1", 0, "warning", config.keep_alive_s).timeout_keep_alive == 75
    with pytest.raises(ValueError, match="keep_alive_s"):
        load_config(ServeConfig, values={"keep_alive_s": 0})


def test_s3_without_a_predictor_refuses_to_start_and_says_what_to_do(tmp_path):
    with pytest.raises(ServeSetupError, match="--predictor FOLDER.*--fallback-policy max\\|paged"):
        resolve_admission(ServeConfig())
    with pytest.raises(ServeSetupError, match="no predictor.json"):
        resolve_admission(ServeConfig(predictor=str(tmp_path)), load_checkpoint=load_predictor_checkpoint)


def test_fallback_and_predictor_free_policies(tmp_path):
    fallback = resolve_admission(ServeConfig(predictor=str(tmp_path), fallback_policy="paged"),
                                 load_checkpoint=load_predictor_checkpoint)
    assert fallback.policy.policy == "paged" and fallback.predictor is None and "no predictor.json" in fallback.note
    plain = resolve_admission(load_config(ServeConfig, values={"engine.policy.policy": "max"}))
    assert plain.policy.policy == "max" and plain.predictor is None and plain.note is None


def test_oracle_table_predicts_the_true_bucket(tmp_path):
    path = tmp_path / "lengths.json"
    path.write_text(json.dumps({"short": 3, "long": 400}))
    admission = resolve_admission(ServeConfig(oracle_lengths=str(path), max_new_tokens=512))
    assert isinstance(admission.predictor, TablePredictor)
    short, long, unknown = admission.predictor.predict(["short", "long", "never seen"])
    assert (short.bucket, short.num_tokens, long.bucket, unknown.bucket) == (0, 3, 7, 9)


def test_a_predictor_for_another_model_is_refused():
    predictor = FakePredictor()
    predictor.target_model = "some/other-llm"
    with pytest.raises(ServeSetupError, match="learned the output lengths of 'some/other-llm'"):
        check_target_model(predictor, "tiny-llama")


def test_served_model_name():
    assert served_model_name(ServeConfig()) == "smollm2"
    assert served_model_name(load_config(ServeConfig, values={"engine.model": "/models/My-Model.gguf"})) == "My-Model"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real predictor checkpoint (tiny random DistilBERT + the MiniLM tokenizer), as `s3 train` writes it."""
    from predictor_train.backbone import tiny_backbone
    from predictor_train.checkpoint import CheckpointInfo, save_checkpoint

    folder = tmp_path_factory.mktemp("predictor")
    backbone = tiny_backbone(num_labels=BUCKETS.num_buckets)
    info = CheckpointInfo(checkpoint_id="", buckets=BUCKETS, bucket_scheme="uniform", target_model="tiny-llama",
                          decoding={}, train_config={"max_prompt_tokens": 32}, backbone_kind=backbone.kind)
    return folder, save_checkpoint(folder, backbone.model, backbone.tokenizer, info)


def test_a_trained_checkpoint_serves_in_the_admission_path(tmp_path, checkpoint):
    folder, info = checkpoint
    srv = start_server(serve_config(tmp_path, predictor=str(folder)))
    try:
        answer = client(srv).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                    max_tokens=5, temperature=0)
        assert answer.usage.completion_tokens <= 5
        metrics = httpx.get(f"{srv.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
        assert f'checkpoint_id="{info.checkpoint_id}",policy="s3"' in metrics
        assert "s3_predictor_batch_size_count 1.0" in metrics
        wait_idle(srv)
    finally:
        srv.stop()


def test_a_port_in_use_is_refused_before_the_model_loads():
    from click.testing import CliRunner

    from pipeline.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", "--policy", "paged", "--port", str(port), "--set", "engine.model=/none"])
    # The model path does not exist: had the port been free, loading it would have been the error.
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in result.output, result.output


def test_an_unwritable_feedback_dir_is_refused_saying_what_to_set(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ServeSetupError, match="feedback_dir .*file/feedback.*null to record none"):
        start_server(serve_config(tmp_path, feedback_dir=str(tmp_path / "file" / "feedback")), predictor=FakePredictor())


@pytest.mark.parametrize("engine, words", [
    ({"block_size": 0}, "block_size"), ({"kv_cache_tokens": 8}, r"kv_cache_tokens \(8\)"),
    ({"max_num_seqs": 0}, "max_num_seqs"), ({"tensor_parallel": 0}, "tensor_parallel"),
])  # fmt: skip
def test_engine_limits_that_cannot_serve_are_refused(engine, words):
    with pytest.raises(ValueError, match=words):
        load_config(ServeConfig, values={f"engine.{key}": value for key, value in engine.items()})


def _save_tiny_model(folder: Path) -> None:
    from transformers import AutoTokenizer

    from predictor_train.backbone import minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    tokenizer.chat_template = "{% for m in messages %}{{ m.content }} {% endfor %}"
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_serve_main_runs_a_server_process_and_stops_on_sigterm(tmp_path):
    from core.distributed import free_port

    _save_tiny_model(tmp_path / "model")
    port = free_port()
    config = {"engine": {"model": str(tmp_path / "model"), "kv_cache_tokens": 2048, "policy": {"policy": "max"}},
              "port": port, "feedback_dir": None, "max_new_tokens": 16, "log_level": "warning"}
    env = {**os.environ, "S3_API_KEY": "from-env", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tests.server.serve_child", json.dumps(config)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc)
        assert httpx.get(f"{url}/v1/models").status_code == 401  # the key came from S3_API_KEY
        answer = httpx.post(f"{url}/v1/completions", headers={"Authorization": "Bearer from-env"},
                            json={"model": "model", "prompt": "hello", "max_tokens": 4}).json()
        assert answer["usage"]["completion_tokens"] == 4
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, proc.stdout.read()
    finally:
        proc.kill()


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError("the server did not become healthy")


@pytest.mark.integration
def test_tensor_parallel_over_two_processes(tmp_path):
    """Two CPU ranks under the deepspeed launcher: rank 0 serves HTTP and drives rank 1, and the answers match a
    one-process server's. SIGTERM to the launcher's process group (what Ctrl-C does) stops every rank cleanly."""
    from core.distributed import free_port

    _save_tiny_model(tmp_path / "model")
    texts = {tp: _serve_and_ask(tmp_path / "model", tp, free_port()) for tp in (1, 2)}
    assert texts[1] == texts[2] and all(texts[2])


def _serve_and_ask(model: Path, tp: int, port: int) -> list[str]:
    from core.distributed import free_port

    config = {"engine": {"model": str(model), "kv_cache_tokens": 2048, "tensor_parallel": tp,
                         "policy": {"policy": "max"}}, "port": port, "feedback_dir": None, "max_new_tokens": 16}
    args = [sys.executable, "-m", "tests.server.serve_child", json.dumps(config)]
    if tp > 1:
        args = [str(Path(sys.executable).parent / "deepspeed"), "--no_local_rank", "--num_gpus", str(tp),
                "--master_port", str(free_port()), "--module", *args[2:]]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.Popen(args, cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT), "S3_API_KEY": ""}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc, timeout=300)
        texts = [httpx.post(f"{url}/v1/completions", json={"model": "model", "prompt": prompt, "max_tokens": 12,
                                                            "temperature": 0}).json()["choices"][0]["text"]
                 for prompt in ("hello world", "tensor parallel")]
        os.killpg(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)  # EOF once every rank has exited
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert "serve.server.launch: stopped" in output and "Traceback" not in output, output[-3000:]
    return texts
