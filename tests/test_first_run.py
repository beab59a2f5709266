"""The first run, as a new user meets it: a bad setting, a missing model path, a hub that cannot be reached, the
commands the README gives (issue 12). Real processes where the behaviour is the process's (exit status, stderr)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

import main
from conftest import LiveServer, free_port, make_settings, new_process_group, stop_gracefully

ROOT = Path(__file__).resolve().parent.parent
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def run(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(args, env=full_env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.parametrize(
    ("command", "env", "line"),
    [
        ([sys.executable, str(ROOT / "main.py")], {"MAX_TOKENS": "0"},
         "llm-server: invalid setting: MAX_TOKENS must be at least 1, got 0"),
        ([sys.executable, "-m", "uvicorn", "main:app", "--port", "0"], {"PORT": "abc"},
         "llm-server: invalid setting: PORT must be int, got 'abc'"),
    ],
)  # fmt: skip
def test_an_invalid_setting_prints_one_line_and_exits_2(
    command: list[str], env: dict[str, str], line: str, tmp_path: Path
) -> None:
    result = run(command, {**env, "PYTHONPATH": str(ROOT)}, tmp_path)
    assert (result.returncode, result.stderr, result.stdout) == (2, line + "\n", "")


def test_the_convert_command_refuses_bad_arguments_with_its_usage(tmp_path: Path) -> None:
    usage = run([sys.executable, str(ROOT / "main.py"), "convert"], {}, tmp_path)
    missing = run([sys.executable, str(ROOT / "main.py"), "convert-gguf", "nothing.gguf", "out"], {}, tmp_path)
    assert (usage.returncode, usage.stderr) == (2, main.USAGE)
    assert (missing.returncode, missing.stderr) == (2, "llm-server: no such file: nothing.gguf\n")


def test_a_missing_local_path_is_reported_as_such_and_not_retried_at_every_request(tmp_path: Path) -> None:
    """`MODEL_REPO_ID=./nothing.gguf` once said "Repo id must use alphanumeric chars"; every request then waited
    for another attempt. Now: the path, then 503 at once with Retry-After until MODEL_LOAD_RETRY_SECONDS pass."""
    target = tmp_path / "nothing.gguf"
    settings = make_settings(model_repo_id=str(target), model_load_retry_seconds=60)
    with TestClient(main.create_app(settings)) as client:
        first = client.post("/v1/chat/completions", json={"messages": QUESTION})
        started = time.monotonic()
        second = client.post("/v1/chat/completions", json={"messages": QUESTION})
        waited = time.monotonic() - started
        ready = client.get("/health/ready")
    error = f"model {target} could not be loaded: no such file or folder: {target}"
    assert first.status_code == 503 and first.headers["retry-after"] == "60"
    assert first.json()["error"] == {"message": f"{error}; next attempt in 60 s", "type": "service_unavailable_error",
                                     "param": None, "code": "model_not_ready"}  # fmt: skip
    assert second.status_code == 503 and int(second.headers["retry-after"]) in (59, 60)
    assert waited < 5  # answered from the recorded failure, not another load (a hub attempt takes ~25 s)
    assert ready.status_code == 503 and ready.json()["error"]["message"] == error


def test_the_default_hub_model_offline_fails_at_once_with_the_advice(tmp_path: Path) -> None:
    """The default model with HF_HUB_OFFLINE=1 and no cache: one attempt, the advice once, then 503s."""
    port = free_port()
    env = {"PORT": str(port), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PRELOAD_MODEL": "1"}
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "main.py")], env={**os.environ, **env}, cwd=tmp_path,
                                stdout=log, stderr=subprocess.STDOUT, text=True, **new_process_group())  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while "could not be loaded" not in log_path.read_text() and time.monotonic() < deadline:
                time.sleep(0.2)
            answers = [httpx.post(url + "/v1/chat/completions", json={"messages": QUESTION}, timeout=30) for _ in "ab"]
            health = httpx.get(url + "/health", timeout=5).json()
        finally:
            stop_gracefully(proc)
            proc.wait(30)
    text = log_path.read_text()
    assert [a.status_code for a in answers] == [503, 503] and all("retry-after" in a.headers for a in answers)
    assert health["model"] == main.DEFAULT_MODEL_REPO_ID and health["model_loaded"] is False
    assert text.count("loading model unsloth/Qwen3-4B-Instruct-2507 (from the hub cache, or downloaded now)") == 1
    assert text.count("HF_HUB_OFFLINE=1 so that a load uses the local cache only") == 1
    assert "Traceback" not in text


def test_the_readme_quick_start_commands_work(tiny_model_dir: Path, tmp_path: Path) -> None:
    """README: `uvicorn main:app --port 3000` listens where the examples point (uvicorn ignores PORT), and
    /health/ready says when the model is loaded."""
    port = free_port()
    env = {"MODEL_REPO_ID": str(tiny_model_dir), "PRELOAD_MODEL": "1", "DEVICE_MAP": "cpu", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "uvicorn", "main:app", "--port", str(port)]
    proc = subprocess.Popen(command, env={**os.environ, **env}, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, **new_process_group())  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        answer = client.chat.completions.create(model="local", messages=QUESTION, max_tokens=3)  # type: ignore[arg-type]
    finally:
        stop_gracefully(proc)
        proc.wait(30)
    assert answer.model == tiny_model_dir.name and answer.choices[0].finish_reason == "length"


def test_a_live_server_serves_the_clean_model_id(tiny_server: LiveServer, tiny_model_dir: Path) -> None:
    chunk_models = set()
    client = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused")
    for chunk in client.chat.completions.create(model="x", messages=QUESTION, max_tokens=2, stream=True):  # type: ignore[arg-type]
        chunk_models.add(chunk.model)
    assert chunk_models == {tiny_model_dir.name} and str(tiny_model_dir.parent) not in str(chunk_models)
